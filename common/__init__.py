"""The base layer every package of shrink stands on: user errors, the registry, paths and atomic
directory writes. It imports nothing of ours, so no import runs back up."""

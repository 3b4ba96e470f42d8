"""The one exception class for errors meant for users; the CLI prints them as a single line."""


class ShrinkError(Exception):
    """A problem the user can fix (bad config value, missing or corrupt file, bad data)."""

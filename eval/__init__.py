"""Eval harness: perplexity, task accuracy, agreement, speed, and the run report."""

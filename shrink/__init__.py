"""shrink: distill, uptrain to GQA, prune and quantize LLMs; drive the engine and the eval harness."""

__version__ = "0.1.0"

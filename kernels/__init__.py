"""shrink's Triton kernels, each beside its plain-torch reference.

Not Hugging Face's ``kernels`` library (a PyPI distribution that transformers probes for by name).
This package is deliberately minimal at import time, defines no ``__version__`` and none of that
library's entry points (get_kernel, kernelize, ...), so transformers' probe sees no usable version
and leaves it alone; tests/kernels/test_not_hf_kernels.py checks this.
"""

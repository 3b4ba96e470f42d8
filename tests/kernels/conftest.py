"""Run Triton kernels in the interpreter when there is no GPU.

Triton picks interpreter or compiler when a @triton.jit function is *defined* (module import), so
the variable must be set before kernels.* modules are imported; if another test package imported
them first, they are reloaded here.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
    for name in [n for n in sys.modules if n == "kernels" or n.startswith("kernels.")]:
        importlib.reload(sys.modules[name])

"""eval.bench.common.graph_seconds on a fresh CUDA context: a library's first call (cuBLAS creating
its handle and workspace) cannot be captured in a CUDA graph, and a failed capture poisons the
context for the whole process. The int4_mma sweep's bf16 baseline died of it on the H200; this
runs in a subprocess so that no earlier CUDA work in the test session warms cuBLAS up."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from support import REPO

pytestmark = pytest.mark.gpu

# The tensors are made on the CPU and copied over: the first CUDA kernel, and cuBLAS's first
# call, is graph_seconds' own F.linear. After it, the context must still run eager work.
FIRST_CUDA_OP = """
import torch
import torch.nn.functional as F
from eval.bench.common import graph_seconds

assert not torch.cuda.is_initialized()
g = torch.Generator().manual_seed(0)
x = torch.randn(16, 512, generator=g).to("cuda", torch.bfloat16)
w = torch.randn(1024, 512, generator=g).to("cuda", torch.bfloat16)
seconds = graph_seconds(lambda: F.linear(x, w))
assert 0.0 < seconds < 1.0, seconds
eager = F.linear(x, w).float()
torch.testing.assert_close(eager, x.float() @ w.float().T, rtol=2e-2, atol=0.5)
print("ok", seconds)
"""


def test_graph_seconds_as_the_first_cuda_op_of_a_process_succeeds():
    done = subprocess.run([sys.executable, "-c", FIRST_CUDA_OP], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok ")

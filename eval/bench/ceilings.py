"""The device's ceilings: copy bandwidth and bf16 matmul throughput."""

from __future__ import annotations

import torch

from eval.bench.common import RESULTS, log


def ceilings() -> dict[str, float]:
    import triton.testing

    n = 1 << 30  # 2 GiB of bf16
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    bw = 2 * x.numel() * 2 / (ms * 1e-3)
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    flops = 2 * 8192**3 / (ms * 1e-3)
    del a, b
    torch.cuda.empty_cache()
    out = {"copy_bandwidth_TBps": bw / 1e12, "bf16_matmul_TFLOPs": flops / 1e12}
    log(f"ceilings: device-to-device copy {bw / 1e12:.2f} TB/s (read+write), bf16 8192^3 matmul {flops / 1e12:.0f} TFLOP/s")
    RESULTS["ceilings"] = out
    return out

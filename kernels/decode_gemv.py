"""The fused decode GEMV's one entry for every weight format the engine serves: kernels/gemv.py's
kernels read dense, int8, int4 and W8A8 weights; 2:4 + int4 (quant "sparse24_int4", ``meta``: its
2:4 positions) goes to kernels/quant_gemv.py's fast 2:4 kernels, at M == 1 only with 16-bit
activations (ONE_ROW_QUANTS), with the same norm / SwiGLU / residual / rotary + KV-store fusions.
The routing lives here, above both modules: quant_gemv reuses gemv's prologue and epilogue
helpers, so gemv cannot import quant_gemv back."""

from __future__ import annotations

import torch

from kernels import gemv as dense
from kernels import quant_gemv

# Formats read at M == 1 only (fast dequantization), with the activation dtypes they take; a
# decode of more rows runs them unfused (engine/layers/quantized.py fused_decode_rows).
ONE_ROW_QUANTS = {"sparse24_int4": (torch.bfloat16, torch.float16)}


def _one_row_args(quant: str, kw: dict) -> tuple[dict, tuple[int, int, int] | None]:
    """gemv's keywords for a 2:4 kernel: fast / batch_invariant / split_k checked and dropped (the 2:4
    kernels check the rows, the dtype and the weight themselves), config without its BLOCK_M."""
    fast, invariant, split_k, config = (kw.get("fast", False), kw.get("batch_invariant", False),
                                        kw.get("split_k", 1), kw.get("config"))
    if not fast or invariant or split_k != 1 or (config is not None and config[0] != 1):
        raise ValueError(f"gemv: {quant} takes one row with the fast dequantization (not batch_invariant, split_k "
                         f"1): got fast {fast}, batch_invariant {invariant}, split_k {split_k}, config {config}")
    rest = {k: v for k, v in kw.items() if k not in ("fast", "batch_invariant", "split_k", "config")}
    return rest, None if config is None else config[1:]


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, quant: str = "dense",
         meta: torch.Tensor | None = None, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
         **kw) -> torch.Tensor:
    """kernels/gemv.py's gemv (its keywords) for its formats; 2:4 + int4 through sparse24_gemv_fused."""
    if quant not in ONE_ROW_QUANTS:
        return dense.gemv(x, weight, bias, quant=quant, scale=scale, zero=zero, **kw)
    rest, config = _one_row_args(quant, kw)
    return quant_gemv.sparse24_gemv_fused(x, weight, meta, scale, zero, bias, config=config, **rest)


def gemv_rope_store(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                    quant: str = "dense", meta: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                    zero: torch.Tensor | None = None, **kw) -> torch.Tensor:
    """kernels/gemv.py's gemv_rope_store (its keywords) for its formats; 2:4 + int4 through
    sparse24_gemv_rope_store."""
    if quant not in ONE_ROW_QUANTS:
        return dense.gemv_rope_store(x, weight, bias, quant=quant, scale=scale, zero=zero, **kw)
    rest, config = _one_row_args(quant, kw)
    return quant_gemv.sparse24_gemv_rope_store(x, weight, meta, scale, zero, bias, config=config, **rest)

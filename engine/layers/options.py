"""Engine constants the model's layers need, fixed when the model is built: they reach every layer
through its constructor, never as attributes written afterwards or through the per-step context."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelOptions:
    # Triton kernels (else the plain-torch references, as on the CPU).
    use_triton: bool = False
    # Small-batch decode with Triton: norms, residual adds and SwiGLU fused into the skinny-GEMM
    # launches (engine/models/llama.py).
    fused_decode: bool = True
    # Programmatic dependent launch of the decode kernels where the GPU has it (kernels/_triton.py).
    pdl: bool = True
    # Compressed weights in the M == 1 decode GEMVs: the exact dequantization (each weight rounded to
    # the activation dtype, as the torch references) instead of the fast one (kernels/gemv.py).
    exact_dequant: bool = False
    # 2:4 sparse layers: "auto" (the faster of sparse and dense per layer shape and batch size,
    # timed on the GPU at first use), "sparse" or "dense" (engine/layers/quantized.py, Sparse24Linear).
    sparse24_path: str = "auto"
    # Tokens per KV-cache block.
    block_size: int = 16
    # The longest context: decode attention's split count is chosen from it.
    max_model_len: int = 4096
    # Tensor parallelism: this process's rank and the number of ranks the weights are split over
    # (engine/parallel, engine/layers/linear.py).
    tp_rank: int = 0
    tp_size: int = 1

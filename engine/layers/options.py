"""Engine constants the model's layers need, fixed when the model is built: they reach every layer
through its constructor, never as attributes written afterwards or through the per-step context."""

from __future__ import annotations

from dataclasses import dataclass

# Int4 weights' small-batch matmuls on a GPU: "triton", our GEMVs fused into the decode kernels (the
# fast dequantization at M == 1 unless exact_dequant, kernels/gemv.py); "tinygemm", torch's
# aten._weight_int4pack_mm (unfused); "auto", the faster of "triton" and "tinygemm", timed after
# loading (engine/layers/int4_kernel.py).
INT4_KERNELS = ("auto", "triton", "tinygemm")

# Weight-only compressed (int8, int4) decoder linears: "keep" the codes, "dequantize" them once at load
# into dense linears, or "auto": dequantize on the CPU; on a GPU keep them unless their dequantized
# weights time faster at decode (engine/weight_form.py).
COMPRESSED_WEIGHTS = ("auto", "keep", "dequantize")


# 2:4 sparse layers: "auto" (the faster of the 2:4 GEMV / cuSPARSELt and a dense matmul per layer
# shape and batch size, timed on the GPU at first use), "sparse" or "dense" (Sparse24Linear).
SPARSE24_PATHS = ("auto", "sparse", "dense")

# How "auto" times a 2:4 layer's decode-size candidates on a GPU (Sparse24Linear.time_paths):
# "eager", one call between CUDA events (its host launch gap included: the Triton GEMVs' is about
# their kernel's time at 7B shapes), or "graph", one replay of a CUDA graph of the call (as the
# engine's decode graphs run it). Both after an L2 flush.
SPARSE24_TIMINGS = ("eager", "graph")


def check_int4_kernel(value: object) -> None:
    if value not in INT4_KERNELS:
        raise ValueError(f"int4_kernel: {value!r} is not one of {', '.join(INT4_KERNELS)}")


def check_compressed_weights(value: object) -> None:
    if value not in COMPRESSED_WEIGHTS:
        raise ValueError(f"compressed_weights: {value!r} is not one of {', '.join(COMPRESSED_WEIGHTS)}")


def check_sparse24_path(value: object) -> None:
    if value not in SPARSE24_PATHS:
        raise ValueError(f"sparse24_path: {value!r} is not one of {', '.join(SPARSE24_PATHS)}")


def check_sparse24_timing(value: object) -> None:
    if value not in SPARSE24_TIMINGS:
        raise ValueError(f"sparse24_timing: {value!r} is not one of {', '.join(SPARSE24_TIMINGS)}")


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
    # Which kernel runs int4 weights' small-batch matmuls on a GPU: one of INT4_KERNELS.
    int4_kernel: str = "auto"
    # Whether weight-only compressed linears stay compressed: one of COMPRESSED_WEIGHTS.
    compressed_weights: str = "auto"
    # Which path runs 2:4 sparse layers: one of SPARSE24_PATHS.
    sparse24_path: str = "auto"
    # How "auto" times 2:4 layers' decode-size candidates: one of SPARSE24_TIMINGS.
    sparse24_timing: str = "eager"
    # Tokens per KV-cache block.
    block_size: int = 16
    # The longest context: decode attention's split count is chosen from it.
    max_model_len: int = 4096
    # Batch-invariant mode (EngineConfig.batch_invariant): a token's logits do not depend on how many
    # rows share its forward (decode batch or speculative verify): one GEMV config at every M, the
    # decode attention's split count fixed (kernels/gemv.py, engine/layers/attention.py).
    batch_invariant: bool = False
    # Tensor parallelism: this process's rank and the number of ranks the weights are split over
    # (engine/parallel, engine/layers/linear.py).
    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self) -> None:
        check_int4_kernel(self.int4_kernel)
        check_compressed_weights(self.compressed_weights)
        check_sparse24_path(self.sparse24_path)
        check_sparse24_timing(self.sparse24_timing)

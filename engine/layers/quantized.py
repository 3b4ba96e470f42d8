"""Compressed linears, after gpt-fast: each replaces an `nn.Linear` of the engine's model through
one `replace_linears(model, make)` walk, keeps its compressed tensors as buffers, and computes
with them (torch references from kernels/quant.py; Triton GEMVs on a GPU at decode sizes: at
batch 1 with the fast dequantization unless ModelOptions.exact_dequant, kernels/gemv.py).

- Int8Linear: weight-only int8, one scale per output channel.
- Int4Linear: weight-only int4, one scale (and optional zero point) per group of inputs; on a GPU
  in our Triton GEMVs or torch's tinygemm kernel (ModelOptions.int4_kernel).
- W8A8Linear: int8 or fp8 e4m3 weights with dynamic per-token activation quantization.
- Sparse24Linear: 2:4 sparse weights (kept half + 2-bit positions), dense or int4 values.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kernels import quant as ref
from kernels.gemv import FAST_BY_DEFAULT, SMALL_M, fast_dequant_fits, gemv
from kernels.quant_dequant import dequantize_int4, dequantize_int4_tinygemm
from kernels.quant_gemv import sparse24_gemv, sparse24_gemv_fits
from kernels.quant_tinygemm import (pack_for_gpu, scales_and_zeros, tinygemm_available, tinygemm_fits, tinygemm_mm,
                                    unpack_gpu_layout)

from engine.cuda_graphs import gpu_seconds
from engine.layers.options import ModelOptions


class CompressedLinear(nn.Module):
    """What the compressed linears share: sizes, an optional bias, and a dense view for paths
    (CPU serving, the fused decode fallback) that want one."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None,
                 options: ModelOptions) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.use_triton, self.pdl = options.use_triton, options.pdl
        self.exact_dequant = options.exact_dequant
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def _decode_gemv(self, x: torch.Tensor) -> bool:
        """Whether x [M, K] goes to a Triton decode GEMV: Triton kernels on, M <= SMALL_M."""
        return self.use_triton and x.dim() == 2 and x.shape[0] <= SMALL_M

    def dequantized(self) -> torch.Tensor:
        """The dense weight this layer stands for, fp32 [out, in]."""
        raise NotImplementedError

    def _fast(self, quant: str, group: int = 1) -> bool:
        """Whether the decode GEMVs read this layer with the fast dequantization: for the formats
        where it was measured faster (FAST_BY_DEFAULT), unless options.exact_dequant, where its
        codes fit whole int32 words (kernels/gemv.py)."""
        return (not self.exact_dequant and FAST_BY_DEFAULT[quant]
                and fast_dequant_fits(quant, self.in_features, group))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(CompressedLinear):
    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 options: ModelOptions = ModelOptions()) -> None:
        """codes int8 [N, K]; scale [N] or [N, 1] per channel, or [N, K / group_size] per group."""
        super().__init__(codes.shape[1], codes.shape[0], bias, options)
        scale = scale.reshape(codes.shape[0], -1)
        if codes.shape[1] % scale.shape[1]:
            raise ValueError(f"Int8Linear: {scale.shape[1]} groups do not divide {codes.shape[1]} inputs")
        self.group_size = codes.shape[1] // scale.shape[1]
        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.float().contiguous())

    def dequantized(self) -> torch.Tensor:
        return ref.dequantize_grouped(self.codes, self.scale, None)

    def gemv_args(self) -> tuple[torch.Tensor, dict] | None:
        """The fused decode kernels' weight and its format arguments (kernels/gemv.py), or None if
        they cannot read this layer (per-group int8)."""
        if self.scale.shape[1] != 1:
            return None
        return self.codes, {"quant": "int8", "scale": self.scale.view(-1), "fast": self._fast("int8")}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale.shape[1] != 1:
            return F.linear(x, self.dequantized().to(x.dtype), self.bias)
        if self._decode_gemv(x):
            weight, quant = self.gemv_args()
            return gemv(x, weight, self.bias, **quant, pdl=self.pdl)
        return ref.int8_linear_ref(x, self.codes, self.scale.view(-1), self.bias)


class Int4Linear(CompressedLinear):
    """Weight-only int4. On a GPU its small-batch matmuls run either in our Triton GEMVs (fused
    into the decode kernels: gemv_args) or in torch's tinygemm kernel (kernels/quant_tinygemm.py:
    unfused, so gemv_args is None and the model runs its per-module forward). Which one is
    options.int4_kernel's; "auto" is decided by timing both after loading (engine/layers/int4_kernel.py),
    which calls use_tinygemm or drop_tinygemm. Until then: the Triton path. One layout of the codes
    is kept: `packed` (ours) or `tinygemm_weight` (with use_tinygemm; larger inputs then dequantize
    from it, kernels/quant_dequant.py). The fp32 scale / zero stay for that dequantization (their
    bf16 copy in tinygemm_scales_zeros is tinygemm's)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 bias: torch.Tensor | None = None, options: ModelOptions = ModelOptions()) -> None:
        """codes: signed int4 values as int8 [N, K]; scale, zero: [N, K / group_size]."""
        super().__init__(codes.shape[1], codes.shape[0], bias, options)
        if codes.shape[1] % scale.shape[1]:
            raise ValueError(f"Int4Linear: {scale.shape[1]} groups do not divide {codes.shape[1]} inputs")
        self.group_size = codes.shape[1] // scale.shape[1]
        self.int4_kernel = options.int4_kernel
        self.register_buffer("packed", ref.pack_int4(codes).contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("zero", None if zero is None else zero.float().contiguous())
        # tinygemm's layout (built on the GPU) and the most input rows it takes; more rows take
        # the dequantize + dense GEMM path.
        self.register_buffer("tinygemm_weight", None, persistent=False)
        self.register_buffer("tinygemm_scales_zeros", None, persistent=False)
        self.tinygemm_max_m = 0

    def dequantized(self) -> torch.Tensor:
        packed = self.packed if self.packed is not None else unpack_gpu_layout(self.tinygemm_weight)
        return ref.dequantize_grouped(ref.unpack_int4(packed), self.scale, self.zero)

    def tinygemm_fits(self) -> bool:
        """Whether tinygemm can run this layer: its shape and group, on an SM 8.0+ GPU."""
        return (tinygemm_fits(self.out_features, self.in_features, self.group_size)
                and tinygemm_available(self.scale.device))

    def build_tinygemm(self) -> None:
        """tinygemm's weight and scales/zeros (bf16: its only activation dtype on CUDA), from the
        codes on this layer's GPU, beside `packed` (both held until use_tinygemm or drop_tinygemm)."""
        if self.tinygemm_weight is None:
            self.tinygemm_weight = pack_for_gpu(self.packed)
            self.tinygemm_scales_zeros = scales_and_zeros(self.scale, self.zero, torch.bfloat16)

    def use_tinygemm(self, max_m: int = SMALL_M) -> None:
        """Inputs of up to max_m bf16 rows go to tinygemm from now on, larger ones dequantize from
        its layout; `packed` is freed and the fused decode kernels no longer read this layer
        (gemv_args is None)."""
        self.build_tinygemm()
        self.packed = None
        self.tinygemm_max_m = max_m

    def drop_tinygemm(self) -> None:
        """Back to the Triton path (before use_tinygemm); tinygemm's buffers are freed."""
        if self.packed is None:
            raise RuntimeError("Int4Linear: the codes are in tinygemm's layout only (use_tinygemm was called)")
        self.tinygemm_weight = self.tinygemm_scales_zeros = None
        self.tinygemm_max_m = 0

    def gemv_args(self) -> tuple[torch.Tensor, dict] | None:
        """The fused decode kernels' weight and format, or None while tinygemm runs this layer."""
        if self.tinygemm_max_m:
            return None
        return self.packed, {"quant": "int4", "scale": self.scale, "zero": self.zero,
                             "fast": self._fast("int4", self.group_size)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tinygemm_max_m:
            return self._tinygemm_forward(x)
        if self._decode_gemv(x):
            weight, quant = self.gemv_args()
            return gemv(x, weight, self.bias, **quant, pdl=self.pdl)
        if self.use_triton:  # prefill: dequantize in one launch, then the dense GEMM
            return F.linear(x, dequantize_int4(self.packed, self.scale, self.zero, x.dtype), self.bias)
        return ref.int4_linear_ref(x, self.packed, self.scale, self.zero, self.bias)

    def _tinygemm_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Up to tinygemm_max_m bf16 rows: tinygemm; else the weight dequantized from its layout
        (one launch), then the dense GEMM."""
        rows = x.numel() // self.in_features
        if 0 < rows <= self.tinygemm_max_m and x.dtype == torch.bfloat16:
            y = tinygemm_mm(x.reshape(rows, self.in_features), self.tinygemm_weight, self.group_size,
                            self.tinygemm_scales_zeros).view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        weight = dequantize_int4_tinygemm(self.tinygemm_weight, self.scale, self.zero, x.dtype)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        kernel = f", tinygemm up to {self.tinygemm_max_m} rows" if self.tinygemm_max_m else ""
        return super().extra_repr() + f", group_size={self.group_size}, zero_point={self.zero is not None}{kernel}"


def int_mm_fits(k: int, n: int) -> bool:
    """torch._int_mm's CUDA rules on K and N: multiples of 8."""
    return k % 8 == 0 and n % 8 == 0


def int_mm_rows(m: int) -> int:
    """Rows to pad an int8 input to for torch._int_mm: more than 16 (its minimum) and a
    multiple of 8 (cuBLASLt's int8 layouts)."""
    return max(24, -(-m // 8) * 8)


def scaled_mm_fits(k: int, n: int, dtype: torch.dtype, capability: tuple[int, int]) -> bool:
    """Whether torch._scaled_mm takes an fp8 GEMM with row-wise scales: K and N multiples of
    16, an SM 8.9+ GPU, and bf16 output (the only output type of row-wise scaling; an fp32 model
    takes the exact reference instead of a bf16-rounded result)."""
    return k % 16 == 0 and n % 16 == 0 and dtype == torch.bfloat16 and capability >= (8, 9)


class W8A8Linear(CompressedLinear):
    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, act: str, bias: torch.Tensor | None = None,
                 options: ModelOptions = ModelOptions()) -> None:
        """codes: int8 (act "int8") or float8_e4m3fn (act "fp8") [N, K]; scale: per channel [N]."""
        super().__init__(codes.shape[1], codes.shape[0], bias, options)
        if act not in ("int8", "fp8"):
            raise ValueError(f"W8A8Linear: activations must be int8 or fp8 (got {act!r})")
        self.act = act
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scale", scale.reshape(-1).float().contiguous())

    def dequantized(self) -> torch.Tensor:
        return self.codes.float() * self.scale[:, None]

    def gemv_args(self) -> tuple[torch.Tensor, dict] | None:
        """int8: the fused decode kernels quantize the input in their prologue; fp8: None."""
        if self.act != "int8":
            return None
        return self.codes, {"quant": "w8a8_int8", "scale": self.scale, "fast": self._fast("w8a8_int8")}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act == "int8" and self._decode_gemv(x):
            weight, quant = self.gemv_args()
            return gemv(x, weight, self.bias, **quant, pdl=self.pdl)
        if x.is_cuda and x.dim() == 2:
            y = self._tensor_core(x)
            if y is not None:
                return y if self.bias is None else y + self.bias
        return ref.w8a8_linear_ref(x, self.codes, self.scale, self.act, self.bias)

    def _tensor_core(self, x: torch.Tensor) -> torch.Tensor | None:
        """The 8-bit tensor-core GEMM where torch's kernels take these operands, else None (the
        exact fp32 reference): torch._int_mm (int8; K, N multiples of 8, rows padded by
        int_mm_rows) or torch._scaled_mm with row-wise scales (fp8: K, N multiples of 16, bf16
        output only, SM 8.9+; rows padded to a multiple of 16)."""
        m, k = x.shape
        n = self.out_features
        if self.act == "int8" and int_mm_fits(k, n):
            xq, xs = ref.quantize_per_token_int8(x)
            rows = int_mm_rows(m)
            if rows != m:
                xq = F.pad(xq, (0, 0, 0, rows - m))
            acc = torch._int_mm(xq, self.codes.t())[:m]
            return (acc.float() * xs * self.scale[None, :]).to(x.dtype)
        if self.act == "fp8" and scaled_mm_fits(k, n, x.dtype, torch.cuda.get_device_capability(x.device)):
            xq, xs = ref.quantize_per_token_fp8(x)
            pad = -m % 16
            if pad:
                xq = F.pad(xq.view(torch.int8), (0, 0, 0, pad)).view(torch.float8_e4m3fn)
                xs = F.pad(xs, (0, 0, 0, pad), value=1.0)
            y = torch._scaled_mm(xq, self.codes.t(), scale_a=xs.contiguous(),
                                 scale_b=self.scale.view(1, n), out_dtype=x.dtype)
            return y[:m]
        return None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self.act}"


# torch's 2:4 kernels (cuSPARSELt, CUTLASS): 16-bit floats only (fp32 would run in TF32 and change
# the results), weight rows a multiple of 32 and columns of 64 (CUTLASS's minimum tile, the
# stricter of the two); at decode batch sizes the 2:4 GEMV (kernels/quant_gemv.py) or a dense
# matmul: the semi-structured kernels from SEMI_STRUCTURED_MIN_M rows.
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
SEMI_STRUCTURED_MIN_M = SMALL_M + 1
# Batch sizes at which Sparse24Linear times its paths on a GPU (once per layer shape): a batch
# takes the choice of the nearest (decode: the next power of two; prefill: nearest in log scale).
DECODE_BUCKETS = (1, 2, 4, 8, 16)
PREFILL_BUCKETS = (512, 2048, 8192)
TIMING_REPS = 3

log = logging.getLogger(__name__)


def semi_structured_fits(n: int, k: int, dtype: torch.dtype, m: int) -> bool:
    """Whether an [n, k] 2:4 weight times m input rows of dtype may go to torch's semi-structured
    sparse kernels (else the GEMV or a dense matmul of the same weights)."""
    return dtype in SEMI_STRUCTURED_DTYPES and n % 32 == 0 and k % 64 == 0 and m >= SEMI_STRUCTURED_MIN_M


def m_bucket(m: int) -> int:
    """The timed batch size whose choice a batch of m rows takes."""
    if m <= SMALL_M:
        return next(b for b in DECODE_BUCKETS if b >= m)
    return min(PREFILL_BUCKETS, key=lambda b: abs(math.log(m / b)))


def _to_semi_structured(dense: torch.Tensor) -> torch.Tensor | None:
    """torch's semi-structured sparse tensor of a 2:4 weight, or None where this torch/GPU
    cannot make one."""
    try:
        from torch.sparse import to_sparse_semi_structured

        return to_sparse_semi_structured(dense)
    except (RuntimeError, ValueError, NotImplementedError, ImportError):
        return None


# Per layer shape, format, dtype and device: bucket -> {path: seconds}, timed once (Sparse24Linear).
_MEASURED: dict[tuple, dict[int, dict[str, float]]] = {}


class Sparse24Linear(CompressedLinear):
    """2:4 sparse: the kept half of each row and its 2-bit positions; the kept values dense
    (`values`) or int4 codes with per-group scales (`packed`, `scale`, `zero`).

    Paths per batch size m: "gemv" (m <= 16, Triton: kernels/quant_gemv.py), "cusparselt"
    (torch's semi-structured kernels: 16-bit, prefill m, shapes they take, a CUDA device) and
    "dense" (a matmul of the dense weight). ModelOptions.sparse24_path "auto" times the
    candidates on a GPU at first use (outside graph capture: the engine warms up eagerly before
    capturing), once per layer shape, and takes the faster per bucket (m_bucket). A layer never
    holds a dense weight beside its 2:4 form: where a kept dense weight beats the GEMV at batch 1,
    the layer keeps only a dense weight (logged: it no longer saves memory); else it keeps the 2:4
    form, decodes every batch with the GEMV, and the prefill buckets where dense won (timed as they
    then run: the dense weight rebuilt for the call) rebuild it. "sparse" takes the
    sparse candidate wherever there is one (else the dense weight rebuilt for the call, not
    kept), "dense" keeps only a dense weight."""

    def __init__(self, dense: torch.Tensor, bias: torch.Tensor | None = None, *,
                 codes: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                 zero: torch.Tensor | None = None, options: ModelOptions = ModelOptions()) -> None:
        """dense: the 2:4 sparse weight [N, K] (dequantized when codes are given: it fixes the kept
        positions); codes, scale, zero: its int4 codes [N, K] and [N, G] group scales/zero points."""
        super().__init__(dense.shape[1], dense.shape[0], bias, options)
        if dense.shape[1] % 8:
            raise ValueError(f"Sparse24Linear: in_features {dense.shape[1]} is not a multiple of 8")
        self.path_option = options.sparse24_path
        values, positions = ref.compress_24(dense)
        self.register_buffer("meta", ref.pack_meta_24(positions).contiguous())
        self.quantized = codes is not None
        self.group_size = None
        if self.quantized:
            kept = torch.gather(codes.reshape(codes.shape[0], -1, 4), -1,
                                positions.reshape(codes.shape[0], -1, 2).long()).reshape(values.shape)
            self.group_size = dense.shape[1] // scale.shape[1]
            self.register_buffer("packed", ref.pack_int4(kept).contiguous())
            self.register_buffer("scale", scale.float().contiguous())
            self.register_buffer("zero", None if zero is None else zero.float().contiguous())
        else:
            self.register_buffer("values", values.contiguous())
        # The GEMV folds zero points into an exact fp32 constant: integral ones (compressed-tensors' int8)
        self.gemv_zero_ok = zero is None or bool((zero == zero.round()).all())
        self.register_buffer("weight", None)  # the dense weight, where a path keeps one
        self.paths: dict[int, str] = {}  # bucket -> path chosen by timing ("auto" on a GPU)
        self.timings: dict[int, dict[str, float]] = {}  # bucket -> path -> seconds behind that choice
        self._semi_structured: dict[torch.dtype, torch.Tensor | None] = {}

    @property
    def kept(self) -> torch.Tensor | None:
        return None if self.meta is None else self.packed if self.quantized else self.values

    def dequantized(self) -> torch.Tensor:
        if self.weight is not None and self.meta is None:
            return self.weight.float()
        if self.quantized:
            return ref.sparse24_int4_dequantize(self.packed, self.meta, self.scale, self.zero)
        return ref.decompress_24(self.values.float(), ref.unpack_meta_24(self.meta))

    # -- paths -------------------------------------------------------------------------------------
    def candidates(self, m: int, dtype: torch.dtype, device: torch.device) -> list[str]:
        """The paths that can compute m rows of dtype on device, the sparse one first."""
        if self.meta is None:  # only a dense weight left
            return ["dense"]
        if m <= SMALL_M and self.use_triton and self.gemv_zero_ok and \
                sparse24_gemv_fits(self.in_features, self.kept, self.group_size):
            return ["gemv", "dense"]
        if device.type == "cuda" and semi_structured_fits(self.out_features, self.in_features, dtype, m):
            return ["cusparselt", "dense"]
        return ["dense"]

    def run_path(self, path: str, x: torch.Tensor) -> torch.Tensor:
        if path == "gemv":
            return sparse24_gemv(x, self.kept, self.meta, self.scale if self.quantized else None,
                                 self.zero if self.quantized else None, self.bias, exact=self.exact_dequant)
        semi = self._semi_structured_weight(x.dtype) if path == "cusparselt" else None
        if semi is not None:
            # torch's semi-structured matmul returns the transpose of W @ x^T, a column-major view;
            # the kernels after a linear (rope_store, the KV store) read rows: make them contiguous.
            return F.linear(x, semi, self.bias).contiguous()
        weight = self.weight if self.weight is not None and self.weight.dtype == x.dtype else None
        return F.linear(x, weight if weight is not None else self.dequantized().to(x.dtype), self.bias)

    def choose(self, m: int, dtype: torch.dtype, device: torch.device) -> str:
        """The path of m rows: the only candidate, the sparse one ("sparse", or off a GPU), or the
        one timed faster at m's bucket ("auto"; timed here at first use, outside graph capture);
        inside a capture never "cusparselt"."""
        options = self.candidates(m, dtype, device)
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if len(options) == 1 or self.path_option == "sparse" or device.type != "cuda":
            path = options[0]
        else:
            if not self.paths and not capturing:
                self.time_paths(dtype, device)
                options = self.candidates(m, dtype, device)  # timing may have left a dense weight alone
            path = self.paths.get(m_bucket(m), options[0])
            path = path if path in options else options[0]
        # torch's semi-structured kernels are not known to capture: a graph takes the dense matmul
        return "dense" if path == "cusparselt" and capturing else path

    def time_paths(self, dtype: torch.dtype, device: torch.device) -> None:
        """Time each bucket's candidates (CUDA events, gpu_seconds: the best of TIMING_REPS after a
        warm-up) once per layer shape, format, dtype and device, and settle this layer: the
        faster path per bucket; where dense wins batch 1, only a dense weight kept. The
        dense candidate is timed as it would run: with a kept weight at decode sizes, rebuilt for
        the call at prefill sizes (a layer that keeps its 2:4 form holds no dense weight)."""
        key = (self.out_features, self.in_features, None if self.kept is None else self.kept.dtype,
               self.group_size, self.zero is not None if self.quantized else None, dtype, str(device))
        measured = _MEASURED.get(key)
        if measured is None:
            measured = {}
            dense = self.dequantized().to(device, dtype)
            self.weight = dense  # the dense candidate's weight while timing
            for m in DECODE_BUCKETS + PREFILL_BUCKETS:
                self.weight = dense if m in DECODE_BUCKETS else None
                options = self.candidates(m, dtype, device)
                if len(options) > 1:
                    x = torch.randn(m, self.in_features, device=device, dtype=dtype)
                    measured[m] = {}
                    for path in options:
                        run = functools.partial(self.run_path, path, x)
                        run()
                        measured[m][path] = min(gpu_seconds(run) for _ in range(TIMING_REPS))
            self.weight = None
            del dense
            _MEASURED[key] = measured
        self.paths = {m: min(t, key=t.get) for m, t in measured.items()}
        self.timings = measured
        if "cusparselt" not in self.paths.values():
            self._semi_structured.clear()
        if not self.paths:
            return
        timings = "; ".join(f"m={m}: " + ", ".join(f"{p} {s * 1e6:.1f} us" for p, s in t.items())
                            for m, t in measured.items())
        shape = f"[{self.out_features}, {self.in_features}]"
        if self.paths.get(DECODE_BUCKETS[0]) == "dense" or set(self.paths.values()) == {"dense"}:
            self.keep_dense_only(dtype, device)
            log.info("2:4 layer %s: dense wins at decode (%s): keeping one dense %s weight, "
                     "%.1f MB (the 2:4 form saved none here)", shape, timings, dtype,
                     self.weight.numel() * self.weight.element_size() / 1e6)
        else:
            # The GEMV pays at batch 1; a dense weight for the larger decode batches where a kept
            # dense matmul timed faster would sit beside the 2:4 form: those batches take the GEMV.
            dense_decode = [m for m in DECODE_BUCKETS if self.paths.get(m) == "dense"]
            for m in dense_decode:
                self.paths[m] = "gemv"
            if dense_decode:
                log.info("2:4 layer %s: dense faster at decode batches %s, but only with a dense weight kept beside "
                         "the 2:4 form: the GEMV takes them", shape, dense_decode)
            log.info("2:4 layer %s: paths %s (%s)", shape, self.paths, timings)

    def keep_dense_only(self, dtype: torch.dtype, device: torch.device) -> None:
        """Keep only the dense weight of dtype: the kept half, positions, scales and any
        semi-structured copy dropped."""
        self.weight = self.dequantized().to(device, dtype)
        for name in ("meta", "values", "packed", "scale", "zero"):
            if name in self._buffers:
                self._buffers[name] = None
        self._semi_structured.clear()

    def _semi_structured_weight(self, dtype: torch.dtype) -> torch.Tensor | None:
        """torch's semi-structured sparse tensor of this weight in dtype (cuSPARSELt / CUTLASS 2:4
        kernels; made once per dtype outside graph capture, about the kept half's bytes), or None
        (then run_path rebuilds the dense weight for the call)."""
        if dtype not in self._semi_structured:
            if torch.cuda.is_current_stream_capturing():
                return None
            self._semi_structured[dtype] = _to_semi_structured(self.dequantized().to(self.meta.device, dtype))
        return self._semi_structured[dtype]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and (x.is_cuda or self._decode_gemv(x)):
            if self.path_option == "dense" and self.meta is not None and not torch.cuda.is_current_stream_capturing():
                self.keep_dense_only(x.dtype, x.device)
            return self.run_path(self.choose(x.shape[0], x.dtype, x.device), x)
        if self.meta is None:
            return F.linear(x, self.weight.to(x.dtype), self.bias)
        if self.quantized:
            return ref.sparse24_int4_linear_ref(x, self.packed, self.meta, self.scale, self.zero, self.bias)
        return ref.sparse24_linear_ref(x, self.values, self.meta, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", int4 group_size={self.group_size}" if self.quantized else "")


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def replace_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module | None]) -> int:
    """Swap every nn.Linear for `make(name, linear)` unless it returns None; returns the count."""
    swaps = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    count = 0
    for name, linear in swaps:
        new = make(name, linear)
        if new is not None:
            set_submodule(model, name, new)
            count += 1
    return count


def gemv_weight(linear: nn.Module) -> tuple[torch.Tensor, dict] | None:
    """(weight, format kwargs) of kernels/gemv.py's fused decode kernels for a linear, or None
    where they cannot read it (fp8, 2:4, per-group int8, int4 on tinygemm): those run as their own
    modules, on the unfused path."""
    if isinstance(linear, nn.Linear):
        return linear.weight, {}
    if isinstance(linear, (Int8Linear, Int4Linear, W8A8Linear)):
        return linear.gemv_args()
    return None

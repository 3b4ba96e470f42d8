"""Compressed linears, after gpt-fast: each replaces an `nn.Linear` of the engine's model through
one `replace_linears(model, make)` walk, keeps its compressed tensors as buffers, and computes
with them (torch references from kernels/quant.py; Triton GEMVs on a GPU at decode sizes: at
batch 1 with the fast dequantization unless ModelOptions.exact_dequant, kernels/gemv.py).

- Int8Linear: weight-only int8, one scale per output channel.
- Int4Linear: weight-only int4, one scale (and optional zero point) per group of inputs; on a GPU
  in our Triton GEMVs or torch's tinygemm kernel (ModelOptions.int4_kernel).
- W8A8Linear: int8 or fp8 e4m3 weights with dynamic per-token activation quantization.
- Sparse24Linear (engine/layers/sparse24.py): 2:4 sparse weights (kept half + 2-bit positions),
  dense or int4 values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from kernels import quant as ref
from kernels.decode_gemv import ONE_ROW_QUANTS
from kernels.gemv import FAST_BY_DEFAULT, SMALL_M, fast_dequant_fits, gemv
from kernels.quant_dequant import dequantize_int4, dequantize_int4_tinygemm
from kernels.quant_tinygemm import (pack_for_gpu, scales_and_zeros, tinygemm_available, tinygemm_fits, tinygemm_mm,
                                    unpack_gpu_layout)
from kernels.w8a8 import INT8_MM_MIN_ROWS, int8_mm, quantize_per_token

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

    def gemv_args(self) -> tuple[torch.Tensor, dict] | None:
        """The fused decode kernels' weight and its format arguments (kernels/gemv.py), or None where
        they cannot read this layer (then it runs as its own module, on the unfused path)."""
        return None

    def _fast(self, quant: str, group: int = 1) -> bool:
        """Whether the decode GEMVs read this layer with the fast dequantization at M == 1: for the
        formats where it was measured faster (FAST_BY_DEFAULT), unless options.exact_dequant, where
        its codes fit whole int32 words (kernels/gemv.py)."""
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
            y = self._triton(x) if self.use_triton else self._tensor_core(x)
            if y is not None:
                return y
        return ref.w8a8_linear_ref(x, self.codes, self.scale, self.act, self.bias)

    def _triton(self, x: torch.Tensor) -> torch.Tensor | None:
        """With Triton kernels (kernels/w8a8.py; its docstring counts the bytes): x quantized per
        token in one launch, then for int8 our GEMM with the dequantization and bias in its
        epilogue (below INT8_MM_MIN_ROWS rows, decode batches: torch._int_mm, whose heuristics
        cover skinny shapes, and the torch dequantization), for fp8 torch._scaled_mm with
        row-wise scales (None: the reference, where _scaled_mm does not take the shape or dtype)."""
        m, k = x.shape
        n = self.out_features
        x = x.contiguous()
        if self.act == "int8" and m < INT8_MM_MIN_ROWS and int_mm_fits(k, n):  # decode batches past SMALL_M
            xq, xs = quantize_per_token(x, "int8", rows=int_mm_rows(m))
            y = self._int_mm_dequant(xq, xs, m, x.dtype)
            return y if self.bias is None else y + self.bias
        if self.act == "int8":
            xq, xs = quantize_per_token(x, "int8")
            return int8_mm(xq, xs, self.codes, self.scale, self.bias, x.dtype)
        if not scaled_mm_fits(k, n, x.dtype, torch.cuda.get_device_capability(x.device)):
            return None
        xq, xs = quantize_per_token(x, "fp8", rows=-(-m // 16) * 16)
        y = torch._scaled_mm(xq, self.codes.t(), scale_a=xs, scale_b=self.scale.view(1, n), out_dtype=x.dtype)[:m]
        return y if self.bias is None else y + self.bias

    def _tensor_core(self, x: torch.Tensor) -> torch.Tensor | None:
        """Without Triton: the 8-bit tensor-core GEMM where torch's kernels take these operands,
        else None (the exact fp32 reference): torch._int_mm (int8; K, N multiples of 8, rows padded by
        int_mm_rows) or torch._scaled_mm with row-wise scales (fp8: K, N multiples of 16, bf16
        output only, SM 8.9+; rows padded to a multiple of 16). codes.t() is the column-major
        [K, N] both want: a view, no copy."""
        m, k = x.shape
        n = self.out_features
        if self.act == "int8" and int_mm_fits(k, n):
            xq, xs = ref.quantize_per_token_int8(x)
            rows = int_mm_rows(m)
            if rows != m:
                xq = F.pad(xq, (0, 0, 0, rows - m))
            y = self._int_mm_dequant(xq, xs, m, x.dtype)
        elif self.act == "fp8" and scaled_mm_fits(k, n, x.dtype, torch.cuda.get_device_capability(x.device)):
            xq, xs = ref.quantize_per_token_fp8(x)
            pad = -m % 16
            if pad:
                xq = F.pad(xq.view(torch.int8), (0, 0, 0, pad)).view(torch.float8_e4m3fn)
                xs = F.pad(xs, (0, 0, 0, pad), value=1.0)
            y = torch._scaled_mm(xq, self.codes.t(), scale_a=xs.contiguous(),
                                 scale_b=self.scale.view(1, n), out_dtype=x.dtype)[:m]
        else:
            return None
        return y if self.bias is None else y + self.bias

    def _int_mm_dequant(self, xq: torch.Tensor, xs: torch.Tensor, m: int, dtype: torch.dtype) -> torch.Tensor:
        """torch._int_mm on int8 codes padded to int_mm_rows, then the dequantization of its
        int32 result in torch (four passes over [m, N]: kernels/w8a8.py counts them)."""
        acc = torch._int_mm(xq, self.codes.t())[:m]
        return (acc.float() * xs[:m] * self.scale[None, :]).to(dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self.act}"


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
    where they cannot read it (fp8, 2:4 16-bit values, 2:4 + int4 off its fast M == 1 GEMV,
    per-group int8, int4 on tinygemm): those run as their own modules, on the unfused path."""
    if isinstance(linear, nn.Linear):
        return linear.weight, {}
    if isinstance(linear, CompressedLinear):
        return linear.gemv_args()
    return None


def fused_decode_rows(linears: Iterable[nn.Module], dtype: torch.dtype) -> int:
    """The most rows of dtype a decode step may run through the fused kernels with these linears:
    SMALL_M; 1 where a format is read at M == 1 only (kernels/decode_gemv.py's ONE_ROW_QUANTS: 2:4 + int4,
    whose larger batches keep their unfused 2:4 paths); 0 where the kernels cannot read a linear,
    or a one-row format does not take dtype."""
    rows = SMALL_M
    for linear in linears:
        args = gemv_weight(linear)
        if args is None:
            return 0
        quant = args[1].get("quant", "dense")
        if quant in ONE_ROW_QUANTS:
            if dtype not in ONE_ROW_QUANTS[quant]:
                return 0
            rows = 1
    return rows

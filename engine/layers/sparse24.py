"""2:4 sparse weights in the engine: Sparse24Linear keeps the kept half of each row (16-bit values
or int4 codes with group scales) and its 2-bit positions, and computes with the 2:4 GEMV
(kernels/quant_gemv.py), torch's semi-structured kernels (cuSPARSELt) or a dense matmul, whichever
was timed faster for its shape and batch size (ModelOptions.sparse24_path)."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels import quant as ref
from kernels.gemv import SMALL_M
from kernels.int4_mma import MMA_DTYPES
from kernels.quant_gemv import sparse24_fast_fits, sparse24_gemv, sparse24_gemv_fits
from kernels.sparse24_mma import Sparse24MMAWeight, sparse24_mma, sparse24_mma_fits, sparse24_mma_weight

from engine.cuda_graphs import gpu_seconds
from engine.layers.options import ModelOptions
from engine.layers.quantized import CompressedLinear


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
# Bytes written before each timed call on a GPU, so that its weight is read from memory as in a
# decode step (the H200's L2 is 50 MB; a 7B 2:4 + int4 layer 6-34 MB), not from the last rep's L2.
L2_FLUSH_BYTES = 128 << 20

log = logging.getLogger(__name__)


def timed_seconds(run: Callable[[], object], device: torch.device, graph: bool) -> float:
    """The best of TIMING_REPS of one call of run after its eager warm-up (gpu_seconds), each after
    an L2 flush on a GPU; with `graph` (a GPU only) one replay of a CUDA graph that captured it."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if device.type == "cuda" else None
    if graph and device.type == "cuda":
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            run()
        captured.replay()
        run = captured.replay
    best = math.inf
    for _ in range(TIMING_REPS):
        if flush is not None:
            flush.zero_()
        best = min(best, gpu_seconds(run))
    return best


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

    Paths per batch size m: "gemv" (m <= 16, Triton: kernels/quant_gemv.py), "mma" (int4 codes,
    2 <= m <= 16, 16-bit x: kernels/sparse24_mma.py's tensor-core GEMM, the first candidate there:
    the sparse default), "gemv_rows" (int4 codes, 2 <= m <= 16, 16-bit x: each row through the
    M == 1 fast kernel), "cusparselt"
    (torch's semi-structured kernels: 16-bit, prefill m, shapes they take, a CUDA device) and
    "dense" (a matmul of the dense weight). ModelOptions.sparse24_path "auto" times the
    candidates on a GPU at first use (outside graph capture: the engine warms up eagerly before
    capturing), once per layer shape, and takes the faster per bucket (m_bucket). A layer never
    holds a dense weight beside its 2:4 form. 16-bit kept values (may_keep_dense): where a kept
    dense weight beats the GEMV at batch 1, or where the GEMV's time summed over the decode buckets
    exceeds the kept dense weight's, the layer keeps only a dense weight (logged: it no longer
    saves memory); else it keeps the 2:4 form, decodes every batch with the GEMV, and the prefill
    buckets where dense won (timed as they then run: the dense weight rebuilt for the call) rebuild
    it. int4 codes never give their form up for a kept dense weight (about 5x their bytes: the
    model would be served as the 16-bit one; H200 2026-11-30, eval.bench.quant sparse24_int4_g128
    read bf16's 13.2 GB a step), so their "dense" is always the weight rebuilt from the codes for
    the call, timed so at every bucket and taken where it timed faster.
    "sparse" takes the sparse candidate wherever there is one (else the dense weight rebuilt for
    the call, not kept), "dense" keeps only a dense weight (int4 codes too: asked for by name)."""

    def __init__(self, dense: torch.Tensor, bias: torch.Tensor | None = None, *,
                 codes: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                 zero: torch.Tensor | None = None, options: ModelOptions = ModelOptions()) -> None:
        """dense: the 2:4 sparse weight [N, K] (dequantized when codes are given: it fixes the kept
        positions); codes, scale, zero: its int4 codes [N, K] and [N, G] group scales/zero points."""
        super().__init__(dense.shape[1], dense.shape[0], bias, options)
        if dense.shape[1] % 8:
            raise ValueError(f"Sparse24Linear: in_features {dense.shape[1]} is not a multiple of 8")
        self.path_option = options.sparse24_path
        self.batch_invariant = options.batch_invariant
        self.graph_timing = options.sparse24_timing == "graph"
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
        # sparse24_mma (2..16 rows) reads the buffers above as they are: checked once here
        self.mma_ok = self.quantized and self.use_triton and not self.exact_dequant and \
            sparse24_mma_fits(dense.shape[1], self.group_size, zero, torch.bfloat16)
        if self.mma_ok:
            sparse24_mma_weight(self.packed, self.meta, self.scale, self.zero)
        self.register_buffer("weight", None)  # the dense weight, where a path keeps one
        self.paths: dict[int, str] = {}  # bucket -> path chosen by timing ("auto" on a GPU)
        self.timings: dict[int, dict[str, float]] = {}  # bucket -> path -> seconds behind that choice
        self._semi_structured: dict[torch.dtype, torch.Tensor | None] = {}

    @property
    def may_keep_dense(self) -> bool:
        """Whether "auto" may replace the 2:4 form by a kept dense weight: 16-bit kept values only
        (class docstring)."""
        return not self.quantized

    @property
    def kept(self) -> torch.Tensor | None:
        return None if self.meta is None else self.packed if self.quantized else self.values

    def mma_weight(self) -> Sparse24MMAWeight | None:
        """The weight as kernels/sparse24_mma.py reads it (this layer's own buffers, wherever they are:
        no copy), or None where it does not take the layer (16-bit kept values, a group or zero points
        it does not take, Triton off, exact_dequant) or only a dense weight is left."""
        if not self.mma_ok or self.meta is None:
            return None
        return Sparse24MMAWeight(self.packed, self.meta, self.scale, self.zero, self.group_size)

    def dequantized(self) -> torch.Tensor:
        if self.weight is not None and self.meta is None:
            return self.weight.float()
        if self.quantized:
            return ref.sparse24_int4_dequantize(self.packed, self.meta, self.scale, self.zero)
        return ref.decompress_24(self.values.float(), ref.unpack_meta_24(self.meta))

    def gemv_args(self) -> tuple[torch.Tensor, dict] | None:
        """The fused decode kernels' weight and format (kernels/decode_gemv.py's quant "sparse24_int4": one
        16-bit row, its fast M == 1 GEMV with the norm / SwiGLU / residual / rotary fusions), where
        this layer's batch-1 path is that GEMV: int4 codes the fast kernel takes, Triton on, no
        exact_dequant, integral zero points, the 2:4 form kept, sparse24_path not "dense"; not in
        batch-invariant mode (its M == 1 and M > 1 paths differ). Else None: 16-bit kept values
        among them. "auto" does not enter: its batch-1 rival is the weight rebuilt from the codes
        per call (int4 never keeps a dense one), and the answer must not change after the model
        settled its fused decode at load (the timing comes at first use)."""
        if not (self.quantized and self.meta is not None and self.use_triton and not self.exact_dequant
                and not self.batch_invariant and self.gemv_zero_ok and self.path_option != "dense"
                and sparse24_fast_fits(self.in_features, self.packed, self.group_size, torch.bfloat16)):
            return None
        return self.packed, {"quant": "sparse24_int4", "meta": self.meta, "scale": self.scale, "zero": self.zero,
                             "fast": True}

    # -- paths -------------------------------------------------------------------------------------
    def candidates(self, m: int, dtype: torch.dtype, device: torch.device) -> list[str]:
        """The paths that can compute m rows of dtype on device, the sparse one first."""
        if self.meta is None:  # only a dense weight left
            return ["dense"]
        if m <= SMALL_M and self.use_triton:
            # the tensor-core GEMM first at 2..16 16-bit rows of int4 codes (the sparse default there)
            mma = ["mma"] if m > 1 and dtype in MMA_DTYPES and self.mma_weight() is not None else []
            if self.gemv_zero_ok and sparse24_gemv_fits(self.in_features, self.kept, self.group_size):
                rows = m > 1 and not self.exact_dequant and \
                    sparse24_fast_fits(self.in_features, self.kept, self.group_size, dtype)
                return mma + (["gemv", "gemv_rows", "dense"] if rows else ["gemv", "dense"])
            if mma:
                return mma + ["dense"]
        if device.type == "cuda" and semi_structured_fits(self.out_features, self.in_features, dtype, m):
            return ["cusparselt", "dense"]
        return ["dense"]

    def run_path(self, path: str, x: torch.Tensor) -> torch.Tensor:
        if path == "mma":
            return sparse24_mma(x, self.mma_weight(), self.bias)
        if path in ("gemv", "gemv_rows"):
            return sparse24_gemv(x, self.kept, self.meta, self.scale if self.quantized else None,
                                 self.zero if self.quantized else None, self.bias, exact=self.exact_dequant,
                                 path="fast_rows" if path == "gemv_rows" else None)
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
        """Time each bucket's candidates (timed_seconds: CUDA events, the best of TIMING_REPS after a
        warm-up; the decode buckets' in a CUDA graph with ModelOptions.sparse24_timing "graph") once
        per layer shape, format, dtype, device and timing, and settle this layer: the
        faster path per bucket; where dense wins batch 1, only a dense weight kept. The
        dense candidate is timed as it would run: with a kept weight at decode sizes, rebuilt for
        the call at prefill sizes (a layer that keeps its 2:4 form holds no dense weight) and, for
        int4 codes (never replaced by a kept dense weight: may_keep_dense), at every size."""
        key = (self.out_features, self.in_features, None if self.kept is None else self.kept.dtype,
               self.group_size, self.zero is not None if self.quantized else None, dtype, str(device),
               self.graph_timing)
        measured = _MEASURED.get(key)
        if measured is None:
            measured = {}
            dense = self.dequantized().to(device, dtype) if self.may_keep_dense else None
            for m in DECODE_BUCKETS + PREFILL_BUCKETS:
                self.weight = dense if m in DECODE_BUCKETS else None  # the dense candidate's kept weight
                options = self.candidates(m, dtype, device)
                if len(options) > 1:
                    x = torch.randn(m, self.in_features, device=device, dtype=dtype)
                    measured[m] = {}
                    for path in options:
                        run = functools.partial(self.run_path, path, x)
                        run()
                        measured[m][path] = timed_seconds(run, device, self.graph_timing and m in DECODE_BUCKETS)
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
        if not self.may_keep_dense:
            log.info("2:4 int4 layer %s: paths %s (%s; dense: the weight rebuilt from the codes per call)", shape,
                     self.paths, timings)
            return
        if self.paths.get(DECODE_BUCKETS[0]) == "dense" or set(self.paths.values()) == {"dense"} or \
                self.gemv_loses_decode(measured):
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

    @staticmethod
    def gemv_loses_decode(measured: dict[int, dict[str, float]]) -> bool:
        """Whether the 2:4 form alone (every decode batch on the GEMV) costs more than a kept dense
        weight over the decode buckets taken together, each bucket counted once: a GEMV that wins
        batch 1 by a little but loses the multi-row batches by much (the H200's 7B MLP shapes: 57
        against 77 us at one row, 330-380 against 55-80 at 2-16) must not keep the 2:4 form."""
        rows = [measured[m] for m in DECODE_BUCKETS if m in measured and {"gemv", "dense"} <= measured[m].keys()]
        return bool(rows) and sum(t["gemv"] for t in rows) > sum(t["dense"] for t in rows)

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

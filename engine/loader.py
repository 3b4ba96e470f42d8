"""Checkpoint loading with verification: every parameter of the engine's model is filled exactly
once with the right shape from the safetensors files, or one error lists every missing,
unexpected, duplicated and mis-shaped tensor before anything is read. Compressed-tensors
checkpoints (int8, int4, W8A8 int8/fp8, 2:4, 2:4 + int4) load into the compressed linears of
engine/layers/quantized.py, or, for weight-only schemes where `keep_compressed` is off (the CPU
path), dequantize once into the model's dense linears.

The model tells the loader how checkpoint linears map onto its own (fused) linears through
`linear_shards()`: engine linear name -> LinearSource. Under tensor parallelism a rank reads only
its rows and columns of each tensor (safetensors slices: nothing is read whole), compressed ones
with the scales and zero points of those rows and columns (check_splits refuses what cannot
split: 2:4, a row-parallel split off the quantization groups or packed words). The same mapping and verification
copy a live model's tensors in place (`copy_tensors`: the engine samples a model while it trains).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from engine.layers.linear import ParallelLMHead, RowParallelCompressed, RowParallelLinear
from engine.layers.quantized import Int4Linear, Int8Linear, W8A8Linear, set_submodule
from engine.layers.sparse24 import Sparse24Linear
from engine.layers.options import ModelOptions
from engine.loader_schemes import LinearScheme, linear_schemes

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
MAX_LISTED = 12  # names listed per kind of problem; the count is always given


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not fill the model: missing, unexpected or mis-shaped ones."""


@dataclass(frozen=True)
class LinearSource:
    """Where one engine linear's weight comes from: checkpoint linears stacked along its output
    rows (q, k, v in a fused qkv_proj), each as (name, its rows in the checkpoint, the rows this
    rank keeps); ``in_features``: their input columns in the checkpoint, of which this rank keeps
    ``columns`` (a row-parallel linear's share; None: all)."""

    parts: list[tuple[str, int, range]]
    in_features: int
    columns: range | None = None

    @staticmethod
    def whole(name: str, rows: int, in_features: int, columns: range | None = None) -> "LinearSource":
        return LinearSource([(name, rows, range(rows))], in_features, columns)

    @property
    def split(self) -> bool:
        """Whether this rank keeps only part of it."""
        whole_cols = self.columns is None or len(self.columns) == self.in_features
        return not whole_cols or any(len(kept) != rows for _, rows, kept in self.parts)


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str
    file: str


Shapes = tuple[tuple[int, ...], ...]  # the shapes a tensor may have


def index_checkpoint(path: str) -> tuple[dict[str, TensorInfo], list[str]]:
    """Every tensor's shape and dtype (headers only) and the names stored more than once."""
    files = sorted(str(f) for f in Path(path).glob("*.safetensors"))  # only the pattern globs: `[` in path is literal
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    index: dict[str, TensorInfo] = {}
    duplicated: list[str] = []
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                s = f.get_slice(name)
                if name in index:
                    duplicated.append(name)
                index[name] = TensorInfo(tuple(s.get_shape()), s.get_dtype(), file)
    return index, duplicated


def read_quantization_config(path: str) -> dict | None:
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        return json.load(f).get("quantization_config")


def _scale_shapes(scheme: LinearScheme, out: int, inp: int) -> Shapes:
    if scheme.group_size:
        return ((out, inp // scheme.group_size),)
    if scheme.kind == "int4":
        return ((out, 1),)
    if scheme.per_tensor_scale:
        return ((1,), (), (1, 1))
    return ((out, 1), (out,))


def expected_linear_tensors(name: str, scheme: LinearScheme, out: int, inp: int,
                            bias: bool) -> tuple[dict[str, Shapes], dict[str, Shapes]]:
    """(required, optional) tensor names of one checkpoint linear with their allowed shapes."""
    required: dict[str, Shapes] = {}
    optional: dict[str, Shapes] = {}
    scale = _scale_shapes(scheme, out, inp)
    if scheme.kind == "int4" and scheme.format == "pack-quantized":
        required[f"{name}.weight_packed"] = ((out, math.ceil(inp * 4 / 32)),)
        required[f"{name}.weight_shape"] = ((2,),)
        zero = ((math.ceil(out * 4 / 32), scale[0][1]),)
    elif scheme.bitmask:
        required[f"{name}.compressed"] = ((out, inp // 2),)
        required[f"{name}.bitmask"] = ((out, math.ceil(inp / 8)),)
        required[f"{name}.shape"] = ((2, 1), (2,))
        zero = scale
    else:
        required[f"{name}.weight"] = ((out, inp),)
        zero = scale
    if scheme.quantized:
        required[f"{name}.weight_scale"] = scale
        (optional if scheme.symmetric else required)[f"{name}.weight_zero_point"] = zero
    if bias:
        required[f"{name}.bias"] = ((out,),)
    return required, optional


def verify(path: str, index: dict[str, TensorInfo], duplicated: list[str], required: dict[str, Shapes],
           optional: dict[str, Shapes], tolerated: set[str]) -> None:
    """One error naming every problem, or nothing. `tolerated`: names that may be present and are
    not used (a tied lm_head stored anyway)."""
    missing = sorted(n for n in required if n not in index)
    allowed = required.keys() | optional.keys() | tolerated
    unexpected = sorted(n for n in index if n not in allowed and not n.endswith(IGNORED_SUFFIXES))
    misshaped = []
    for name, shapes in {**required, **optional}.items():
        info = index.get(name)
        if info is not None and info.shape not in shapes:
            misshaped.append(f"{name} {list(info.shape)} (expected {' or '.join(str(list(s)) for s in shapes)})")
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", sorted(misshaped)),
                         ("stored more than once", sorted(set(duplicated)))):
        if names:
            problems.append(f"{len(names)} {label}: {_listed(names)}")
    if problems:
        raise CheckpointMismatchError(f"{path}: the checkpoint does not match the model: " + "; ".join(problems))


class _Reader:
    """Tensors by name from the indexed files, each file opened once."""

    def __init__(self, index: dict[str, TensorInfo]) -> None:
        self.index = index
        self.handles: dict[str, object] = {}

    def get(self, name: str, rows: range | None = None, columns: range | None = None) -> torch.Tensor:
        """The tensor, or only ``rows`` (dim 0) and ``columns`` (dim 1) of it, read as a slice."""
        file = self.index[name].file
        if file not in self.handles:
            self.handles[file] = safe_open(file, framework="pt", device="cpu")
        if rows is None and columns is None:
            return self.handles[file].get_tensor(name)
        r = slice(None) if rows is None else slice(rows.start, rows.stop)
        part = self.handles[file].get_slice(name)
        return part[r] if columns is None else part[r, columns.start : columns.stop]


def _unpack_int32(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """compressed-tensors' pack-quantized int4: element i of a row at bits 4i.. of its little-endian
    int32 words, stored +8 -> signed int8 [rows, cols]."""
    nibbles = packed.contiguous().view(torch.uint8)  # little-endian bytes: low nibble first
    lo, hi = nibbles & 0xF, nibbles >> 4
    return (torch.stack((lo, hi), dim=-1).flatten(-2)[:, :cols].to(torch.int8) - 8)


def _unpack_bitmask(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    bits = (bitmask.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1  # little bit order
    return bits.flatten(-2)[:, :cols].bool()


@dataclass
class LinearWeights:
    """One checkpoint linear, read: dense weight, or codes [out, in] with scale/zero [out, G]."""

    weight: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def dequantized(self) -> torch.Tensor:
        if self.codes is None:
            return self.weight.float()
        group = self.codes.shape[1] // self.scale.shape[1]
        w = self.codes.float()
        if self.zero is not None:
            w = w - self.zero.repeat_interleave(group, dim=1)
        return w * self.scale.repeat_interleave(group, dim=1)


def _words(part: range | None, per_word: int = 8) -> range | None:
    """The packed int32 words holding ``part`` of a packed dimension (8 int4 values a word)."""
    return None if part is None else range(part.start // per_word, -(-part.stop // per_word))


def _groups(columns: range | None, group: int) -> range | None:
    """The scale / zero-point columns of input ``columns`` split on group boundaries (checked by
    check_splits before any read)."""
    return None if columns is None else range(columns.start // group, -(-columns.stop // group))


def _read_qparam(reader: _Reader, name: str, scheme: LinearScheme, out: int, inp: int, rows: range | None,
                 columns: range | None, packed_rows: bool = False) -> torch.Tensor:
    """A weight scale or zero point as float [rows kept, groups kept]: per tensor (expanded), per
    channel ([out, 1] or [out]) or per group ([out, in / group_size]); ``packed_rows``: int4
    zero points of pack-quantized, 8 output rows per int32 word ([ceil(out / 8), groups])."""
    kept = out if rows is None else len(rows)
    if scheme.per_tensor_scale:
        return reader.get(name).float().reshape(1, 1).expand(kept, 1)
    shape = reader.index[name].shape
    groups = shape[1] if len(shape) == 2 else 1
    cols = _groups(columns, inp // groups) if len(shape) == 2 else None
    if not packed_rows:
        return reader.get(name, rows, cols).float().reshape(kept, -1)
    words = _words(rows)
    stored = reader.get(name, words, cols)
    values = _unpack_int32(stored.t().contiguous(), stored.shape[0] * 8).t()
    first = 0 if rows is None else rows.start - 8 * words.start
    return values[first : first + kept].float()


def read_linear(reader: _Reader, name: str, scheme: LinearScheme, out: int, inp: int,
                rows: range | None = None, columns: range | None = None) -> LinearWeights:
    """One checkpoint linear, or (tensor parallelism) the output ``rows`` and input ``columns`` of
    it that a rank keeps, with the scales and zero points of those rows and columns: nothing else
    is read. check_splits vetted the split (group and packed-word boundaries, no 2:4)."""
    bias = f"{name}.bias"
    lw = LinearWeights(bias=reader.get(bias, rows) if bias in reader.index else None)
    if scheme.kind == "int4" and scheme.format == "pack-quantized":
        stored = tuple(int(v) for v in reader.get(f"{name}.weight_shape").flatten())
        if stored != (out, inp):
            raise CheckpointMismatchError(f"{name}.weight_shape says {list(stored)}, the model needs {[out, inp]}")
        weight = _unpack_int32(reader.get(f"{name}.weight_packed", rows, _words(columns)),
                               inp if columns is None else len(columns))
    elif scheme.bitmask:
        assert rows is None and columns is None, "2:4 weights are not split (check_splits)"
        values = reader.get(f"{name}.compressed")
        mask = _unpack_bitmask(reader.get(f"{name}.bitmask"), inp)
        if int(mask.sum()) != values.numel():
            raise CheckpointMismatchError(f"{name}: bitmask keeps {int(mask.sum())} values, compressed holds {values.numel()}")
        raw = values.view(torch.int8) if values.dtype == torch.float8_e4m3fn else values
        weight = torch.zeros(out, inp, dtype=raw.dtype)
        weight[mask] = raw.flatten()
        if values.dtype == torch.float8_e4m3fn:
            weight = weight.view(torch.float8_e4m3fn)
    else:
        weight = reader.get(f"{name}.weight", rows, columns)
    if not scheme.quantized:
        lw.weight = weight
        return lw
    lw.codes = weight
    lw.scale = _read_qparam(reader, f"{name}.weight_scale", scheme, out, inp, rows, columns)
    zero_name = f"{name}.weight_zero_point"
    if zero_name in reader.index:
        zero = _read_qparam(reader, zero_name, scheme, out, inp, rows, columns,
                            packed_rows=scheme.format == "pack-quantized")
        lw.zero = None if (scheme.symmetric and not bool(zero.any())) else zero
    if lw.zero is not None and scheme.kind != "int4":
        raise CheckpointMismatchError(f"{name}.weight_zero_point: nonzero zero points for a symmetric {scheme.kind} scheme")
    return lw


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if parts[0] is None else torch.cat([p.contiguous() for p in parts], dim=0)


def merge(shards: list[LinearWeights]) -> LinearWeights:
    """Concatenate the shards of a fused linear (q, k, v or gate, up) along the output rows."""
    if len(shards) == 1:
        return shards[0]
    zeros = [s.zero for s in shards]
    if any(z is not None for z in zeros) and any(z is None for z in zeros):
        zeros = [z if z is not None else torch.zeros_like(s.scale) for z, s in zip(zeros, shards)]
    return LinearWeights(weight=_cat([s.weight for s in shards]), codes=_cat([s.codes for s in shards]),
                         scale=_cat([s.scale for s in shards]), zero=_cat(zeros), bias=_cat([s.bias for s in shards]))


def compressed_module(scheme: LinearScheme, lw: LinearWeights, keep_compressed: bool,
                      dtype: torch.dtype, options: ModelOptions) -> nn.Module | None:
    """The module that runs this linear, or None where the dense nn.Linear takes the weight."""
    bias = None if lw.bias is None else lw.bias.to(dtype)
    if scheme.kind in ("w8a8_int8", "w8a8_fp8"):  # activation quantization needs its own module
        return W8A8Linear(lw.codes, lw.scale, "int8" if scheme.kind == "w8a8_int8" else "fp8", bias, options)
    if not keep_compressed:
        return None
    if scheme.kind == "int8":
        return Int8Linear(lw.codes, lw.scale, bias, options)
    if scheme.kind == "int4" and scheme.sparse24:
        return Sparse24Linear(lw.dequantized(), bias, codes=lw.codes, scale=lw.scale, zero=lw.zero, options=options)
    if scheme.kind == "int4":
        return Int4Linear(lw.codes, lw.scale, lw.zero, bias, options)
    if scheme.sparse24:
        return Sparse24Linear(lw.weight.to(dtype), bias, options=options)
    return None


def _copy_rows(param: torch.Tensor, value: torch.Tensor) -> None:
    """param's first rows from value; rows past it (a vocabulary shard's padding) zero."""
    param[: value.shape[0]].copy_(value)
    param[value.shape[0] :].zero_()


def _compressed_in_place_of(linear: nn.Module, src: LinearSource, scheme: LinearScheme, lw: LinearWeights,
                            keep_compressed: bool, options: ModelOptions, where: str) -> nn.Module | None:
    """The compressed module that takes `linear`'s place, or None where its dense weight is filled.
    Under tensor parallelism: a column-parallel linear's module holds this rank's rows; a
    row-parallel one's this rank's columns, wrapped to all-reduce its output, with the bias on rank
    0 only; the vocabulary-parallel lm_head stays dense (weight-only schemes dequantize into it)."""
    if src.split and isinstance(linear, ParallelLMHead):
        return None
    row_parallel = src.split and isinstance(linear, RowParallelLinear)
    if row_parallel and linear.tp_rank != 0:
        lw = replace(lw, bias=None)  # rank 0 adds it, before the all-reduce
    try:
        module = compressed_module(scheme, lw, keep_compressed, linear.weight.dtype, options)
    except ValueError as e:  # e.g. weights declared 2:4 that are not
        raise CheckpointMismatchError(f"{where} ({scheme.describe()}): {e}") from e
    return RowParallelCompressed(module) if module is not None and row_parallel else module


def check_splits(path: str, shards: dict[str, LinearSource], schemes: dict[str, LinearScheme],
                 modules: dict[str, nn.Module], tp_size: int) -> None:
    """Before any tensor is read: one error naming the compressed linears this rank's split cannot
    take. 2:4 weights are not split; a row-parallel split of per-group scales must fall on group
    boundaries and one of pack-quantized int4 codes on int32 words (8 values); W8A8 stays out of
    the vocabulary-parallel lm_head."""
    sparse, off_boundary, lm_head = [], [], []
    for engine_name, src in shards.items():
        scheme = schemes[src.parts[0][0]]
        if not src.split or not (scheme.quantized or scheme.sparse24):
            continue
        if scheme.sparse24:
            sparse.append(f"{src.parts[0][0]} ({scheme.describe()})")
        elif scheme.kind.startswith("w8a8") and isinstance(modules[engine_name], ParallelLMHead):
            lm_head.append(f"{engine_name} ({scheme.describe()})")
        cols = src.columns
        if cols is None or len(cols) == src.in_features:
            continue
        bounds = [b for b in (cols.start, cols.stop) if b != src.in_features]
        packed = scheme.kind == "int4" and scheme.format == "pack-quantized"
        if scheme.group_size and any(b % scheme.group_size for b in bounds):
            off_boundary.append(f"{src.parts[0][0]} (group_size {scheme.group_size}: its {src.in_features} input "
                                f"columns split in {len(cols)} per rank)")
        elif packed and any(b % 8 for b in bounds):
            off_boundary.append(f"{src.parts[0][0]} (int4 packed 8 per int32 word: its {src.in_features} input "
                                f"columns split in {len(cols)} per rank)")
    if sparse:
        raise NotImplementedError(f"{path}: 2:4 sparse weights cannot be split over tensor_parallel_size={tp_size} "
                                  f"ranks: {_listed(sparse)}; serve them with tensor_parallel_size=1")
    if lm_head:
        raise NotImplementedError(f"{path}: a W8A8 lm_head cannot be split over the vocabulary under "
                                  f"tensor_parallel_size={tp_size}: {_listed(lm_head)}")
    if off_boundary:
        raise ValueError(f"{path}: tensor_parallel_size={tp_size} splits the input columns of row-parallel "
                         f"compressed linears off their quantization groups or packed words: {_listed(off_boundary)}; "
                         "choose a tensor_parallel_size whose split falls on their boundaries")


def _listed(names: list[str]) -> str:
    more = len(names) - MAX_LISTED
    return ", ".join(names[:MAX_LISTED]) + (f", ... ({more} more)" if more > 0 else "")


def load_checkpoint(model: nn.Module, path: str, shards: dict[str, LinearSource], tolerated: set[str],
                    keep_compressed: bool, options: ModelOptions,
                    param_rows: dict[str, tuple[int, range]] | None = None) -> int:
    """Fill `model` from the checkpoint at `path`; returns how many linears became compressed
    modules. `shards`: engine linear -> LinearSource; `tolerated`: checkpoint names that may be
    present and go unused; `param_rows`: other parameters of which this tensor-parallel rank keeps
    some rows, name -> (rows in the checkpoint, rows kept)."""
    index, duplicated = index_checkpoint(path)
    return _fill(model, path, index, duplicated, _Reader(index), read_quantization_config(path), shards, tolerated,
                 keep_compressed, options, param_rows)


class _TensorReader(_Reader):
    """The _Reader interface over tensors in memory (a live model's parameters)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__({n: TensorInfo(tuple(t.shape), str(t.dtype), "") for n, t in tensors.items()})
        self.tensors = tensors

    def get(self, name: str, rows: range | None = None, columns: range | None = None) -> torch.Tensor:
        t = self.tensors[name]
        t = t if rows is None else t[rows.start : rows.stop]
        return t if columns is None else t[:, columns.start : columns.stop]


def copy_tensors(model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]], shards: dict[str, LinearSource],
                 tolerated: set[str], options: ModelOptions,
                 param_rows: dict[str, tuple[int, range]] | None = None) -> None:
    """Copy Hugging Face-named dense tensors into `model`'s parameters in place (the storage stays,
    so captured CUDA graphs stay valid), mapped and verified as a checkpoint is: every parameter
    exactly once with its shape, or one CheckpointMismatchError naming every problem before any
    copy."""
    tensors: dict[str, torch.Tensor] = {}
    duplicated: list[str] = []
    for name, tensor in named_tensors:
        if name in tensors:
            duplicated.append(name)
        tensors[name] = tensor.detach()
    reader = _TensorReader(tensors)
    _fill(model, "update_weights", reader.index, duplicated, reader, None, shards, tolerated, False, options, param_rows)


def _fill(model: nn.Module, path: str, index: dict[str, TensorInfo], duplicated: list[str], reader: _Reader,
          quantization_config: dict | None, shards: dict[str, LinearSource], tolerated: set[str],
          keep_compressed: bool, options: ModelOptions, param_rows: dict[str, tuple[int, range]] | None) -> int:
    """load_checkpoint's work from any reader of named tensors; `path` names the source in errors."""
    param_rows = param_rows or {}
    modules = dict(model.named_modules())
    ckpt_linears = [n for src in shards.values() for n, _, _ in src.parts]
    schemes = linear_schemes(quantization_config, ckpt_linears)
    required: dict[str, Shapes] = {}
    optional: dict[str, Shapes] = {}
    for engine_name, src in shards.items():
        linear = modules[engine_name]
        kinds = {schemes[n] for n, _, _ in src.parts}
        if len(kinds) > 1:
            listed = ", ".join(f"{n}: {schemes[n].describe()}" for n, _, _ in src.parts)
            raise CheckpointMismatchError(f"{path}: {engine_name} fuses linears stored with different schemes ({listed})")
        for name, rows, _ in src.parts:
            req, opt = expected_linear_tensors(name, schemes[name], rows, src.in_features, linear.bias is not None)
            required.update(req)
            optional.update(opt)
    linear_params = {f"{e}.{p}" for e in shards for p in ("weight", "bias")}
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name not in linear_params:
            rows = param_rows[name][0] if name in param_rows else p.shape[0]
            required[name] = ((rows, *p.shape[1:]),)
    verify(path, index, duplicated, required, optional, tolerated)
    check_splits(path, shards, schemes, modules, options.tp_size)

    compressed = 0
    with torch.no_grad():
        for name, p in params.items():
            if name in param_rows:
                _copy_rows(p, reader.get(name, param_rows[name][1]))
            elif name not in linear_params:
                p.copy_(reader.get(name))
        for engine_name, src in shards.items():
            linear = modules[engine_name]
            scheme = schemes[src.parts[0][0]]
            lw = merge([read_linear(reader, n, scheme, rows, src.in_features, kept if src.split else None,
                                    src.columns if src.split else None) for n, rows, kept in src.parts])
            module = _compressed_in_place_of(linear, src, scheme, lw, keep_compressed, options,
                                             f"{path}: {engine_name}")
            if module is not None:
                set_submodule(model, engine_name, module.to(linear.weight.device))
                compressed += 1
                continue
            _copy_rows(linear.weight, lw.dequantized() if scheme.quantized else lw.weight)
            if linear.bias is not None:
                _copy_rows(linear.bias, lw.bias)
    return compressed

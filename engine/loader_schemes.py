"""Which compressed-tensors scheme each linear of a checkpoint uses, read from config.json's
`quantization_config` (config_groups, ignore, format, sparsity_config), as our own
stage=quantize / stage=prune write it and as llm-compressor does.

A scheme the engine cannot run is refused here, before any tensor is read, with the scheme and
the layer named.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

QUANT_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")
SPARSE_FORMATS = ("dense", "sparse-24-bitmask")


class UnsupportedSchemeError(ValueError):
    """A checkpoint's compression scheme that the engine does not run."""


@dataclass(frozen=True)
class LinearScheme:
    """How one linear's weight is stored. kind: "dense", "int8" (weight-only, per channel), "int4"
    (weight-only, per group), "w8a8_int8", "w8a8_fp8". sparse24: its weights are 2:4 sparse;
    bitmask: stored in the legacy sparse-24-bitmask layout (compressed, bitmask, shape)."""

    kind: str = "dense"
    format: str = "dense"
    group_size: int | None = None  # int8/int4: inputs per scale; None: one group (per channel)
    symmetric: bool = True
    per_tensor_scale: bool = False  # int8/fp8 weights with one scale for the whole tensor
    sparse24: bool = False
    bitmask: bool = False

    @property
    def quantized(self) -> bool:
        return self.kind != "dense"

    def describe(self) -> str:
        parts = [self.kind + (f" g{self.group_size}" if self.group_size else "")]
        if self.kind == "int4" and not self.symmetric:
            parts.append("asymmetric")
        if self.sparse24:
            parts.append("2:4")
        return " ".join(parts)


def matches(name: str, targets: list[str]) -> bool:
    """compressed-tensors' target matching for a linear: the class name "Linear", "re:<regex>"
    (re.match on the module name), or the exact module name."""
    for t in targets:
        if t == "Linear" or t == name or (t.startswith("re:") and re.match(t[3:], name)):
            return True
    return False


def _describe_args(args: dict[str, Any] | None) -> str:
    if not args:
        return "none"
    keys = ("type", "num_bits", "strategy", "group_size", "symmetric", "dynamic")
    return ", ".join(f"{k}={args.get(k)}" for k in keys if k in args)


def _weight_scheme(group: dict[str, Any], layer: str, fmt: str) -> LinearScheme:
    w = group.get("weights") or {}
    act = group.get("input_activations")
    what = f"weights ({_describe_args(w)}), input_activations ({_describe_args(act)}), format {fmt!r}"

    def refuse(why: str) -> UnsupportedSchemeError:
        return UnsupportedSchemeError(f"unsupported compressed-tensors scheme for layer {layer}: {why} [{what}]")

    if fmt not in QUANT_FORMATS:
        raise refuse(f"format {fmt!r} (supported: {', '.join(QUANT_FORMATS)})")
    if group.get("output_activations"):
        raise refuse("output activation quantization")
    if w.get("actorder") == "group":
        raise refuse("activation-order group indices (actorder=group)")
    kind, bits, strategy = w.get("type"), int(w.get("num_bits") or 0), w.get("strategy")
    symmetric = bool(w.get("symmetric", True))
    if act:
        if not act.get("dynamic") or act.get("strategy") != "token":
            raise refuse("only dynamic per-token activation quantization is supported")
        if not act.get("symmetric", True) or int(act.get("num_bits") or 0) != 8 or act.get("type") != kind:
            raise refuse("activations must be symmetric 8-bit of the weights' type")
        if bits != 8 or strategy not in ("channel", "tensor") or not symmetric:
            raise refuse("W8A8 needs symmetric 8-bit weights per channel or per tensor")
        return LinearScheme("w8a8_int8" if kind == "int" else "w8a8_fp8", fmt,
                            per_tensor_scale=strategy == "tensor")
    if kind == "int" and bits == 8 and strategy in ("channel", "tensor", "group") and symmetric:
        gs = int(w["group_size"]) if strategy == "group" else None
        return LinearScheme("int8", fmt, group_size=gs, per_tensor_scale=strategy == "tensor")
    if kind == "int" and bits == 4 and strategy in ("group", "channel"):
        gs = int(w["group_size"]) if strategy == "group" else None
        return LinearScheme("int4", fmt, group_size=gs, symmetric=symmetric)
    raise refuse("the engine runs weight-only int8 (symmetric, per channel or group), weight-only int4 (per group or "
                 "channel), and W8A8 int8/fp8 with dynamic per-token activations")


def linear_schemes(qcfg: dict[str, Any] | None, linears: list[str]) -> dict[str, LinearScheme]:
    """The scheme of every checkpoint linear name in `linears` (HF names, e.g.
    model.layers.0.self_attn.q_proj); dense where nothing applies."""
    schemes = {name: LinearScheme() for name in linears}
    if not qcfg:
        return schemes
    method = qcfg.get("quant_method", "compressed-tensors")
    if method != "compressed-tensors":
        raise UnsupportedSchemeError(f"unsupported quantization_config.quant_method {method!r} "
                                     "(the engine reads compressed-tensors checkpoints)")
    if qcfg.get("kv_cache_scheme"):
        raise UnsupportedSchemeError(f"unsupported kv_cache_scheme {qcfg['kv_cache_scheme']!r} (KV-cache quantization)")
    if qcfg.get("transform_config"):
        raise UnsupportedSchemeError("unsupported transform_config (rotations / Hadamard transforms)")
    ignore = list(qcfg.get("ignore") or [])
    top_format = qcfg.get("format")
    for gname, group in (qcfg.get("config_groups") or {}).items():
        targets = list(group.get("targets") or [])
        fmt = group.get("format") or top_format
        for name in linears:
            if schemes[name].quantized or not matches(name, targets) or matches(name, ignore):
                continue
            if fmt == "dense" and not group.get("weights"):
                continue
            schemes[name] = _weight_scheme(group, name, fmt)
    sparsity = qcfg.get("sparsity_config")
    if sparsity:
        fmt = sparsity.get("format", "dense")
        structure = str(sparsity.get("sparsity_structure", "unstructured"))
        targets, sp_ignore = list(sparsity.get("targets") or []), list(sparsity.get("ignore") or [])
        for name in linears:
            if not matches(name, targets) or matches(name, sp_ignore):
                continue
            if fmt not in SPARSE_FORMATS:
                raise UnsupportedSchemeError(f"unsupported sparsity format {fmt!r} for layer {name} "
                                             f"(supported: {', '.join(SPARSE_FORMATS)})")
            if fmt == "sparse-24-bitmask" and schemes[name].format == "pack-quantized":
                raise UnsupportedSchemeError(f"unsupported scheme for layer {name}: sparse-24-bitmask over "
                                             "pack-quantized weights")
            if structure == "2:4":
                s = schemes[name]
                schemes[name] = LinearScheme(s.kind, s.format, s.group_size, s.symmetric, s.per_tensor_scale,
                                             sparse24=True, bitmask=fmt == "sparse-24-bitmask")
            elif fmt != "dense":
                raise UnsupportedSchemeError(f"unsupported sparsity for layer {name}: format {fmt!r} with "
                                             f"structure {structure!r}")
    return schemes

"""Save and load models in the compressed-tensors format (what transformers and vLLM read).

Written by hand from the format's definition, so neither saving nor our own loading needs the
compressed-tensors package (only transformers' loader does):
- int4 and other sub-8-bit weights: format "pack-quantized": `weight_packed` int32 [out, in*b/32]
  (element i of a row at bits b*i.. of the stream, stored offset by 2^(b-1)), `weight_scale`
  [out, groups], `weight_shape` [2], and for asymmetric schemes `weight_zero_point` packed the
  same way along the output dimension.
- int8 weights (and W8A8): format "int-quantized": `weight` int8, `weight_scale`, optional
  `weight_zero_point` int8; W8A8 adds dynamic per-token int8 `input_activations`.
- fp8: format "float-quantized": `weight` float8_e4m3fn, `weight_scale` [out, 1], dynamic
  per-token fp8 activations.
- sparsity: `sparsity_config` metadata (format "dense": zeros stored in place, structure "2:4" or
  "unstructured", global sparsity, targets, ignore). compressed-tensors 0.20 no longer compresses
  sparse weights itself, so the dense layout is the one every reader understands.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from shrink.compress.modules import QuantLinear, set_module
from shrink.compress.quant import QuantSpec
from common.errors import ShrinkError

WEIGHTS_FILE = "model.safetensors"


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed b-bit codes [rows, cols] (int8) along dim 1 into int32 words, densely."""
    rows, cols = q.shape
    u = (q.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    total_bits = cols * bits
    words = math.ceil(total_bits / 32)
    out = torch.zeros(rows, words, dtype=torch.int64)
    pos = torch.arange(cols, dtype=torch.int64) * bits
    word, offset = pos // 32, pos % 32
    # Low part of each element.
    out.scatter_add_(1, word.expand(rows, -1), (u << offset) & 0xFFFFFFFF)
    spill = offset + bits - 32
    over = spill > 0
    if over.any():  # elements that cross a word boundary (bits not dividing 32)
        out.scatter_add_(1, (word[over] + 1).expand(rows, -1), u[:, over] >> (bits - spill[over]))
    out = torch.where(out >= 2**31, out - 2**32, out)  # reinterpret as signed int32
    return out.to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    rows = packed.shape[0]
    p = packed.to(torch.int64) & 0xFFFFFFFF
    pos = torch.arange(cols, dtype=torch.int64) * bits
    word, offset = pos // 32, pos % 32
    val = p[:, word] >> offset
    spill = offset + bits - 32
    over = spill > 0
    if over.any():
        val[:, over] |= p[:, word[over] + 1] << (bits - spill[over])
    val = val & ((1 << bits) - 1)
    return (val - (1 << (bits - 1))).to(torch.int8).view(rows, cols)


def _weight_args(m: QuantLinear) -> dict[str, Any]:
    if m.spec is None:
        return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "group_size": None,
                "dynamic": False, "actorder": None, "observer": "minmax"}
    grouped = m.spec.group_size is not None
    return {"num_bits": m.spec.bits, "type": "int", "symmetric": m.spec.symmetric,
            "strategy": "group" if grouped else "channel", "group_size": m.spec.group_size,
            "dynamic": False, "actorder": None, "observer": "minmax"}


def _act_args(m: QuantLinear) -> dict[str, Any] | None:
    if m.act is None:
        return None
    return {"num_bits": 8, "type": "float" if m.act == "fp8" else "int", "symmetric": True,
            "strategy": "token", "dynamic": True, "group_size": None, "observer": None}


def _format(m: QuantLinear) -> str:
    if m.spec is None:
        return "float-quantized"
    return "int-quantized" if m.spec.bits == 8 else "pack-quantized"


def compressed_state(m: QuantLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    codes = m.codes.detach().cpu()
    scale = m.scale.detach().cpu().to(dtype)
    fmt = _format(m)
    out: dict[str, torch.Tensor] = {"weight_scale": scale.contiguous()}
    if fmt == "pack-quantized":
        out["weight_packed"] = pack_int32(codes, m.spec.bits)
        out["weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
        if not m.spec.symmetric:
            zero = m.zero.detach().cpu().round().to(torch.int8)
            out["weight_zero_point"] = pack_int32(zero.t().contiguous(), m.spec.bits).t().contiguous()
    else:
        out["weight"] = codes.contiguous()
        if m.spec is not None and not m.spec.symmetric:
            out["weight_zero_point"] = m.zero.detach().cpu().round().to(torch.int8).contiguous()
    if m.bias is not None:
        out["bias"] = m.bias.detach().cpu().to(dtype)
    return out


def quantization_config(model: nn.Module, sparsity: dict[str, Any] | None) -> dict[str, Any] | None:
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))]
    cfg: dict[str, Any] = {"quant_method": "compressed-tensors", "version": "0.20.0"}
    if quant:
        schemes: dict[str, dict] = {}
        for name, m in quant.items():
            key = json.dumps([_weight_args(m), _act_args(m), _format(m)], sort_keys=True)
            schemes.setdefault(key, {"weights": _weight_args(m), "input_activations": _act_args(m),
                                     "output_activations": None, "format": _format(m), "names": []})
            schemes[key]["names"].append(name)
        single = len(schemes) == 1
        groups = {}
        for i, s in enumerate(schemes.values()):
            names = s.pop("names")
            groups[f"group_{i}"] = {"targets": ["Linear"] if single else names, **s}
        formats = sorted({g["format"] for g in groups.values()})
        cfg.update({"config_groups": groups, "format": formats[0] if len(formats) == 1 else "mixed-precision",
                    "quantization_status": "compressed", "ignore": [n for n in linears if n not in quant],
                    "kv_cache_scheme": None, "global_compression_ratio": None})
    else:
        cfg.update({"config_groups": {}, "format": "dense", "quantization_status": "compressed", "ignore": []})
    if sparsity:
        cfg["sparsity_config"] = {"format": "dense", "sparsity_structure": sparsity["structure"],
                                  "global_sparsity": sparsity["global_sparsity"],
                                  "targets": sparsity["targets"],
                                  "ignore": [n for n in linears if n not in sparsity["targets"]],
                                  "registry_requires_subclass": False}
    if not quant and not sparsity:
        return None
    return cfg


def model_state(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor to save: compressed linears in the format's names, the rest cast to `dtype`.
    Tied tensors (lm_head = embed_tokens) are saved once, under the first name."""
    state: dict[str, torch.Tensor] = {}
    quant_prefixes = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            quant_prefixes.append(name + ".")
            for k, v in compressed_state(m, dtype).items():
                state[f"{name}.{k}"] = v
    seen: set[int] = set()
    for k, v in model.state_dict(keep_vars=False).items():
        if any(k.startswith(p) for p in quant_prefixes):
            continue
        ptr = v.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        v = v.detach().cpu()
        state[k] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
    return state


def save_compressed(model: nn.Module, directory: Path, *, dtype: torch.dtype = torch.bfloat16,
                    sparsity: dict[str, Any] | None = None, tokenizer: Any = None) -> None:
    """Write config.json (with quantization_config), model.safetensors, generation config and
    tokenizer into `directory`. `sparsity`: {"structure", "global_sparsity", "targets"}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(model_state(model, dtype), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    qcfg = quantization_config(model, sparsity)
    if qcfg is not None:
        config["quantization_config"] = qcfg
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def read_quantization_config(directory: Path) -> dict[str, Any] | None:
    cfg = json.loads((Path(directory) / "config.json").read_text())
    return cfg.get("quantization_config")


def _spec(args: dict[str, Any]) -> QuantSpec | None:
    if args.get("type") == "float":
        return None
    return QuantSpec(int(args["num_bits"]), args.get("group_size") if args.get("strategy") == "group" else None,
                     bool(args.get("symmetric", True)))


def _scheme_for(name: str, groups: dict[str, Any], ignore: list[str]) -> dict[str, Any] | None:
    if name in ignore:
        return None
    for g in groups.values():
        if "Linear" in g["targets"] or name in g["targets"]:
            return g
    return None


def model_skeleton(directory: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of a directory's config.json on the meta device: its modules and shapes, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ShrinkError(f"not a model directory (no config.json): {directory}")
    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_compressed(directory: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    """Our own reader (no compressed-tensors needed): the model with QuantLinear modules where the
    file holds quantized weights, and plain dense weights elsewhere (sparse zeros included)."""
    directory = Path(directory)
    model = model_skeleton(directory, dtype)
    config = model.config
    qcfg = read_quantization_config(directory) or {}
    state = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(f)))
    groups, ignore = qcfg.get("config_groups", {}), qcfg.get("ignore", [])
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        scheme = _scheme_for(name, groups, ignore)
        if scheme is None or f"{name}.weight_scale" not in state:
            continue
        spec = _spec(scheme["weights"])
        act = scheme.get("input_activations")
        act_kind = None if not act else ("fp8" if act.get("type") == "float" else "int8")
        scale = state.pop(f"{name}.weight_scale").float()
        zero = None
        if scheme["format"] == "pack-quantized":
            out_f, in_f = (int(v) for v in state.pop(f"{name}.weight_shape"))
            codes = unpack_int32(state.pop(f"{name}.weight_packed"), spec.bits, in_f)
            zp = state.pop(f"{name}.weight_zero_point", None)
            if zp is not None:
                zero = unpack_int32(zp.t().contiguous(), spec.bits, out_f).t().float()
        else:
            codes = state.pop(f"{name}.weight")
            zp = state.pop(f"{name}.weight_zero_point", None)
            zero = zp.float() if zp is not None else None
        bias = state.pop(f"{name}.bias", None)
        set_module(model, name, QuantLinear(codes, scale, zero, spec, bias, act_kind, dtype))
    model.load_state_dict({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()},
                          strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    missing += [n for n, b in model.named_buffers() if b.is_meta]
    if missing:
        # Non-persistent buffers (rotary inv_freq) are rebuilt by re-running their init on CPU.
        _rebuild_buffers(model, config, dtype)
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise ShrinkError(f"{directory}: tensors missing from the checkpoint: {missing[:5]}")
    return model.to(device).eval()


def _rebuild_buffers(model: nn.Module, config: Any, dtype: torch.dtype) -> None:
    for name, mod in list(model.named_modules()):
        if any(b.is_meta for b in mod.buffers(recurse=False)) and not isinstance(mod, QuantLinear):
            fresh = type(mod)(config=config) if "rotary" in type(mod).__name__.lower() else None
            if fresh is None:
                raise ShrinkError(f"cannot rebuild buffers of {name} ({type(mod).__name__})")
            set_module(model, name, fresh)


def sparsity_masks(model: nn.Module, directory: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """Keep masks (weight != 0) of the linears a saved artifact declares sparse, and the structure."""
    qcfg = read_quantization_config(directory) or {}
    sp = qcfg.get("sparsity_config") or {}
    targets = sp.get("targets") or []
    masks = {}
    for name in targets:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue
        masks[name] = (mod.weight.detach() != 0).cpu()
    return masks, sp.get("sparsity_structure")


def is_quantized(directory: Path) -> bool:
    qcfg = read_quantization_config(directory) or {}
    return bool(qcfg.get("config_groups"))


def sparsity_metadata(masks: dict[str, torch.Tensor], structure: str) -> dict[str, Any]:
    """What `save_compressed(sparsity=...)` records, from the keep masks of the sparse linears."""
    total = sum(m.numel() for m in masks.values())
    zeros = sum(int((~m).sum()) for m in masks.values())
    return {"structure": structure, "global_sparsity": zeros / max(total, 1), "targets": sorted(masks)}

"""Methods built by name from their settings, and the order a recipe must follow.

A quantization recipe is an ordered list: transforms (smoothquant, awq) first, then one weight
quantizer (rtn, gptq, fp8), e.g. [smoothquant, gptq] for W8A8 with GPTQ weights or [awq, rtn] for
the AWQ paper's method; all of it runs in one calibration pass. Pruning takes one pruner.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping, Sequence, get_type_hints

from common.errors import SettingError, check_type
from shrink.compress.methods import METHODS
from shrink.compress.methods.base import KINDS, CompressionMethod, Pruner, WeightQuantizer
from shrink.compress.quant import QuantSpec
from shrink.compress.sparsity import SparsitySpec


def method_names(*kinds: str) -> list[str]:
    return [n for n in METHODS.names() if METHODS.get(n).kind in kinds]


def options_of(cls: type[CompressionMethod]) -> list[str]:
    """A method's own settings: its fields beyond those its kind shares."""
    shared = {f.name for f in fields(KINDS[cls.kind])}
    return [f.name for f in fields(cls) if f.init and f.name not in shared]


def build_method(name: str, options: Mapping[str, Any] | None, *, setting: str, kinds: Sequence[str],
                 **shared: Any) -> CompressionMethod:
    """Method `name` (listed under `setting`) with `options` (its own section) and the `shared`
    settings of its kind (scheme, spec, true_sequential) that it takes."""
    known = method_names(*kinds)
    if name not in known:
        what = "unknown" if name not in METHODS.names() else f"not a {' or '.join(kinds)} method:"
        raise SettingError(setting, f"{what} {name!r}; known: {', '.join(known)}")
    cls = METHODS.get(name)
    own = options_of(cls)
    values = dict(options or {})
    unknown = sorted(set(values) - set(own))
    if unknown:
        raise SettingError(f"{name}.{unknown[0]}", f"not a setting of {name}; known: {', '.join(own) or 'none'}")
    hints = get_type_hints(cls)
    values = {k: check_type(v, hints[k], f"{name}.{k}") for k, v in values.items()}
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in shared.items() if k in names}, **values)


def pruning_method(name: str, options: Mapping[str, Any] | None, spec: SparsitySpec,
                   true_sequential: bool = True) -> Pruner:
    return build_method(name, options, setting="method", kinds=("prune",), spec=spec, true_sequential=true_sequential)


def quantization_recipe(names: Sequence[str], options: Mapping[str, Mapping[str, Any]], scheme: QuantSpec,
                        true_sequential: bool = True) -> list[CompressionMethod]:
    """The recipe's methods in order, checked: transforms, then one weight quantizer, which takes
    the activation quantization its transforms call for (SmoothQuant: int8)."""
    names = list(names)
    if len(set(names)) != len(names):
        raise SettingError("recipe", f"{names} names a method twice")
    methods = [build_method(n, options.get(n), setting="recipe", kinds=("transform", "quantize"), scheme=scheme,
                            true_sequential=true_sequential) for n in names]
    quantizers = method_names("quantize")
    if not methods or methods[-1].kind != "quantize" or any(m.kind != "transform" for m in methods[:-1]):
        raise SettingError("recipe", f"{names}: expected transforms ({', '.join(method_names('transform'))}) then "
                                     f"one weight quantizer ({', '.join(quantizers)}), e.g. [gptq] or [smoothquant, gptq]")
    quantizer: WeightQuantizer = methods[-1]
    for transform in methods[:-1]:
        transform.check_quantizer(quantizer)
        if transform.activations is not None:
            quantizer.activations = transform.activations
    return methods



"""Config (prune.* / quantize.*) -> algorithm objects, with errors that name the config key."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from shrink.compress.calib_data import CalibConfig
from shrink.compress.prune_methods import PruneMethod
from shrink.compress.quant import QuantSpec
from shrink.compress.quant_methods import QuantMethod
from shrink.compress.sparsity import SparsitySpec
from common.errors import ShrinkError


def _get(cfg: Any, key: str, prefix: str, cast=None):
    if key not in cfg:
        raise ShrinkError(f"{prefix}.{key} is missing")
    value = cfg[key]
    if cast is None or value is None:
        return value
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise ShrinkError(f"{prefix}.{key}: cannot read {value!r} as {cast.__name__}") from None


def calib_config(cfg: Any, prefix: str) -> CalibConfig:
    c = _get(cfg, "calibration", prefix)
    p = f"{prefix}.calibration"
    return CalibConfig(source=str(_get(c, "source", p)), num_samples=_get(c, "num_samples", p, int),
                       seq_len=_get(c, "seq_len", p, int), seed=_get(c, "seed", p, int),
                       batch_size=_get(c, "batch_size", p, int))


def skip_list(cfg: Any, prefix: str) -> list[str]:
    skip = _get(cfg, "skip", prefix)
    if OmegaConf.is_config(skip):
        skip = OmegaConf.to_object(skip)
    if not isinstance(skip, (list, tuple)) or not all(isinstance(s, str) for s in skip):
        raise ShrinkError(f"{prefix}.skip must be a list of module name patterns (got {skip!r})")
    return list(skip)


def prune_method(cfg: DictConfig) -> PruneMethod:
    p = "prune"
    spec = SparsitySpec(structure=str(_get(cfg, "structure", p)), ratio=_get(cfg, "ratio", p, float))
    return PruneMethod(method=str(_get(cfg, "method", p)), spec=spec, damp=_get(cfg, "damp", p, float),
                       block_size=_get(cfg, "block_size", p, int),
                       true_sequential=bool(_get(cfg, "true_sequential", p)))


def quant_method(cfg: DictConfig) -> QuantMethod:
    p = "quantize"
    group = _get(cfg, "group_size", p)
    if group is not None:
        group = _get(cfg, "group_size", p, int)
    spec = QuantSpec(bits=_get(cfg, "bits", p, int), group_size=group, symmetric=bool(_get(cfg, "symmetric", p)))
    return QuantMethod(method=str(_get(cfg, "method", p)), spec=spec, damp=_get(cfg, "damp", p, float),
                       act_order=bool(_get(cfg, "act_order", p)), block_size=_get(cfg, "block_size", p, int),
                       awq_grid=_get(cfg, "awq_grid", p, int), awq_max_tokens=_get(cfg, "awq_max_tokens", p, int),
                       alpha=_get(cfg, "alpha", p, float), true_sequential=bool(_get(cfg, "true_sequential", p)))

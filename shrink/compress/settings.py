"""The prune.* and quantize.* config sections -> typed settings. Errors name the setting within
the section; the stage reads them inside `config_section(...)`, which adds the section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from common.errors import SettingError, ShrinkError, check_type
from shrink.compress.calib_data import CalibConfig
from shrink.compress.compress_artifact import CompressionSettings
from shrink.compress.methods.base import CompressionMethod
from shrink.compress.quant import QuantSpec
from shrink.compress.recipe import pruning_method, quantization_recipe
from shrink.compress.sparsity import SparsitySpec
from shrink.modeling import resolve_dtype


def _get(cfg: Any, key: str, kind: type | None = None, *, where: str = "", optional: bool = False) -> Any:
    setting = f"{where}{key}"
    if key not in cfg:
        raise SettingError(setting, "is missing")
    value = cfg[key]
    if kind is None or (optional and value is None):
        return value
    return check_type(value, kind, setting)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def method_options(cfg: Any, name: str) -> dict[str, Any]:
    """The section named like a method (quantize.gptq: {damp: ...}); absent means its defaults."""
    options = _plain(cfg.get(name)) if name in cfg else None
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise SettingError(name, f"must be a mapping of {name}'s settings (got {options!r})")
    return options


def calib_config(cfg: Any) -> CalibConfig:
    c = _get(cfg, "calibration")
    w = "calibration."
    return CalibConfig(source=str(_get(c, "source", where=w)), num_samples=_get(c, "num_samples", int, where=w),
                       seq_len=_get(c, "seq_len", int, where=w), seed=_get(c, "seed", int, where=w),
                       batch_size=_get(c, "batch_size", int, where=w))


def skip_list(cfg: Any) -> list[str]:
    skip = _plain(_get(cfg, "skip"))
    if not isinstance(skip, (list, tuple)) or not all(isinstance(s, str) for s in skip):
        raise SettingError("skip", f"must be a list of module name patterns (got {skip!r})")
    return list(skip)


def _compression(cfg: Any, recipe: list[CompressionMethod]) -> CompressionSettings:
    try:
        dtype = resolve_dtype(str(_get(cfg, "save_dtype")))
    except ShrinkError as e:
        raise SettingError("save_dtype", str(e)) from None
    return CompressionSettings(recipe=recipe, skip=skip_list(cfg), on_indivisible=str(_get(cfg, "on_indivisible")),
                               calibration=calib_config(cfg), save_dtype=dtype)


def prune_settings(cfg: Any) -> CompressionSettings:
    spec = SparsitySpec(structure=str(_get(cfg, "structure")), ratio=_get(cfg, "ratio", float))
    name = str(_get(cfg, "method"))
    method = pruning_method(name, method_options(cfg, name), spec, _get(cfg, "true_sequential", bool))
    return _compression(cfg, [method])


def recipe_names(cfg: Any) -> list[str]:
    """`recipe: [smoothquant, gptq]`, or one name (`quantize.recipe=rtn`)."""
    names = _plain(_get(cfg, "recipe"))
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise SettingError("recipe", f"must be a method name or a list of them, e.g. [smoothquant, gptq] (got {names!r})")
    return names


def quantize_settings(cfg: Any) -> CompressionSettings:
    scheme = QuantSpec(bits=_get(cfg, "bits", int), group_size=_get(cfg, "group_size", int, optional=True),
                       symmetric=_get(cfg, "symmetric", bool))
    names = recipe_names(cfg)
    recipe = quantization_recipe(names, {n: method_options(cfg, n) for n in names}, scheme,
                                 _get(cfg, "true_sequential", bool))
    return _compression(cfg, recipe)


def stage_data_dir(ctx: Any) -> Path | None:
    """The run's shared data directory (StageContext carries it)."""
    return ctx.data_dir


def stage_cache_dir(ctx: Any) -> Path:
    """The run's cache directory (StageContext carries it)."""
    return ctx.cache_dir

"""Stage registry. A stage is a module in this package with a function decorated by
`@register_stage("name")`, taking `(cfg, ctx)` and returning an Artifact. Modules are imported
on first lookup, so adding a stage is adding a file (and its conf/stage/<name>.yaml)."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

from shrink.errors import ShrinkError

StageFn = Callable[..., "Artifact"]  # noqa: F821
_REGISTRY: dict[str, StageFn] = {}
_loaded = False


def register_stage(name: str) -> Callable[[StageFn], StageFn]:
    def wrap(fn: StageFn) -> StageFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise RuntimeError(f"stage {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _loaded = True


def get_stage(name: str) -> StageFn:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ShrinkError(f"unknown stage {name!r}; known stages: {', '.join(sorted(_REGISTRY))}") from None


def stage_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)

"""Distillation losses, one file per family, each registered by name.

A loss is a small object called as `loss(student, teacher, labels, mask)` on one chunk of
tokens: `student` and `teacher` are fp32 logits [n, vocab], `labels` the next-token ids [n],
`mask` a bool [n] of the tokens that count. It returns the SUM over masked tokens, so chunks add
up; the caller divides by the number of tokens.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

from shrink.errors import ShrinkError

_REGISTRY: dict[str, Callable[..., Any]] = {}
_loaded = False


def register_loss(name: str):
    def wrap(cls):
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _loaded = True


def make_loss(name: str, **kwargs: Any):
    _load_all()
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ShrinkError(f"unknown loss {name!r} in distill.losses; known: {', '.join(sorted(_REGISTRY))}") from None
    return cls(**kwargs)


def loss_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)

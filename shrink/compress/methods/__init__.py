"""Compression methods, one class per file, registered by name (after llm-compressor's modifiers).

A method is a dataclass implementing the calibration driver's `BlockMethod` protocol; its own
fields beyond the shared ones of its kind (see base.py) are its settings, read from the config
section named like it (`quantize.gptq.damp`). Adding a method is adding a file here with an
`@register_method("name")` class; `recipe.py` builds methods by name and checks their order.
"""

from __future__ import annotations

from typing import Callable

from common.registry import Registry

METHODS: Registry[type] = Registry("compression method", __name__, __path__)


def register_method(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        cls.name = name
        return METHODS.register(name)(cls)

    return wrap

"""A bad value of one named setting, raised by library code that knows the setting's name but not
where the user wrote it; `config_section` adds the section once, where the config is read."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

from common.errors import ShrinkError


class SettingError(ShrinkError):
    def __init__(self, setting: str, message: str) -> None:
        self.setting, self.message = setting, message
        super().__init__(f"{setting}: {message}")


@contextmanager
def config_section(section: str) -> Iterator[None]:
    """Re-raise a SettingError from inside as `section.setting: message` (e.g. quantize.group_size)."""
    try:
        yield
    except SettingError as e:
        raise ShrinkError(f"{section}.{e.setting}: {e.message}") from None


def check_type(value: object, kind: type, setting: str) -> object:
    """`value` as a `kind` (bool, int, float: finite; int accepted as float), or a SettingError."""
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
          str: isinstance(value, str)}
    if kind in ok and not ok[kind]:
        article = "a finite " if kind is float else "an " if kind is int else "a "
        raise SettingError(setting, f"expected {article}{kind.__name__}, got {value!r}")
    return float(value) if kind is float else value

"""The user errors of shrink. The CLI prints them as a single line.

Library code that checks one named setting raises a SettingError with the setting's own name only
("lr", "losses.forward_kl"); where the config is read, `config_section` puts the section in front
once ("distill.lr must be > 0, got 0"), so no library function threads config-key prefixes."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator


class ShrinkError(Exception):
    """A problem the user can fix (bad config value, missing or corrupt file, bad data)."""


class SettingError(ShrinkError):
    """A bad value of the setting `setting`; the line reads `setting{sep}message` (sep ": " or, for a
    sentence that goes on from the name, " ": "lr must be > 0")."""

    def __init__(self, setting: str, message: str, sep: str = ": ") -> None:
        self.setting, self.message, self.sep = setting, message, sep
        super().__init__(f"{setting}{sep}{message}")

    def in_section(self, section: str) -> "SettingError":
        """The same error, its setting named from `section` (e.g. losses.jsd.beta inside distill)."""
        return SettingError(f"{section}.{self.setting}", self.message, self.sep)


@contextmanager
def config_section(section: str) -> Iterator[None]:
    """Re-raise a SettingError from inside as one ShrinkError `section.setting: message`
    (e.g. quantize.group_size); an inner config_section has already named its section."""
    try:
        yield
    except SettingError as e:
        raise ShrinkError(str(e.in_section(section))) from None


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

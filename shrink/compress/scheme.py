"""The integer weight scheme (QuantSpec) and the training knob that trains onto one (`qat`), without torch:
`python -m shrink` checks its config before it imports torch (shrink/config_check.py), and both are checked
there. The grid math that uses a QuantSpec is shrink/compress/quant.py's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.errors import SettingError, check_type


@dataclass(frozen=True)
class QuantSpec:
    """How one weight matrix is quantized. group_size None means one scale per output channel."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise SettingError("bits", f"must be one of 2, 3, 4, 8 (got {self.bits})")
        if self.group_size is not None and self.group_size < 1:
            raise SettingError("group_size", f"must be >= 1 or null (got {self.group_size})")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else in_features // self.group_size

    def fits(self, in_features: int) -> bool:
        return self.group_size is None or in_features % self.group_size == 0

    def describe(self) -> str:
        """`int4 g64 symmetric`, as log lines name a scheme."""
        group = "per channel" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits} {group} {'symmetric' if self.symmetric else 'asymmetric'}"


QAT_KEYS = ("bits", "group_size", "symmetric", "start")


@dataclass(frozen=True)
class QATSettings:
    """The training knob `qat` (conf/train/default.yaml), read: the scheme the quantize stage will use, and
    `start`, the fraction of the run's optimizer steps trained before fake quantization switches on."""

    spec: QuantSpec
    start: float = 0.0

    @classmethod
    def from_cfg(cls, raw: Any) -> "QATSettings | None":
        """None for `qat: null`; else checked, a SettingError naming `qat.<key>` (the caller's config_section
        names the training section: distill, gqa.train, prune.finetune)."""
        if raw is None:
            return None
        if hasattr(raw, "items") and not isinstance(raw, dict):  # an OmegaConf node
            from omegaconf import OmegaConf

            raw = OmegaConf.to_container(raw, resolve=True)
        if not isinstance(raw, dict):
            raise SettingError("qat", f"expected null or a mapping {{bits, group_size, symmetric, start}}, got {raw!r}")
        unknown = sorted(set(raw) - set(QAT_KEYS))
        if unknown:
            raise SettingError("qat", f"unknown keys {unknown} (known: {', '.join(QAT_KEYS)})")
        for key in ("bits", "group_size", "symmetric"):
            if key not in raw:
                raise SettingError(f"qat.{key}", "is missing: give the quantize stage's scheme (quantize.bits, "
                                                 "quantize.group_size, quantize.symmetric)", sep=" ")
        bits = check_type(raw["bits"], int, "qat.bits")
        group_size = raw["group_size"] if raw["group_size"] is None else check_type(raw["group_size"], int,
                                                                                      "qat.group_size")
        symmetric = check_type(raw["symmetric"], bool, "qat.symmetric")
        start = check_type(raw.get("start", 0.0), float, "qat.start")
        if not 0.0 <= start < 1.0:
            raise SettingError("qat.start", f"must be in [0, 1) (a fraction of the optimizer steps), got {start}",
                               sep=" ")
        try:
            spec = QuantSpec(bits, group_size, symmetric)
        except SettingError as e:
            raise e.in_section("qat") from None
        return cls(spec, start)

    def start_step(self, max_steps: int) -> int:
        """The first optimizer step (0-based) that trains fake-quantized: always before the run ends."""
        return min(int(self.start * max_steps), max_steps - 1)

    def record(self) -> dict[str, Any]:
        return {"bits": self.spec.bits, "group_size": self.spec.group_size, "symmetric": self.spec.symmetric,
                "start": self.start}

"""One validation pass over the composed config, before any stage starts: every typed key has a value
of its type (integers are integers, numbers are finite) and a sensible range, so a bad value is one
line naming the key, never a traceback after the models load."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from common.errors import SettingError, ShrinkError, config_section
from eval.settings import HarnessSettings
from shrink.compress.scheme import QATSettings
from train.config import TrainConfig, check_head_config, check_value

TOP_LEVEL: dict[str, Any] = {"run": str, "input": str | None, "device": str, "seed": int, "resume": bool,
                             "data_dir": str | None, "cache_dir": str | None}
DATA: dict[str, Any] = {"source": str, "text_field": str, "block_size": int, "val_fraction": float,
                        "max_docs": int | None, "seed": int}
EVAL: dict[str, Any] = {"context": int, "stride": int, "max_windows": int | None, "datasets": list,
                        "batch_size": int, "dtype": str}
GQA: dict[str, Any] = {"kv_heads": int | None, "tokens": int | None, "budget_fraction": float}
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _check_types(cfg: DictConfig, schema: dict[str, Any]) -> None:
    for key, hint in schema.items():
        if key in cfg:
            value = cfg[key]
            plain = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            check_value(key, plain, hint)


def _at_least(key: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise ShrinkError(f"{key} must be >= {low}, got {value}")


@dataclass(frozen=True)
class MedusaSettings:
    """The `distill.medusa` mapping: how many heads, residual blocks per head, and the held-out share of
    the teacher's samples. Here, not in shrink/medusa_distill.py (torch), so the config check needs no torch."""

    num_heads: int = 4
    num_layers: int = 1
    val_fraction: float = 0.05

    @classmethod
    def from_cfg(cls, raw: Any) -> "MedusaSettings":
        """Checked; a SettingError names `medusa.<key>` (the caller's config_section names distill)."""
        if OmegaConf.is_config(raw):
            raw = OmegaConf.to_container(raw, resolve=True)
        if not isinstance(raw, dict):
            raise SettingError("medusa", f"expected a mapping {{num_heads: .., num_layers: .., val_fraction: ..}}, "
                                         f"got {raw!r}")
        known = cls.__dataclass_fields__
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise SettingError("medusa", f"unknown keys {unknown} (known: {', '.join(known)})")
        hints = {"num_heads": int, "num_layers": int, "val_fraction": float}
        for key, value in raw.items():
            check_value(f"medusa.{key}", value, hints[key])
        s = cls(**raw)
        for key in ("num_heads", "num_layers"):
            if getattr(s, key) < 1:
                raise SettingError(f"medusa.{key}", f"must be >= 1, got {getattr(s, key)}", sep=" ")
        if not 0.0 < s.val_fraction < 1.0:
            raise SettingError("medusa.val_fraction", f"must be in (0, 1), got {s.val_fraction}", sep=" ")
        return s


def gqa_train_config(gcfg: DictConfig, tokens: int, block_size: int, seed: int) -> TrainConfig:
    """gqa.train as a TrainConfig whose max_steps spend `tokens`. Here, not in the stage (which imports
    torch), so that the config check runs before torch is imported."""
    values = OmegaConf.to_container(gcfg.train, resolve=True)
    known = set(TrainConfig.__dataclass_fields__) - {"max_steps", "seed"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ShrinkError(f"gqa.train: unknown keys {unknown} (known: {sorted(known)})")
    with config_section("gqa.train"):
        tc = TrainConfig.from_cfg({**values, "max_steps": 1}, seed=seed, block_size=block_size)
    tc.max_steps = max(1, math.ceil(tokens / (tc.batch_size * tc.grad_accum * block_size)))
    return tc


def check_config(cfg: DictConfig) -> None:
    """Raise a ShrinkError for the first bad value (types first, then ranges)."""
    _check_types(cfg, TOP_LEVEL)
    if not DEVICE.fullmatch(str(cfg.device)):
        raise ShrinkError(f"device={cfg.device}: expected auto, cpu, cuda or cuda:N")
    run = Path(str(cfg.run)).expanduser()
    if run.exists() and not run.is_dir():
        raise ShrinkError(f"run={cfg.run} is a file, not a directory")
    with config_section("data"):
        _check_types(cfg.data, DATA)
    _at_least("data.block_size", cfg.data.block_size, 2)
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ShrinkError(f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}")
    _at_least("data.max_docs", cfg.data.get("max_docs"), 1)
    with config_section("eval"):
        _check_types(cfg.eval, EVAL)
    _at_least("eval.context", cfg.eval.context, 2)
    if not 1 <= cfg.eval.stride <= cfg.eval.context:
        raise ShrinkError(f"eval.stride must be in [1, eval.context={cfg.eval.context}], got {cfg.eval.stride}")
    _at_least("eval.max_windows", cfg.eval.max_windows, 1)
    HarnessSettings.from_dict(OmegaConf.to_container(cfg.eval, resolve=True))
    seed, block_size = int(cfg.seed), int(cfg.data.block_size)
    with config_section("distill"):
        tc = TrainConfig.from_cfg(cfg.distill, seed=seed, block_size=block_size)
        QATSettings.from_cfg(tc.qat)
        if cfg.distill.get("medusa") is not None:
            check_head_config(tc, MedusaSettings.from_cfg(cfg.distill.medusa).num_heads, block_size)
            stages = [str(n) for n in cfg.stage.get("stages", [])]
            later = stages[stages.index("distill") + 1 :] if "distill" in stages else []
            if any(n != "eval" for n in later):
                raise ShrinkError(f"distill=medusa trains Medusa heads (a drafter for the teacher), not a model the "
                                  f"pipeline's later stages ({', '.join(n for n in later if n != 'eval')}) can take: "
                                  f"run it alone, `stage=distill distill=medusa`")
    with config_section("gqa"):
        _check_types(cfg.gqa, GQA)
    with config_section("gqa.train"):
        QATSettings.from_cfg(gqa_train_config(cfg.gqa, 1, block_size, seed).qat)
    from common.paths import data_dir
    from shrink.quality_gate import GateSettings

    GateSettings.from_cfg(cfg).check_text(data_dir(cfg))
    if cfg.data.get("teacher_generated"):
        from shrink.teacher_data import TeacherDataSettings

        TeacherDataSettings.from_cfg(cfg.data.teacher_generated, seed)
    if "finetune" in cfg.get("prune", {}):
        with config_section("prune.finetune"):
            QATSettings.from_cfg(TrainConfig.from_cfg(cfg.prune.finetune, seed=seed, block_size=block_size).qat)

"""Quality gates: each model-changing stage records its input's and output's perplexity on a fixed
small held-out set (the first `gates.windows` windows of `gates.context` tokens of `gates.text`: the run's
held-out split, or WikiText-2's test split under data_dir, the project's reference text) under
`metrics.quality_gate` of its shrink.json, and warns or stops (`gates.action`) when the
ratio output/input exceeds the stage's budget `gates.max_ppl_ratio.<stage>`. With `gates.action=revert`
the pipeline instead goes on from the stage's input, as if the stage had not run; the over-budget
artifact stays in the run, marked `reverted` in its record, for the report and for inspection, and no
later stage reads it."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from omegaconf import DictConfig, OmegaConf

from common.errors import ShrinkError
from common.paths import WIKITEXT_FILE
from shrink.artifacts import META_FILE, Artifact

if TYPE_CHECKING:  # torch where a gate measures: the config check (GateSettings) runs before torch is imported
    import torch

GATED_STAGES = ("distill", "gqa", "prune", "quantize")
ACTIONS = ("warn", "stop", "revert")
# The gate's text: the run's held-out split (in the training data's distribution: a student distilled on it can
# look as good as its teacher there and far worse on other text) or WikiText-2 (eval/perplexity.py's protocol:
# `experiment=smallest` passed every held-out gate and ended at 9x the teacher on WikiText-2, BENCHMARKS.md,
# twenty-fifth session).
TEXTS = ("heldout", "wikitext2")
METRIC_KEY = "quality_gate"


@dataclass(frozen=True)
class GateSettings:
    enabled: bool
    action: str
    windows: int
    context: int
    budgets: dict[str, float | None]
    text: str = "heldout"

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> "GateSettings":
        g = cfg.get("gates") or {}
        action = str(g.get("action", "warn"))
        if action not in ACTIONS:
            raise ShrinkError(f"gates.action={action!r}: expected warn, stop or revert")
        text = str(g.get("text", "heldout"))
        if text not in TEXTS:
            raise ShrinkError(f"gates.text={text!r}: expected {' or '.join(TEXTS)}")
        windows, context = int(g.get("windows", 4)), int(g.get("context", 256))
        if windows < 1:
            raise ShrinkError(f"gates.windows must be >= 1, got {windows}")
        if context < 2:
            raise ShrinkError(f"gates.context must be >= 2, got {context}")
        raw = g.get("max_ppl_ratio") or {}
        raw = OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_config(raw) else dict(raw)
        unknown = sorted(set(raw) - set(GATED_STAGES))
        if unknown:
            raise ShrinkError(f"gates.max_ppl_ratio: unknown stages {unknown} (known: {', '.join(GATED_STAGES)})")
        budgets: dict[str, float | None] = {}
        for stage, value in raw.items():
            if value is not None and not (isinstance(value, (int, float)) and float(value) > 0):
                raise ShrinkError(f"gates.max_ppl_ratio.{stage} must be a number > 0 or null, got {value!r}")
            budgets[stage] = None if value is None else float(value)
        return cls(bool(g.get("enabled", True)), action, windows, context, budgets, text)

    def check_text(self, data_dir: Path | None) -> None:
        """Before any work: the WikiText-2 file gates.text=wikitext2 reads is there."""
        if not self.enabled or self.text != "wikitext2":
            return
        if data_dir is None or not (data_dir / WIKITEXT_FILE).is_file():
            where = "no data_dir (data_dir=, $SHRINK_DATA_DIR or ../shared/data)" if data_dir is None else \
                f"{data_dir / WIKITEXT_FILE} is missing"
            raise ShrinkError(f"gates.text=wikitext2 needs WikiText-2's test split: {where}; or gates.text=heldout")


def gate_ids(cfg: DictConfig, tokenizer: Any, settings: GateSettings) -> torch.Tensor:
    """The fixed gate text: the first windows x context tokens of the run's held-out split, or of
    WikiText-2's test split as eval/perplexity.py reads it (no BOS)."""
    from common.paths import data_dir
    from shrink.context import cache_dir

    if settings.text == "wikitext2":
        from eval.perplexity import encode, wikitext2_text

        ids = encode(tokenizer, wikitext2_text(data_dir(cfg)))
    else:
        from train.data import load_packed

        ids = load_packed(cfg.data, tokenizer, data_dir(cfg), cache_dir(cfg)).val.reshape(-1)
    if ids.numel() < settings.context:
        raise ShrinkError(f"gates: the {settings.text} text has {ids.numel()} tokens, fewer than gates.context="
                          f"{settings.context}")
    return ids[: settings.windows * settings.context]


def gate_key(ids: torch.Tensor, settings: GateSettings) -> str:
    """Identifies the measurement: the exact tokens and the window size."""
    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
    return f"{digest}:{settings.context}"


def measure_ppl(art: Artifact, ids: torch.Tensor, context: int) -> float:
    import torch

    from eval.perplexity import perplexity
    from shrink.modeling import load_model

    model = load_model(art, dtype="fp32", device="cpu" if not torch.cuda.is_available() else "cuda")
    try:
        return perplexity(model, ids, context=context, stride=context).ppl
    finally:
        del model


def recorded_output_ppl(art: Artifact, key: str) -> float | None:
    """An artifact's gated perplexity when an earlier gate measured it on the same text."""
    rec = art.metrics.get(METRIC_KEY) or {}
    return float(rec["output_ppl"]) if rec.get("key") == key and rec.get("output_ppl") else None


def record_metrics(art: Artifact, key: str, value: dict) -> None:
    """Add metrics[key] to the artifact's shrink.json in place (atomically; the model files, and so the
    content hash, are untouched)."""
    art.meta.setdefault("metrics", {})[key] = value
    path = art.path / META_FILE
    tmp = path.with_name(f"{META_FILE}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(art.meta, indent=2, default=str))
    os.replace(tmp, path)


def gate_stage(cfg: DictConfig, stage: str, source: Artifact, output: Artifact,
               measure: Callable[[Artifact, torch.Tensor, int], float] = measure_ppl) -> dict | None:
    """Measure, record and judge one stage; returns the record (None: not gated)."""
    settings = GateSettings.from_cfg(cfg)
    if not settings.enabled or stage not in GATED_STAGES:
        return None
    from common.medusa import is_medusa_dir

    if is_medusa_dir(output.path):  # heads have no perplexity of their own: their validation is in metrics
        record = {"skipped": "Medusa heads: no perplexity to gate; see metrics.head_agreement and "
                             "metrics.mean_accepted_length", "passed": True, "reverted": False}
        record_metrics(output, METRIC_KEY, record)
        print(f"quality gate: {stage} skipped (Medusa heads, validated by agreement instead)", flush=True)
        return record
    from shrink.modeling import load_tokenizer

    ids = gate_ids(cfg, load_tokenizer(output), settings)
    key = gate_key(ids, settings)
    input_ppl = recorded_output_ppl(source, key) or measure(source, ids, settings.context)
    output_ppl = measure(output, ids, settings.context)
    ratio = output_ppl / input_ppl
    budget = settings.budgets.get(stage)
    passed = budget is None or ratio <= budget
    reverted = not passed and settings.action == "revert"
    record = {"input_ppl": input_ppl, "output_ppl": output_ppl, "ratio": ratio, "budget": budget,
              "passed": passed, "reverted": reverted, "tokens": int(ids.numel()), "context": settings.context,
              "text": settings.text, "key": key}
    record_metrics(output, METRIC_KEY, record)
    budget_text = "no budget" if budget is None else f"budget {budget:g}"
    print(f"quality gate: {stage} perplexity on {settings.text} {input_ppl:.2f} -> {output_ppl:.2f}, ratio "
          f"{ratio:.2f} ({budget_text})", flush=True)
    if not passed:
        message = (f"quality gate: stage {stage} exceeds its budget: perplexity ratio {ratio:.2f} > "
                   f"gates.max_ppl_ratio.{stage}={budget:g} ({input_ppl:.2f} -> {output_ppl:.2f})")
        if settings.action == "stop":
            raise ShrinkError(message + " (gates.action=stop)")
        if reverted:
            message += (f"; reverted (gates.action=revert): the pipeline goes on from {source.path.name}, "
                        f"{output.path.name} stays in the run unused (gates.action=warn keeps it)")
        print(f"warning: {message}", flush=True)
    return record

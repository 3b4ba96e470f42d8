"""stage=eval: every artifact of the run measured side by side (perplexity, task accuracy through
the engine, agreement with the teacher, speed, latency under load, memory), and with
`eval.speculative=true` the teacher served with a student as its draft; report.md, report.json
and plots. The measurements live in eval/; this driver finds the artifacts, verifies them, feeds
each to the measurements it asked for, and writes the report as an artifact."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from transformers import AutoConfig

from common.errors import ShrinkError
from common.medusa import is_medusa_dir
from eval.accuracy import load_examples
from eval.engine_run import measure_engine
from eval.memory import planned_kv_bytes_per_token
from eval.multiple_choice import MultipleChoice, cqa_questions
from eval.perplexity import encode, wikitext2_text
from eval.plots import BARS_FILE, FRONTIER_FILE, frontier_plot, stage_bars
from eval.report import measurement_notes, quality_key, speed_key, write_report
from eval.settings import HarnessSettings, perplexity_protocols
from common.tasks import Task, TaskExample, get_task
from eval.transformers_run import TransformersMeasurements
from shrink.artifacts import META_FILE, Artifact, write_artifact
from shrink.context import TEACHER_DIR, StageContext
from shrink.modeling import dir_size_bytes, load_model, load_tokenizer, num_parameters
from shrink.stages import register_stage
from shrink.verify import Verifier
from train.data import load_packed

EVAL_DIR = "eval"
CACHE_FILE = ".eval_cache.json"


def run_artifacts(run_dir: Path) -> list[Artifact]:
    """Every complete artifact in the run: the teacher first (agreement needs its reference), then in
    lineage-friendly order (oldest first)."""
    found = [Artifact.load(p) for p in sorted(run_dir.iterdir())
             if p.is_dir() and not p.name.startswith(".") and (p / META_FILE).is_file()]
    found = [a for a in found if a.stage != "eval" and (a.path / "config.json").is_file()]
    for a in [a for a in found if is_medusa_dir(a.path)]:  # distill=medusa: a drafter for its teacher
        print(f"eval: {a.path} holds Medusa heads (a drafter for the teacher), not a model: not evaluated")
        found.remove(a)
    # Lineage depth first: stages finished within the same second must still sort parent first.
    return sorted(found, key=lambda a: (a.path.name != TEACHER_DIR, len(a.lineage()), a.meta.get("created", ""),
                                        a.path.name))


def eval_datasets(cfg: DictConfig, ctx: StageContext, tokenizer) -> dict[str, torch.Tensor]:
    wanted = [str(d) for d in cfg.eval.datasets]
    out: dict[str, torch.Tensor] = {}
    for name in wanted:
        if name == "wikitext2":
            shared = ctx.data_dir
            if shared is None or not (shared / "wikitext-2-raw").is_dir():
                print("eval: WikiText-2 not found (set data_dir= or SHRINK_DATA_DIR); skipped")
                continue
            out[name] = encode(tokenizer, wikitext2_text(shared))
        elif name == "heldout":
            out[name] = load_packed(cfg.data, tokenizer, ctx.data_dir, ctx.cache_dir).val.reshape(-1)
        else:
            raise ShrinkError(f"eval.datasets: unknown dataset {name!r} (known: wikitext2, heldout)")
    if not out:
        raise ShrinkError("eval: no evaluation dataset is available")
    return out


def eval_tasks(ctx: StageContext, harness: HarnessSettings
               ) -> tuple[dict[str, tuple[Task, list[TaskExample]]], list[MultipleChoice]]:
    """The generative task subsets and the CommonsenseQA multiple-choice questions (the same for
    every artifact); none when the reasoning files are absent."""
    t = harness.tasks
    if not t.enabled or not (t.names or t.cqa_mc):
        return {}, []
    shared = ctx.data_dir
    if shared is None or not (shared / "reasoning").is_dir():
        print("eval: task files (reasoning/) not found (set data_dir= or SHRINK_DATA_DIR); task accuracy skipped")
        return {}, []
    generative = {name: (get_task(name, "eval.tasks.names"), load_examples(name, shared, t.split, t.limit))
                  for name in t.names}
    return generative, cqa_questions(shared, t.split, t.limit) if t.cqa_mc else []


def _dtype(cfg: DictConfig, device: torch.device) -> str:
    setting = str(cfg.eval.dtype)
    return ("bf16" if device.type == "cuda" else "fp32") if setting == "auto" else setting


def _speculative_pair(harness: HarnessSettings, intact: list[Artifact]) -> tuple[Artifact, Artifact] | None:
    """(teacher, draft) for eval.speculative, checked before any work."""
    if not harness.speculative:
        return None
    by_name = {a.path.name: a for a in intact}
    draft = harness.speculative_settings.draft
    if TEACHER_DIR not in by_name:
        raise ShrinkError("eval.speculative=true: the run has no intact teacher artifact to serve")
    if draft not in by_name:
        raise ShrinkError(f"eval.speculative_settings.draft={draft!r}: no intact artifact of that name in the run "
                          f"(have: {', '.join(sorted(by_name))})")
    return by_name[TEACHER_DIR], by_name[draft]


def _gate_fields(art: Artifact) -> dict[str, Any]:
    """Its stage's quality gate (shrink/quality_gate.py): perplexity ratio output/input on the gates'
    held-out text, whether it kept its budget, whether the pipeline reverted it."""
    gate = art.metrics.get("quality_gate") or {}
    if not gate:
        return {}
    return {"gate_ratio": gate.get("ratio"), "gate_passed": gate.get("passed"), "gate_reverted": art.reverted}


def _engine_measurements(art_dir: Path, device: torch.device, dtype: str, harness: HarnessSettings,
                         tasks: dict[str, tuple[Task, list[TaskExample]]], cqa_mc: list[MultipleChoice],
                         row: dict[str, Any], details: dict[str, Any], speculative_config: dict | None = None) -> None:
    try:
        fields, more = measure_engine(art_dir, harness, device, dtype, tasks, cqa_mc, speculative_config)
    except Exception as e:  # one artifact the engine cannot run must not lose the others' numbers
        row["engine_error"] = f"{type(e).__name__}: {e}"
        print(f"eval: engine measurements of {row['artifact']} failed: {row['engine_error']}")
        return
    row.update(fields)
    details.update(more)


@register_stage("eval")
def run(cfg: DictConfig, ctx: StageContext) -> Artifact:
    started = time.time()
    harness = HarnessSettings.from_dict(OmegaConf.to_container(cfg.eval, resolve=True))
    artifacts = run_artifacts(ctx.run_dir)
    if not artifacts:
        raise ShrinkError(f"eval: no artifacts in run={ctx.run_dir}")
    verifier = Verifier(ctx.run_dir)
    damage = {art.path: verifier.problem(art) for art in artifacts}
    intact = [art for art in artifacts if damage[art.path] is None]
    if not intact:
        raise ShrinkError(f"eval: every artifact in run={ctx.run_dir} is damaged "
                          f"({artifacts[0].path}: {damage[artifacts[0].path]})")
    spec_pair = _speculative_pair(harness, intact)
    tokenizer = load_tokenizer(intact[0])
    texts = eval_datasets(cfg, ctx, tokenizer)
    tasks, cqa_mc = eval_tasks(ctx, harness)
    device, dtype = ctx.device, _dtype(cfg, ctx.device)
    max_positions = min(int(getattr(AutoConfig.from_pretrained(a.path), "max_position_embeddings", 2**31))
                        for a in intact)
    protocols, cap_notes = perplexity_protocols(list(texts), int(cfg.eval.context), int(cfg.eval.stride),
                                                cfg.eval.max_windows, harness.wikitext2, max_positions)
    run_key = {"dtype": dtype, "device": str(device)}
    cache_path = ctx.run_dir / CACHE_FILE
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    quality = TransformersMeasurements(harness, texts, protocols, run_key, cache)

    def save_cache() -> None:
        """After every artifact: a run stopped midway (a time limit, a lost machine) keeps what it measured."""
        tmp = cache_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_path)

    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    resumed: list[str] = []  # rows taken whole from an earlier eval of this run
    harness_key = {"eval": OmegaConf.to_container(cfg.eval, resolve=True), "data_dir": str(cfg.get("data_dir")),
                   **run_key}

    def cached_row(name: str, hashes: list[str]) -> tuple[str, dict[str, Any] | None]:
        """(the row's cache key, its cached {row, details} or None). An eval cut off by a time limit
        (a device call's 10 minutes) keeps every finished row, and the next eval of the run resumes
        after them; the key holds the artifacts' content hashes and every eval setting."""
        key = "row:" + hashlib.sha256(json.dumps([name, hashes, harness_key], sort_keys=True,
                                                 default=str).encode()).hexdigest()
        hit = cache.get(key)
        if hit is not None:
            resumed.append(name)
            print(f"eval: {name}: every number from an earlier eval of this run ({CACHE_FILE})")
        return key, hit

    def keep_row(key: str, row: dict[str, Any], name: str) -> None:
        if any(k_.endswith("_error") for k_ in row):  # a failure may pass: the next eval tries again
            return
        cache[key] = json.loads(json.dumps({"row": row, "details": details[name]}, default=str))
        save_cache()

    for art in artifacts:
        name = art.path.name
        if damage[art.path] is not None:
            print(f"eval: {name} is DAMAGED, no numbers reported for it: {damage[art.path]}")
            rows.append({"artifact": name, "stage": art.stage, "status": f"damaged: {damage[art.path]}"})
            continue
        params_key = f"params:{art.content_hash}"

        def load(art: Artifact = art, params_key: str = params_key) -> torch.nn.Module:
            model = load_model(art, dtype=dtype, device=device)
            cache[params_key] = num_parameters(model)
            return model

        key, hit = cached_row(name, [art.content_hash])
        if hit is not None:
            rows.append(hit["row"])
            details[name] = hit["details"]
            if name == TEACHER_DIR:
                quality.teacher_load = load
            continue
        print(f"eval: {name}")
        config = AutoConfig.from_pretrained(art.path)
        row: dict[str, Any] = {"artifact": name, "stage": art.stage, "status": "ok",
                               "size_MB": dir_size_bytes(art.path) / 2**20,
                               "kv_bytes_per_token": planned_kv_bytes_per_token(config, 2), **_gate_fields(art)}

        fields, details[name] = quality.measure(name, art.content_hash, load, name == TEACHER_DIR)
        row.update(fields)
        row["params"] = cache.get(params_key, art.metrics.get("params"))
        save_cache()
        _engine_measurements(art.path, device, dtype, harness, tasks, cqa_mc, row, details[name])
        row["stage_s"] = art.meta.get("wall_time_s")
        rows.append(row)
        keep_row(key, row, name)
    if spec_pair is not None:
        target, draft = spec_pair
        spec = harness.speculative_settings
        name = f"{target.path.name}+{draft.path.name} (speculative, {spec.label})"
        key, hit = cached_row(name, [target.content_hash, draft.content_hash])
        if hit is not None:
            rows.append(hit["row"])
            details[name] = hit["details"]
        else:
            print(f"eval: {name}")
            teacher_row = next(r for r in rows if r["artifact"] == target.path.name)
            row = {"artifact": name, "stage": "speculative", "status": "ok",
                   "size_MB": (dir_size_bytes(target.path) + dir_size_bytes(draft.path)) / 2**20,
                   **{k_: v for k_, v in teacher_row.items() if k_.startswith("ppl_")}}
            details[name] = {}
            _engine_measurements(target.path, device, dtype, harness, tasks, cqa_mc, row, details[name],
                                 spec.engine_config(str(draft.path)))
            rows.append(row)
            keep_row(key, row, name)
    notes = measurement_notes(rows, protocols, cap_notes, harness, dtype, str(device))
    if resumed:
        notes.append(f"resumed: the rows of {', '.join(resumed)} come whole from an earlier eval of this run "
                     f"({CACHE_FILE}, same artifacts and settings): speeds in different rows may then come from "
                     "different processes")
    settings = {**run_key, "perplexity": {d: p.as_dict() for d, p in protocols.items()}, "datasets": list(texts),
                "harness": OmegaConf.to_container(cfg.eval, resolve=True)}

    def save(tmp_dir: Path) -> None:
        plots: list[str] = []
        if harness.plots:
            q, s = quality_key(rows), speed_key(rows)
            if q and s and frontier_plot(rows, s, q, tmp_dir / FRONTIER_FILE):
                plots.append(FRONTIER_FILE)
            bars = [("size_MB", "size (MB)"), (s or "", f"decode tok/s ({s})"), (q or "", f"{q} (lower is better)")]
            if stage_bars(rows, [b for b in bars if b[0]], tmp_dir / BARS_FILE):
                plots.append(BARS_FILE)
        write_report(tmp_dir, f"shrink report: {ctx.run_dir}", rows, notes, settings, details, plots)

    artifact = write_artifact(ctx.output_dir(EVAL_DIR), stage="eval", save=save,
                              config={**ctx.resolved_config("eval"), "settings": settings},
                              inputs=artifacts, metrics={"rows": rows}, started=started)
    print(f"eval: report at {artifact.path / 'report.md'}")
    return artifact

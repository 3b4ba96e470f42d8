"""stage=eval: perplexity of every artifact of the run; report.md + report.json."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from transformers import AutoConfig

from eval.perplexity import encode, perplexity, wikitext2_text
from eval.report import write_report
from shrink.artifacts import META_FILE, Artifact, write_artifact
from shrink.context import StageContext
from shrink.verify import Verifier
from common.errors import ShrinkError
from shrink.gqa import KVLayout
from shrink.modeling import dir_size_bytes, load_model, load_tokenizer, num_parameters
from shrink.stages import register_stage
from shrink.stages.import_model import cache_dir
from train.data import data_dir, load_packed

EVAL_DIR = "eval"
CACHE_FILE = ".eval_cache.json"


def run_artifacts(run_dir: Path) -> list[Artifact]:
    """Every complete artifact in the run, in lineage-friendly order (oldest first)."""
    found = [Artifact.load(p) for p in sorted(run_dir.iterdir())
             if p.is_dir() and not p.name.startswith(".") and (p / META_FILE).is_file()]
    found = [a for a in found if a.stage != "eval" and (a.path / "config.json").is_file()]
    # Lineage depth first: stages finished within the same second must still sort parent first.
    return sorted(found, key=lambda a: (len(a.lineage()), a.meta.get("created", ""), a.path.name))


def eval_datasets(cfg: DictConfig, tokenizer) -> dict[str, torch.Tensor]:
    wanted = [str(d) for d in cfg.eval.datasets]
    out: dict[str, torch.Tensor] = {}
    for name in wanted:
        if name == "wikitext2":
            shared = data_dir(cfg.get("data_dir"))
            if shared is None or not (shared / "wikitext-2-raw").is_dir():
                print("eval: WikiText-2 not found (set data_dir= or SHRINK_DATA_DIR); skipped")
                continue
            out[name] = encode(tokenizer, wikitext2_text(shared))
        elif name == "heldout":
            out[name] = load_packed(cfg.data, tokenizer, cfg.get("data_dir"), cache_dir(cfg)).val.reshape(-1)
        else:
            raise ShrinkError(f"eval.datasets: unknown dataset {name!r} (known: wikitext2, heldout)")
    if not out:
        raise ShrinkError("eval: no evaluation dataset is available")
    return out


def _dtype(cfg: DictConfig, device: torch.device) -> str:
    setting = str(cfg.eval.dtype)
    return ("bf16" if device.type == "cuda" else "fp32") if setting == "auto" else setting


@register_stage("eval")
def run(cfg: DictConfig, ctx: StageContext) -> Artifact:
    started = time.time()
    artifacts = run_artifacts(ctx.run_dir)
    if not artifacts:
        raise ShrinkError(f"eval: no artifacts in run={ctx.run_dir}")
    device = ctx.device
    dtype = _dtype(cfg, device)
    settings = {"context": int(cfg.eval.context), "stride": int(cfg.eval.stride),
                "max_windows": cfg.eval.max_windows, "dtype": dtype, "device": str(device)}
    cache_path = ctx.run_dir / CACHE_FILE
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    verifier = Verifier(ctx.run_dir)
    damage = {art.path: verifier.problem(art) for art in artifacts}
    intact = [art for art in artifacts if damage[art.path] is None]
    if not intact:
        raise ShrinkError(f"eval: every artifact in run={ctx.run_dir} is damaged "
                          f"({artifacts[0].path}: {damage[artifacts[0].path]})")
    tokenizer = load_tokenizer(intact[0])
    texts = eval_datasets(cfg, tokenizer)
    rows = []
    for art in artifacts:
        if damage[art.path] is not None:
            print(f"eval: {art.path.name} is DAMAGED, no numbers reported for it: {damage[art.path]}")
            rows.append({"artifact": art.path.name, "stage": art.stage, "status": f"damaged: {damage[art.path]}"})
            continue
        config = AutoConfig.from_pretrained(art.path)
        row = {"artifact": art.path.name, "stage": art.stage, "status": "ok",
               "size_MB": dir_size_bytes(art.path) / 2**20,
               "kv_bytes_per_token": KVLayout.of(config).bytes_per_token(2), "stage_s": art.meta.get("wall_time_s")}
        model = None
        for name, ids in texts.items():
            key = hashlib.sha256(json.dumps([art.content_hash, name, settings, int(ids.numel())]).encode()).hexdigest()
            if key not in cache:
                if model is None:
                    model = load_model(art, dtype=dtype, device=device)
                result = perplexity(model, ids, settings["context"], settings["stride"], settings["max_windows"])
                cache[key] = result.as_dict()
                print(f"eval: {art.path.name} {name} ppl {result.ppl:.3f} ({result.tokens} tokens)")
            row[f"ppl_{name}"] = cache[key]["ppl"]
        params_key = f"params:{art.content_hash}"
        if model is not None:
            cache[params_key] = num_parameters(model)
            del model
        row["params"] = cache.get(params_key, art.metrics.get("params"))
        rows.append(row)
    tmp = cache_path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(cache))
    os.replace(tmp, cache_path)
    notes = [f"perplexity: windows of {settings['context']} tokens, stride {settings['stride']}, "
             f"{settings['max_windows'] or 'all'} windows per dataset, {dtype} on {device}",
             "wikitext2: WikiText-2 raw test; heldout: the validation split of the run's data",
             "status: ok when the files match the content hash in shrink.json; a damaged artifact gets no numbers",
             "kv_bytes_per_token: K and V of one token over all layers in bf16; stage_s: the stage's wall time"]
    report_settings = {**settings, "datasets": list(texts)}

    def save(tmp_dir: Path) -> None:
        write_report(tmp_dir, f"shrink report: {ctx.run_dir}", rows, notes, report_settings)

    artifact = write_artifact(ctx.output_dir(EVAL_DIR), stage="eval", save=save,
                              config={**ctx.resolved_config("eval"), "settings": report_settings},
                              inputs=artifacts, metrics={"rows": rows}, started=started)
    print(f"eval: report at {artifact.path / 'report.md'}")
    return artifact

"""stage=gqa end to end on a tiny model: metrics, artifact, budget, errors before any work, and
uptraining that lowers the distillation loss."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from support import save_tiny_artifact
from omegaconf import OmegaConf
from test_gqa_reference import one_thread  # noqa: F401

from shrink.artifacts import Artifact
from common.errors import ShrinkError
from shrink.gqa_surgery import pool_kv_heads
from shrink.modeling import save_model_artifact
from shrink.stages import gqa as gqa_stage

TINY_6_3 = dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, num_hidden_layers=2)


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's head layout (query heads = 3 x KV heads)."""
    return save_tiny_artifact(tmp_path_factory.mktemp("gqa") / "teacher", seed=1, **TINY_6_3)


def compose(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    from shrink.__main__ import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose("config", overrides=["stage=gqa", "logging=none", "device=cpu", *overrides])
    OmegaConf.resolve(cfg)
    return cfg


def test_stage_pools_uptrains_and_reports(tiny_gqa, tmp_path):
    from shrink.__main__ import run as run_stage

    run = tmp_path / "run"
    cfg = compose(f"input={tiny_gqa}", f"run={run}", f"cache_dir={tmp_path / 'cache'}", "data=pydoc",
                  "data.block_size=64", "data.max_docs=40", "gqa.kv_heads=1", "gqa.tokens=2048",
                  "gqa.train.batch_size=4", "gqa.train.lr=1e-3", "gqa.train.warmup_steps=1",
                  "gqa.eval.datasets=[heldout]", "gqa.eval.context=64", "gqa.eval.stride=64",
                  "gqa.eval.max_windows=4", "gqa.kv_report.batch=2", "gqa.kv_report.context=100")
    run_stage(cfg)
    art = Artifact.load(run / "gqa")
    m = art.metrics
    # 2 layers x 8 dims x 2 bytes x (K and V): 3 heads before, 1 after (multi-query attention).
    assert (m["kv_heads_before"], m["kv_heads_after"]) == (3, 1)
    assert (m["kv_bytes_per_token_before"], m["kv_bytes_per_token_after"]) == (2 * 2 * 3 * 8 * 2, 2 * 2 * 1 * 8 * 2)
    assert m["kv_cache_bytes_after"] == m["kv_bytes_per_token_after"] * 2 * 100
    assert m["kv_bytes_ratio"] == pytest.approx(1 / 3)
    for phase in ("before", "converted", "uptrained"):
        assert math.isfinite(m[f"ppl_heldout_{phase}"]) and m[f"ppl_heldout_{phase}"] > 1
    assert m["uptrain_steps"] == 8 and m["uptrain_train_tokens"] == 2048
    assert m["budget_source"] == "gqa.tokens" and m["init"] == "svd"  # gqa.init=auto on a llama
    assert art.meta["inputs"][0]["path"] == str(tiny_gqa.resolve())
    assert art.meta["config"]["gqa"]["kv_heads"] == 1
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(art.path)
    assert model.config.num_key_value_heads == 1
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (8, 48)
    assert not (run / gqa_stage.CKPT_DIR).exists()


def test_stage_expand_is_exact_and_skips_uptraining(tiny_gqa, tmp_path):
    from shrink.__main__ import run as run_stage

    cfg = compose(f"input={tiny_gqa}", f"run={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", "data=pydoc",
                  "data.block_size=64", "data.max_docs=40", "gqa.mode=expand", "gqa.kv_heads=null",
                  "gqa.tokens=null", "gqa.eval.datasets=[heldout]", "gqa.eval.context=64", "gqa.eval.stride=64",
                  "gqa.eval.max_windows=4")
    m = run_stage(cfg).metrics
    assert (m["kv_heads_before"], m["kv_heads_after"], m["kv_bytes_ratio"]) == (3, 6, 2.0)
    assert m["ppl_heldout_converted"] == pytest.approx(m["ppl_heldout_before"], rel=1e-5)
    assert "ppl_heldout_uptrained" not in m and m["uptrain_tokens_budget"] == 0


def test_stage_accepts_svd_init(tiny_gqa, tmp_path):
    from shrink.__main__ import run as run_stage

    cfg = compose(f"input={tiny_gqa}", f"run={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", "data=pydoc",
                  "data.block_size=64", "data.max_docs=40", "gqa.init=svd", "gqa.tokens=0",
                  "gqa.eval.datasets=[heldout]", "gqa.eval.context=64", "gqa.eval.stride=64", "gqa.eval.max_windows=4")
    art = run_stage(cfg)
    m = art.metrics
    assert m["init"] == "svd" and (m["kv_heads_before"], m["kv_heads_after"]) == (3, 1)
    assert math.isfinite(m["ppl_heldout_converted"]) and "ppl_heldout_uptrained" not in m
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(art.path).config.num_key_value_heads == 1


@pytest.mark.parametrize("overrides, message", [
    (["gqa.kv_heads=4"], r"^gqa.kv_heads=4 does not divide the model's 6 query heads \(num_attention_heads\); "
                         r"choose a divisor of 6$"),
    (["gqa.kv_heads=3"], r"gqa.kv_heads=3 must be fewer than the model's 3 key/value heads"),
    (["gqa.init=best"], r"gqa.init='best'"),
    (["gqa.tokens=-5"], r"gqa.tokens must be >= 0"),
    (["gqa.tokens=100", "gqa.train.lr=0"], r"gqa.train.lr must be > 0"),
    (["gqa.tokens=null"], r"gqa.budget_fraction=0.05 needs the run's distill artifact"),
])
def test_bad_input_fails_before_any_work(tiny_gqa, tmp_path, monkeypatch, overrides, message):
    def no_work(*args, **kwargs):
        raise AssertionError("the stage started loading weights or data before validating its config")

    monkeypatch.setattr(gqa_stage, "load_model", no_work)
    monkeypatch.setattr(gqa_stage, "load_packed", no_work)
    cfg = compose(f"input={tiny_gqa}", f"run={tmp_path / 'run'}", *overrides)
    from shrink.__main__ import run

    with pytest.raises(ShrinkError, match=message) as err:
        run(cfg)
    assert "\n" not in str(err.value)  # the CLI prints it as one line
    assert not (tmp_path / "run" / "gqa").exists()


def _artifact(path: Path, stage: str, metrics: dict, inputs: list[Artifact] | None = None) -> Artifact:
    from support import make_tiny_tokenizer, tiny_llama_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(num_hidden_layers=1))
    return save_model_artifact(path, model, make_tiny_tokenizer(), stage=stage, metrics=metrics, inputs=inputs)


def test_budget_from_tokens_or_distill_fraction(tmp_path):
    teacher = _artifact(tmp_path / "run" / "teacher", "import", {})
    distill = _artifact(tmp_path / "run" / "distill", "distill", {"train_tokens": 200_000}, inputs=[teacher])
    prune = _artifact(tmp_path / "elsewhere" / "prune", "prune", {}, inputs=[distill])
    gcfg = OmegaConf.create({"tokens": None, "budget_fraction": 0.05})
    # Found in the input's lineage (prune -> distill), wherever the run directory is.
    assert gqa_stage.resolve_budget(gcfg, prune, tmp_path / "other_run")[0] == 10_000
    # Found at run/distill when the input is the teacher (stage=gqa input=teacher).
    tokens, source = gqa_stage.resolve_budget(gcfg, teacher, tmp_path / "run")
    assert tokens == 10_000 and "train_tokens=200000" in source
    assert gqa_stage.resolve_budget(OmegaConf.create({"tokens": 777, "budget_fraction": 0.05}), teacher,
                                    tmp_path / "nowhere") == (777, "gqa.tokens")
    with pytest.raises(ShrinkError, match="set gqa.tokens=N instead"):
        gqa_stage.resolve_budget(gcfg, teacher, tmp_path / "nowhere")


def test_uptraining_lowers_the_distillation_loss(tmp_path):
    from test_gqa_reference import tiny_model

    from train.loop import make_terms, validation_loss

    teacher = tiny_model("llama", heads=6, kv_heads=3).requires_grad_(False)  # as after an earlier uptrain
    student = pool_kv_heads(copy.deepcopy(teacher), 1, "random", seed=0)
    gen = torch.Generator().manual_seed(0)
    train, val = torch.randint(0, 128, (64, 32), generator=gen), torch.randint(0, 128, (8, 32), generator=gen)
    gcfg = OmegaConf.create({"train": {"batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "chunk_size": 256,
                                       "losses": {"forward_kl": 1.0}, "temperature": 1.0, "checkpoint_every": 0,
                                       "val_batches": 1}})
    tc = gqa_stage.gqa_train_config(gcfg, tokens=30 * 8 * 32, block_size=32, seed=0)
    assert tc.max_steps == 30
    before = validation_loss(student, teacher, val, make_terms(tc), tc, torch.device("cpu"))["val_forward_kl"]
    result = gqa_stage.uptrain(student, teacher, train, val, tc, tmp_path / "ckpt")
    after = result["metrics"]["val_forward_kl"]
    assert after < 0.7 * before, (before, after)
    log = [json.loads(line) for line in (tmp_path / "ckpt.train_log.jsonl").read_text().splitlines()]
    assert len(log) == 30

"""Loop features: gradient accumulation, the optimizer-step hook, LoRA, layer terms with a projection,
multi-task rationale batches with an evaluate hook, and config errors naming their key prefix."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from support import make_tiny_tokenizer, tiny_llama_config
from common.tasks import TaskExample
from common.errors import ShrinkError, config_section
from train.config import TrainConfig
from train.layer_distill import parse_layer_map
from train.loop import train_distill
from train.rationale import MultiTaskExamples
from train.student_init import prune_width, student_from_teacher


def _setup():
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_llama_config()).eval()
    gen = torch.Generator().manual_seed(1)
    return teacher, torch.randint(3, 320, (16, 16), generator=gen), torch.randint(3, 320, (4, 16), generator=gen)


def test_grad_accumulation_equals_the_larger_batch(tmp_path):
    teacher, train, val = _setup()
    base = dict(max_steps=3, warmup_steps=1, lr=1e-3, checkpoint_every=0, chunk_size=64, val_batches=1)
    big = train_distill(student_from_teacher(teacher, [0, 2]), teacher, train, val,
                        TrainConfig(batch_size=4, grad_accum=1, **base), tmp_path / "a")["model"]
    calls = []
    acc = train_distill(student_from_teacher(teacher, [0, 2]), teacher, train, val,
                        TrainConfig(batch_size=2, grad_accum=2, **base), tmp_path / "b",
                        after_optimizer_step=lambda m: calls.append(type(m).__name__))["model"]
    assert calls == ["LlamaForCausalLM"] * 3  # once per optimizer step, with the unwrapped model
    for p, q in zip(big.parameters(), acc.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_lora_trains_adapters_and_returns_a_merged_plain_model(tmp_path):
    teacher, train, val = _setup()
    student = student_from_teacher(teacher, [0, 2])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    tc = TrainConfig(max_steps=4, batch_size=2, warmup_steps=1, lr=1e-2, checkpoint_every=0, chunk_size=64,
                     val_batches=1, lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    model = train_distill(student, teacher, train, val, tc, tmp_path / "ckpt")["model"]
    assert type(model).__name__ == "LlamaForCausalLM" and not any("lora" in k for k in model.state_dict())
    after = model.state_dict()
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])


def test_layer_distillation_with_projection_lowers_the_layer_loss(tmp_path):
    teacher, train, val = _setup()
    student = prune_width(student_from_teacher(teacher, [0, 2]), hidden_size=48)
    pairs = parse_layer_map("auto", 2, 4, keep=[0, 2])
    tc = TrainConfig(max_steps=30, batch_size=4, warmup_steps=1, lr=3e-3, checkpoint_every=0, chunk_size=64,
                     val_batches=1, losses={"forward_kl": 1.0}, temperature=1.0, layer_map=pairs,
                     layer_loss="cosine", layer_weight=1.0)
    train_distill(student, teacher, train, val, tc, tmp_path / "ckpt")
    log = [json.loads(line) for line in (tmp_path / "ckpt.train_log.jsonl").read_text().splitlines()]
    assert sum(r["layers"] for r in log[-3:]) < 0.5 * sum(r["layers"] for r in log[:3])


def test_multitask_rationale_training_and_evaluate_hook(tmp_path):
    torch.manual_seed(0)
    tok = make_tiny_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_llama_config())
    exs = [TaskExample(str(i), f"What is {i % 5} plus {i % 5}?", str(2 * (i % 5)), {}) for i in range(20)]
    data = MultiTaskExamples([(ex, f"{ex.answer} is twice {i % 5}.") for i, ex in enumerate(exs)], tok, 0.5, 64)
    evals = []
    tc = TrainConfig(max_steps=40, batch_size=4, warmup_steps=2, lr=3e-3, checkpoint_every=0, chunk_size=64,
                     val_batches=2, losses={"ce": 1.0}, eval_every=20)
    result = train_distill(model, None, data, data, tc, tmp_path / "ckpt",
                           evaluate=lambda m: evals.append(1) or {"acc": 0.5})
    log = [json.loads(line) for line in (tmp_path / "ckpt.train_log.jsonl").read_text().splitlines()]
    assert {"label_ce", "rationale_ce"} <= set(log[0])
    assert log[0]["loss"] == pytest.approx(0.5 * log[0]["label_ce"] + 0.5 * log[0]["rationale_ce"], rel=1e-5)
    assert log[-1]["label_ce"] < 0.5 * log[0]["label_ce"]
    assert len(evals) == 2 and result["metrics"]["acc"] == 0.5  # at step 20 and at the end


def test_config_errors_name_their_prefix():
    with pytest.raises(ShrinkError, match=r"gqa\.train\.lr must be > 0"), config_section("gqa.train"):
        TrainConfig.from_cfg({"lr": 0.0}, seed=0, block_size=8)
    with pytest.raises(ShrinkError, match=r"distill\.lmbda"), config_section("distill"):
        TrainConfig(lmbda=2.0).validate()
    with pytest.raises(ShrinkError, match=r"prune\.finetune\.batch_size"), config_section("prune.finetune"):
        TrainConfig(batch_size=0).validate()
    tc = TrainConfig.from_cfg({"tokens": 1000, "batch_size": 2, "grad_accum": 2}, seed=0, block_size=50)
    assert tc.max_steps == 5


def test_teacher_loss_without_teacher_is_an_error(tmp_path):
    _, train, val = _setup()
    student = AutoModelForCausalLM.from_config(tiny_llama_config())
    with pytest.raises(ShrinkError, match="no teacher"):
        train_distill(student, None, train, val, TrainConfig(max_steps=1), tmp_path / "c")

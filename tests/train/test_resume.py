"""An interrupted distillation resumes from its checkpoint and continues the same loss curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from support import tiny_llama_config
from train.loop import TrainConfig, train_distill
from train.student_init import student_from_teacher


class Interrupt(Exception):
    pass


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    teacher = AutoModelForCausalLM.from_config(tiny_llama_config()).eval()
    student = student_from_teacher(teacher, [0, 2])
    gen = torch.Generator().manual_seed(1)
    train = torch.randint(3, 320, (24, 32), generator=gen)
    val = torch.randint(3, 320, (4, 32), generator=gen)
    return teacher, student, train, val


def _losses(log: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, log.read_text().splitlines())}


def test_resume_continues_from_checkpoint_step(tmp_path: Path):
    tc = TrainConfig(max_steps=8, batch_size=4, warmup_steps=2, lr=1e-3, checkpoint_every=3, chunk_size=40,
                     val_batches=1)
    teacher, student, train, val = _setup()
    straight = train_distill(student, teacher, train, val, tc, tmp_path / "a" / "ckpt")
    curve = _losses(tmp_path / "a" / "ckpt.train_log.jsonl")

    teacher, student, train, val = _setup()

    def stop_at_5(step: int, logs: dict) -> None:
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_distill(student, teacher, train, val, tc, tmp_path / "b" / "ckpt", on_step=stop_at_5)
    assert json.loads((tmp_path / "b" / "ckpt" / "trainer_state.json").read_text())["step"] == 3

    teacher, fresh_student, train, val = _setup()
    with torch.no_grad():  # scramble the weights: everything must come back from the checkpoint
        for p in fresh_student.parameters():
            p.add_(torch.randn_like(p))
    steps_seen = []
    resumed = train_distill(fresh_student, teacher, train, val, tc, tmp_path / "b" / "ckpt", resume=True,
                            on_step=lambda step, logs: steps_seen.append(step))
    assert steps_seen == [4, 5, 6, 7, 8]
    resumed_curve = _losses(tmp_path / "b" / "ckpt.train_log.jsonl")
    for step in range(1, 9):
        assert resumed_curve[step] == pytest.approx(curve[step], rel=1e-5, abs=1e-6)
    for p, q in zip(resumed["model"].parameters(), straight["model"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_distill_lowers_the_loss(tmp_path: Path):
    tc = TrainConfig(max_steps=100, batch_size=4, warmup_steps=2, lr=3e-3, checkpoint_every=0, chunk_size=40,
                     val_batches=1, losses={"forward_kl": 1.0})
    torch.manual_seed(0)
    # A teacher with peaked distributions, and a student from scratch: the KL starts far from 0.
    teacher = AutoModelForCausalLM.from_config(tiny_llama_config(initializer_range=0.2)).eval()
    student = AutoModelForCausalLM.from_config(tiny_llama_config(num_hidden_layers=2)).train()
    _, _, train, val = _setup()
    train_distill(student, teacher, train, val, tc, tmp_path / "ckpt")
    curve = _losses(tmp_path / "ckpt.train_log.jsonl")
    print(curve[1], curve[100])
    assert sum(curve[s] for s in range(96, 101)) < 0.8 * sum(curve[s] for s in range(1, 6))

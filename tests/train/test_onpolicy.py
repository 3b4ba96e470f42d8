"""GKD sampling path on a tiny model: sources, student samples scored by the teacher, masks, resume."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from support import tiny_llama_config
from train.loop import TrainConfig, train_distill
from train.onpolicy import continuation_batch, generate_sequences, sample_continuations, step_source
from train.student_init import student_from_teacher


def test_step_source_is_seeded_and_follows_lambda():
    sources = [step_source(0, s, 0.3, False) for s in range(2000)]
    assert set(sources) == {"data", "student"}
    assert abs(sources.count("student") / 2000 - 0.3) < 0.05
    assert sources == [step_source(0, s, 0.3, False) for s in range(2000)]
    assert {step_source(0, s, 0.0, True) for s in range(50)} == {"teacher"}
    assert {step_source(0, s, 0.0, False) for s in range(50)} == {"data"}


def test_continuation_labels_mask_prompt_and_after_eos():
    seqs = torch.tensor([[5, 6, 7, 8, 2, 9, 9], [5, 6, 7, 8, 10, 11, 12]])
    batch = continuation_batch(seqs, prompt_len=3, eos_id=2)
    assert batch.labels.tolist() == [[-100, -100, 8, 2, -100, -100], [-100, -100, 8, 10, 11, 12]]


def test_student_samples_are_reproducible_and_differ_across_seeds():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config())
    prompts = torch.randint(3, 320, (3, 5), generator=torch.Generator().manual_seed(0))
    a = sample_continuations(model, prompts, 6, 1.0, eos_id=2, seed=11)
    b = sample_continuations(model, prompts, 6, 1.0, eos_id=2, seed=11)
    c = sample_continuations(model, prompts, 6, 1.0, eos_id=2, seed=12)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    assert torch.equal(a.input_ids[:, :5], prompts) and a.input_ids.shape[1] <= 11
    assert model.training  # mode restored


def test_gkd_training_runs_and_resumes_exactly(tmp_path):
    def setup():
        torch.manual_seed(0)
        teacher = AutoModelForCausalLM.from_config(tiny_llama_config()).eval()
        student = student_from_teacher(teacher, [0, 2])
        gen = torch.Generator().manual_seed(1)
        return teacher, student, torch.randint(3, 320, (16, 24), generator=gen), torch.randint(3, 320, (4, 24), generator=gen)

    tc = TrainConfig(max_steps=6, batch_size=2, warmup_steps=1, lr=1e-3, checkpoint_every=3, chunk_size=16,
                     val_batches=1, losses={"jsd": {"beta": 0.5}, "ce": 0.5}, temperature=1.0, lmbda=0.5,
                     seq_kd=True, prompt_len=8, max_new_tokens=6)
    teacher, student, train, val = setup()
    train_distill(student, teacher, train, val, tc, tmp_path / "a" / "ckpt")
    log = [json.loads(line) for line in (tmp_path / "a" / "ckpt.train_log.jsonl").read_text().splitlines()]
    assert {r["source"] for r in log} == {"student", "teacher"}
    assert all("ce" not in r for r in log if r["source"] == "student")  # no CE on the student's own text
    assert all("ce" in r for r in log if r["source"] == "teacher")

    teacher, student, train, val = setup()

    class Stop(Exception):
        pass

    def stop(step, logs):
        if step == 4:
            raise Stop

    try:
        train_distill(student, teacher, train, val, tc, tmp_path / "b" / "ckpt", on_step=stop)
    except Stop:
        pass
    teacher, student, train, val = setup()
    train_distill(student, teacher, train, val, tc, tmp_path / "b" / "ckpt", resume=True)
    resumed = {json.loads(line)["step"]: json.loads(line)["loss"]
               for line in (tmp_path / "b" / "ckpt.train_log.jsonl").read_text().splitlines()}
    for r in log:
        assert abs(resumed[r["step"]] - r["loss"]) <= 1e-5 * max(1.0, abs(r["loss"]))


def test_the_loop_samples_through_the_given_samplers(tmp_path):
    """train_distill's student_sampler / teacher_sampler continue the prompts of student / teacher
    steps with that model, seeded by (seed, step)."""
    calls: list[tuple[str, int, int, int]] = []

    def recording(label):
        def sampler(model, prompts, max_new_tokens, temperature, eos_id, seed):
            calls.append((label, model is teacher, prompts.shape[1], seed))
            return generate_sequences(model, prompts, max_new_tokens, temperature, eos_id, seed)
        return sampler

    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_llama_config()).eval()
    student = student_from_teacher(teacher, [0, 2])
    gen = torch.Generator().manual_seed(1)
    train, val = torch.randint(3, 320, (16, 24), generator=gen), torch.randint(3, 320, (4, 24), generator=gen)
    tc = TrainConfig(max_steps=6, batch_size=2, warmup_steps=1, checkpoint_every=0, chunk_size=16, val_batches=1,
                     losses={"jsd": {"beta": 0.5}, "ce": 0.5}, temperature=1.0, lmbda=0.5, seq_kd=True,
                     prompt_len=8, max_new_tokens=6, seed=3)
    train_distill(student, teacher, train, val, tc, tmp_path / "ckpt", student_sampler=recording("student"),
                  teacher_sampler=recording("teacher"))
    sources = [step_source(3, s, 0.5, True) for s in range(6)]
    assert [(c[0], c[1]) for c in calls] == [(s, s == "teacher") for s in sources]
    assert [c[2] for c in calls] == [8] * 6
    assert [c[3] for c in calls] == [3 * 1_000_003 + s for s in range(6)]


def test_generate_sequences_is_the_default_sampler():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config())
    prompts = torch.randint(3, 320, (2, 5), generator=torch.Generator().manual_seed(0))
    batch = sample_continuations(model, prompts, 4, 1.0, eos_id=2, seed=7)
    seqs = generate_sequences(model, prompts, 4, 1.0, 2, 7)
    assert torch.equal(batch.input_ids, seqs)
    assert torch.equal(batch.labels, continuation_batch(seqs, 5, 2).labels)

"""On-policy / seq-KD sampling through our engine (shrink/engine_sampler.py): greedy equals transformers'
generate, the live weights are pushed before each step, sampling is seeded per (seed, step, row) and
follows the model's distribution; the distill stage runs GKD with it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.loader import CheckpointMismatchError
from shrink.engine_sampler import EngineSampler, check_sampler, live_parameters, resolve_sampler
from support import REPO, run_cli, run_main, tiny_llama_config
from train.onpolicy import continuation_batch, generate_sequences, sample_continuations

CPU = torch.device("cpu")


def varied_model(seed: int = 0, **config) -> torch.nn.Module:
    """A tiny random Llama whose greedy continuations vary (the default init repeats one token)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.25)
    return model.train()


def set_eos(model: torch.nn.Module, eos_id: int) -> None:
    model.config.eos_token_id = eos_id
    model.generation_config.eos_token_id = eos_id


def prompts_of(rows: int, length: int, vocab: int = 320, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def common_eos(model: torch.nn.Module, prompts: torch.Tensor, new: int) -> int:
    """A token greedy decoding emits mid-continuation in some rows (never first): an EOS that ends
    rows at different lengths."""
    seqs = generate_sequences(model, prompts, new, 0.0, None, 0)[:, prompts.shape[1]:]
    first = set(seqs[:, 0].tolist())
    counts: dict[int, int] = {}
    for row in seqs[:, 1:].tolist():
        for t in set(row) - first:
            counts[t] = counts.get(t, 0) + 1
    return max(counts, key=lambda t: (0 < counts[t] < len(seqs), counts[t]))


def test_greedy_engine_samples_equal_transformers_generate(tmp_path):
    model = varied_model()
    prompts = prompts_of(6, 7)
    eos = common_eos(model, prompts, 10)
    set_eos(model, eos)
    sampler = EngineSampler.for_student(model, tmp_path, 6, 7, 10, CPU)
    assert list(tmp_path.iterdir()) == []  # the scratch config is gone once the engine has read it
    ours = sample_continuations(model, prompts, 10, 0.0, eos, seed=3, sampler=sampler)
    theirs = sample_continuations(model, prompts, 10, 0.0, eos, seed=3)
    assert torch.equal(ours.input_ids, theirs.input_ids)
    assert torch.equal(ours.labels, theirs.labels)
    generated = ours.input_ids[:, 7:]
    ended = [(row == eos).nonzero()[0, 0].item() for row in generated if (row == eos).any()]
    assert ended and len(ended) < len(generated), "the EOS must end some rows early, not all"
    assert (ours.labels == -100).sum() > 6 * 6  # the prompt and the padding after EOS are masked
    assert model.training


def test_samples_follow_the_live_weights_after_an_optimizer_step(tmp_path):
    model = varied_model(1)
    prompts = prompts_of(4, 6, seed=1)
    sampler = EngineSampler.for_student(model, tmp_path, 4, 6, 8, CPU)
    before = sampler(model, prompts, 8, 0.0, None, 0)
    assert torch.equal(before, generate_sequences(model, prompts, 8, 0.0, None, 0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    target = prompts_of(4, 14, seed=2)
    loss = model(input_ids=target, labels=target).loss
    loss.backward()
    optimizer.step()
    after = sampler(model, prompts, 8, 0.0, None, 0)
    assert torch.equal(after, generate_sequences(model, prompts, 8, 0.0, None, 0))
    assert not torch.equal(after, before)


def test_update_weights_refuses_missing_extra_and_misshaped_tensors_before_copying(tmp_path):
    model = varied_model(2)
    sampler = EngineSampler.for_student(model, tmp_path, 2, 4, 4, CPU)
    engine_model = sampler.llm.engine.runner.model
    snapshot = {n: p.clone() for n, p in engine_model.named_parameters()}
    tensors = dict(live_parameters(model))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 64)
    tensors["model.layers.9.mlp.gate_proj.weight"] = torch.zeros(128, 64)
    with torch.no_grad():
        tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1.0  # would change, if anything were copied
    with pytest.raises(CheckpointMismatchError) as err:
        sampler.llm.update_weights(tensors.items())
    message = str(err.value)
    assert "1 missing: model.layers.1.mlp.up_proj.weight" in message
    assert "1 unexpected: model.layers.9.mlp.gate_proj.weight" in message
    assert "1 mis-shaped: model.layers.0.self_attn.q_proj.weight [3, 64] (expected [64, 64])" in message
    assert all(torch.equal(p, snapshot[n]) for n, p in engine_model.named_parameters())
    twice = list(live_parameters(model)) + [("model.norm.weight", model.model.norm.weight)]
    with pytest.raises(CheckpointMismatchError, match="1 stored more than once: model.norm.weight"):
        sampler.llm.update_weights(twice)


def test_sampling_is_seeded_per_step_and_row(tmp_path):
    model = varied_model(3)
    prompts = prompts_of(4, 5, seed=3)
    a = EngineSampler.for_student(model, tmp_path, 4, 5, 6, CPU)
    resumed = EngineSampler.for_student(model, tmp_path, 4, 5, 6, CPU)  # a fresh process after a resume
    first = a(model, prompts, 6, 1.0, 2, seed=11)
    assert torch.equal(first, a(model, prompts, 6, 1.0, 2, seed=11))
    assert torch.equal(first, resumed(model, prompts, 6, 1.0, 2, seed=11))
    assert not torch.equal(first, a(model, prompts, 6, 1.0, 2, seed=12))
    same = prompts[:1].expand(4, -1)
    rows = a(model, same, 6, 1.0, 2, seed=11)
    assert len({tuple(r) for r in rows.tolist()}) > 1  # one prompt, four rows: four draws


def test_temperature_one_samples_follow_the_students_distribution(tmp_path):
    vocab, eos, batch, steps = 12, 2, 64, 40
    model = varied_model(4, vocab_size=vocab, max_position_embeddings=64)
    set_eos(model, eos)
    prompt = prompts_of(1, 4, vocab=vocab, seed=4)
    sampler = EngineSampler.for_student(model, tmp_path, batch, 4, 2, CPU)
    with torch.no_grad():
        logits = model(input_ids=prompt).logits[0, -1]
    logits[eos] = -math.inf  # min_tokens=1: EOS cannot come first
    p = torch.softmax(logits, dim=-1)
    counts = torch.zeros(vocab)
    for step in range(steps):
        seqs = sampler(model, prompt.expand(batch, -1), 2, 1.0, eos, seed=1000 + step)
        counts += torch.bincount(seqs[:, 4], minlength=vocab).float()
    n = batch * steps
    assert counts[eos] == 0
    tv = 0.5 * (counts / n - p).abs().sum().item()
    assert tv < 0.06, (tv, counts / n, p)
    seen = p > 0
    chi2 = (((counts - n * p)[seen]) ** 2 / (n * p[seen])).sum().item()
    assert chi2 < 35.0, chi2  # 10 degrees of freedom: p < 1e-4 above 35.6
    assert p.max() > 2 / vocab  # the distribution is not near-uniform (a weak check otherwise)


def test_a_lora_student_samples_with_its_merged_weights(tmp_path):
    pytest.importorskip("peft")
    from train.lora import apply_lora, merge_lora

    model = varied_model(5)
    prompts = prompts_of(3, 6, seed=5)
    sampler = EngineSampler.for_student(model, tmp_path, 3, 6, 8, CPU)
    lora = apply_lora(model, {"r": 4})
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)  # peft starts B at zero: the adapters would change nothing
    ours = sampler(lora, prompts, 8, 0.0, None, 0)
    merged = merge_lora(lora)
    assert torch.equal(ours, generate_sequences(merged, prompts, 8, 0.0, None, 0))


def test_sampler_setting_is_checked():
    assert check_sampler("engine") == "engine" and check_sampler("transformers") == "transformers"
    with pytest.raises(Exception, match="sampler='vllm': expected one of auto, engine, transformers"):
        check_sampler("vllm")


def test_auto_sampler_is_the_engine_on_a_gpu_only():
    """On the CPU the engine measured 0.6x generate's speed (its plain-torch reference attention)."""
    assert resolve_sampler("auto", torch.device("cuda")) == "engine"
    assert resolve_sampler("auto", torch.device("cpu")) == "transformers"
    assert resolve_sampler("engine", torch.device("cpu")) == "engine"


STAGE = ["stage=distill", "distill=gkd", "student=half_depth", "logging=none", "data=pydoc", "data.max_docs=30",
         "data.block_size=48", "distill.batch_size=2", "distill.max_steps=4", "distill.checkpoint_every=0",
         "distill.val_batches=1", "distill.prompt_len=16", "distill.max_new_tokens=12", "distill.warmup_steps=1",
         "eval.context=64", "eval.stride=32", "eval.max_windows=2", "eval.datasets=[heldout]", "gates.context=32",
         "gates.windows=2"]


def _train_log(run) -> list[dict]:
    (log,) = list(run.glob("*.train_log.jsonl"))
    return [json.loads(line) for line in log.read_text().splitlines()]


def _stage(tiny_teacher, tmp_path, name: str, *overrides: str, launcher: list[str] | None = None) -> list[dict]:
    run = tmp_path / name
    cmd = [*(launcher or []), *STAGE, f"input={tiny_teacher}", f"run={run}", "distill.seq_kd=true",
           f"cache_dir={tmp_path / 'cache'}", *overrides]
    if launcher:
        result = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True, timeout=900,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    else:
        result = run_main(*cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    engine_note = "distill: student and teacher samples through the engine"
    assert (engine_note in result.stdout) == ("distill.sampler=engine" in overrides)  # auto on the CPU: transformers
    assert not list(run.glob(".engine_student-*")) and (run / "distill" / "shrink.json").is_file()
    log = _train_log(run)
    assert len(log) == 4 and all(math.isfinite(r["loss"]) for r in log)
    assert {r["source"] for r in log} == {"student", "teacher"}  # both samplers ran
    return log


@pytest.fixture(scope="module")
def transformers_greedy(tiny_teacher, tmp_path_factory) -> list[dict]:
    """The greedy stage's train log sampling through transformers: the reference of both tests below,
    run once for the file (the same command in each)."""
    return _stage(tiny_teacher, tmp_path_factory.mktemp("greedy"), "transformers", "distill.gen_temperature=0",
                  "distill.sampler=transformers")


def test_distill_stage_runs_gkd_and_seq_kd_through_the_engine(tiny_teacher, tmp_path, transformers_greedy):
    """At temperature 1 (the default) with the engine; greedy, the engine's run and transformers' run
    train on the same samples and log the same losses."""
    _stage(tiny_teacher, tmp_path, "sampled", "distill.sampler=engine")
    ours = _stage(tiny_teacher, tmp_path, "engine", "distill.gen_temperature=0", "distill.sampler=engine")
    theirs = transformers_greedy
    torch.testing.assert_close(torch.tensor([r["loss"] for r in ours]), torch.tensor([r["loss"] for r in theirs]),
                               rtol=1e-5, atol=1e-6)


def test_two_process_ddp_gkd_samples_through_an_engine_per_rank(tiny_teacher, tmp_path, transformers_greedy):
    """Each DDP rank builds its own engine and samples its own micro-batch; greedy, the two ranks at
    batch 1 match one process at batch 2 sampling through transformers' generate."""
    single = transformers_greedy
    ddp = _stage(tiny_teacher, tmp_path, "ddp", "distill.gen_temperature=0", "distill.batch_size=1", "distill.sampler=engine",
                 launcher=["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29743", "-m",
                           "shrink"])
    torch.testing.assert_close(torch.tensor([r["loss"] for r in ddp]), torch.tensor([r["loss"] for r in single]),
                               rtol=1e-4, atol=1e-5)


def test_unknown_sampler_is_refused_before_any_work(tiny_teacher, tmp_path):
    run = tmp_path / "run"
    result = run_cli(*STAGE, f"input={tiny_teacher}", f"run={run}", "distill.sampler=vllm")
    assert result.returncode == 2, result.stderr
    assert "distill.sampler='vllm': expected one of auto, engine, transformers" in result.stderr
    assert not (run / "distill").exists() and not list(run.glob("*.train_log.jsonl"))


def test_gkd_with_the_engine_sampler_resumes_exactly(tmp_path):
    """An interrupted GKD run resumed from its checkpoint, with fresh engines, draws the same samples
    and so logs the same losses."""
    from support import tiny_llama_config as config
    from train.loop import TrainConfig, train_distill
    from train.student_init import student_from_teacher

    def setup():
        torch.manual_seed(0)
        teacher = AutoModelForCausalLM.from_config(config()).eval()
        student = student_from_teacher(teacher, [0, 2])
        gen = torch.Generator().manual_seed(1)
        data = torch.randint(3, 320, (16, 24), generator=gen), torch.randint(3, 320, (4, 24), generator=gen)
        return teacher, student, *data, EngineSampler.for_student(student, tmp_path / "scratch", 2, 8, 6, CPU)

    tc = TrainConfig(max_steps=6, batch_size=2, warmup_steps=1, lr=1e-3, checkpoint_every=3, chunk_size=16,
                     val_batches=1, losses={"jsd": {"beta": 0.5}}, temperature=1.0, lmbda=1.0, prompt_len=8,
                     max_new_tokens=6)
    teacher, student, train, val, sampler = setup()
    train_distill(student, teacher, train, val, tc, tmp_path / "a" / "ckpt", student_sampler=sampler)
    log = [json.loads(line) for line in (tmp_path / "a" / "ckpt.train_log.jsonl").read_text().splitlines()]
    assert {r["source"] for r in log} == {"student"}

    class Stop(Exception):
        pass

    def stop(step, logs):
        if step == 4:
            raise Stop

    teacher, student, train, val, sampler = setup()
    with pytest.raises(Stop):
        train_distill(student, teacher, train, val, tc, tmp_path / "b" / "ckpt", on_step=stop,
                      student_sampler=sampler)
    teacher, student, train, val, sampler = setup()
    train_distill(student, teacher, train, val, tc, tmp_path / "b" / "ckpt", resume=True, student_sampler=sampler)
    resumed = {json.loads(line)["step"]: json.loads(line)["loss"]
               for line in (tmp_path / "b" / "ckpt.train_log.jsonl").read_text().splitlines()}
    for r in log:
        assert abs(resumed[r["step"]] - r["loss"]) <= 1e-5 * max(1.0, abs(r["loss"]))


def test_an_architecture_the_engine_does_not_run_names_the_setting(tmp_path):
    from transformers import GPT2Config

    from common.errors import ShrinkError
    from shrink.engine_sampler import engine_samplers

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ShrinkError, match=r"sampler=engine: unsupported architecture .*GPT2LMHeadModel.*"
                                          r"sampler=transformers"):
        engine_samplers(gpt2, tmp_path, 2, 4, 4, True, False, tmp_path, CPU)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_weights_pushed_into_a_graphed_gpu_engine_equal_a_fresh_engine_of_those_weights(tmp_path):
    """On a GPU the engine runs bf16 in CUDA graphs: weights copied in place must be what the graphs
    replay. Greedy after an update equals an engine loaded from a checkpoint of the updated weights
    (the same bf16 cast, the same kernels: identical tokens), and differs from before the update."""
    cuda = torch.device("cuda")
    model = varied_model(2).to(cuda)
    prompts = prompts_of(4, 6, seed=2).to(cuda)
    sampler = EngineSampler.for_student(model, tmp_path / "work", 4, 6, 12, cuda)
    assert sampler.llm.engine.runner.graphs is not None  # graphed: the case under test
    before = sampler(model, prompts, 12, 0.0, None, 0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.25)
    after = sampler(model, prompts, 12, 0.0, None, 0)
    model.save_pretrained(tmp_path / "updated")
    fresh = EngineSampler.for_teacher(tmp_path / "updated", 4, 6, 12, cuda)
    try:
        assert torch.equal(after, fresh(model, prompts, 12, 0.0, None, 0))
        assert not torch.equal(after, before)
    finally:
        fresh.close()
        sampler.close()

"""What a training step reads back from the device: on a GPU each read waits for every queued kernel,
so a read in the middle of the step leaves the GPU idle while the host queues the rest (issue 16: the
distill stage at 8k tokens per step ran at a third of its bare loop's rate)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from support import tiny_llama_config
from train.batches import PackedBlocks
from train.causal_attention import unmasked_causal
from train.config import TrainConfig
from train.host_reads import HostReads
from train.loop import _steady_rate, forward_hidden, train_distill
from train.student_init import student_from_teacher


def _models():
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_llama_config(num_hidden_layers=4)).eval()
    return teacher, student_from_teacher(teacher, [0, 1, 3])


def test_a_training_step_reads_the_device_once(tmp_path):
    teacher, student = _models()
    gen = torch.Generator().manual_seed(1)
    train, val = torch.randint(3, 320, (32, 24), generator=gen), torch.randint(3, 320, (4, 24), generator=gen)
    tc = TrainConfig(max_steps=5, batch_size=4, warmup_steps=1, chunk_size=16, checkpoint_every=0, val_batches=1,
                     losses={"forward_kl": 1.0, "ce": 0.5})
    reads, marks = HostReads(), []
    with reads:
        train_distill(student, teacher, train, val, tc, tmp_path / "ckpt",
                      on_step=lambda step, logs: marks.append(len(reads.where)))
    per_step = [reads.where[a:b] for a, b in zip(marks, marks[1:])]
    # The one read: the step's logged loss parts, together, after its update is queued (it was four in
    # our loop, plus one per model forward in transformers' mask preparation).
    assert [len(r) for r in per_step] == [1] * 4, per_step


def test_unmasked_causal_forward_is_the_masked_path_without_the_read():
    teacher, _ = _models()
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(2))
    reference = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
    reads = HostReads()
    with reads:
        got = forward_hidden(teacher, ids)
    assert reads.where == []
    assert torch.equal(got, reference)
    assert teacher.config._attn_implementation == "sdpa"  # restored: a saved model carries no name of ours
    with unmasked_causal(teacher.config, torch.ones_like(ids)):  # a padded batch keeps transformers' masks
        assert teacher.config._attn_implementation == "sdpa"


def test_a_sliding_window_model_keeps_its_masks():
    from transformers import MistralConfig

    config = MistralConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(2))
    with unmasked_causal(model.config, None):
        assert model.config._attn_implementation == "sdpa"  # the window is in the mask: not ours to drop
    assert torch.equal(forward_hidden(model, ids), model.model(input_ids=ids, use_cache=False).last_hidden_state)


def test_blocking_copies_to_a_device_count_as_waits():
    x = torch.ones(3)
    reads = HostReads()
    with reads:
        x.to("meta"), x.to(torch.device("meta"), torch.float16), torch.tensor([1.0], device="meta")
        x.to("meta", non_blocking=True), x.to(torch.float64), x.to("cpu"), torch.tensor([1.0])
    assert len(reads.where) == 3, reads.where


def test_batches_count_their_tokens_on_the_host():
    blocks = PackedBlocks(torch.randint(3, 320, (6, 10)))
    batch = blocks.collate(torch.tensor([0, 2, 4])).to(torch.device("cpu"))
    reads = HostReads()
    with reads:
        assert batch.num_tokens == 27 and batch.counted_tokens(slice(1, 3)) == 18
    assert reads.where == []
    masked = blocks.collate(torch.tensor([1, 3]))
    masked.labels = masked.labels.clone()
    masked.labels[0, :4] = -100
    masked.row_tokens = None  # counted from the labels when it moves
    moved = masked.to(torch.device("cpu"))
    assert moved.row_tokens == [5, 9] and moved.counted_tokens(slice(0, 1)) == 5


def test_metrics_name_what_tokens_per_s_includes_besides_steps(tmp_path):
    teacher, student = _models()
    data = torch.randint(3, 320, (20, 16), generator=torch.Generator().manual_seed(3))
    tc = TrainConfig(max_steps=4, batch_size=2, warmup_steps=1, chunk_size=32, checkpoint_every=2, eval_every=2,
                     val_batches=1)
    metrics = train_distill(student, teacher, data[:16], data[16:], tc, tmp_path / "ckpt")["metrics"]
    assert metrics["first_step_s"] > 0 and metrics["checkpoint_s"] > 0 and metrics["eval_s"] > 0
    assert metrics["steady_tokens_per_s"] > 0 and metrics["tokens_per_s"] > 0  # which is larger is timing: not asserted


def test_the_steady_rate_leaves_out_the_first_step_checkpoints_and_evaluations():
    # CI failed on `steady > tokens_per_s` of a real 4-step run: on a loaded machine the later steps can be slower
    # than the first, so the relation is timing. What the rate leaves out is arithmetic, and is tested here.
    spent = {"first_step_s": 4.0, "checkpoint_s": 1.0, "eval_s": 3.0}
    assert _steady_rate(120, 14.0, spent) == pytest.approx(120 / 6.0)
    assert _steady_rate(120, 8.0, spent) is None and _steady_rate(0, 14.0, spent) is None


@pytest.mark.gpu
def test_on_cuda_a_step_reads_once_and_its_copies_and_forwards_are_exact(tmp_path):
    dev = torch.device("cuda")
    teacher, student = _models()
    gen = torch.Generator().manual_seed(1)
    train, val = torch.randint(3, 320, (32, 24), generator=gen), torch.randint(3, 320, (4, 24), generator=gen)
    batch = PackedBlocks(train).collate(torch.tensor([3, 1, 4])).to(dev)  # pinned, non-blocking
    rows = train[[3, 1, 4]]
    assert torch.equal(batch.input_ids.cpu(), rows) and torch.equal(batch.labels.cpu(), rows[:, 1:])
    teacher = teacher.to(dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        reference = teacher.model(input_ids=batch.input_ids, use_cache=False).last_hidden_state
        assert torch.equal(forward_hidden(teacher, batch.input_ids), reference)
    tc = TrainConfig(max_steps=5, batch_size=4, warmup_steps=1, chunk_size=16, checkpoint_every=0, val_batches=1,
                     losses={"forward_kl": 1.0, "ce": 0.5}, compile_loss=False)
    reads, marks = HostReads(), []
    with reads:
        train_distill(student, teacher, train, val, tc, tmp_path / "ckpt",
                      on_step=lambda step, logs: marks.append(len(reads.where)))
    assert [b - a for a, b in zip(marks, marks[1:])] == [1] * 4, reads.where

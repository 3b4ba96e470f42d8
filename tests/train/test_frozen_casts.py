"""The frozen teacher's Linear weights cast once per run: the same bits as autocast's per-forward casts,
fewer cast ops, and the teacher's own parameters back in place outside the window."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaForCausalLM

import train.loop as loop
from support import tiny_llama_config
from train.config import TrainConfig
from train.frozen_casts import FrozenCasts, autocast_dtype
from train.loop import forward_hidden, train_distill
from train.student_init import student_from_teacher

LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


def _models():
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config(hidden_size=32, intermediate_size=64, num_hidden_layers=4))
    return teacher.eval().requires_grad_(False), student_from_teacher(teacher, [0, 2]).float().train()


class _Casts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func is torch.ops.aten._to_copy.default
        return func(*args, **(kwargs or {}))


def test_swapped_weights_give_the_autocast_forward_bitwise_with_fewer_casts():
    teacher, _ = _models()
    originals = {n: p for n, p in teacher.named_parameters()}
    ids = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    casts = FrozenCasts(teacher, torch.bfloat16)
    assert len(casts) == LINEARS_PER_LAYER * 4
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with _Casts() as plain:
            ref = forward_hidden(teacher, ids)
        with casts.active(), _Casts() as swapped:
            got = forward_hidden(teacher, ids)
            assert teacher.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert torch.equal(got, ref)
    assert plain.n - swapped.n == LINEARS_PER_LAYER * 4
    # outside the window: the caller's own fp32 parameters, the very objects
    assert all(p is originals[n] and p.dtype == torch.float32 for n, p in teacher.named_parameters())


def test_only_frozen_weights_are_cast_and_no_dtype_casts_nothing():
    teacher, student = _models()
    assert len(FrozenCasts(student, torch.bfloat16)) == 0  # trained: autocast caches their casts itself
    assert len(FrozenCasts(teacher, None)) == 0 and len(FrozenCasts(None, torch.bfloat16)) == 0
    assert len(FrozenCasts(teacher.to(torch.bfloat16), torch.bfloat16)) == 0  # already in the dtype
    assert autocast_dtype("bf16") is torch.bfloat16 and autocast_dtype("no") is None


@pytest.fixture
def bf16_cpu_accelerator():
    """accelerate's state is process-wide and set once: reset around an Accelerator with CPU bf16 autocast."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield lambda: Accelerator(cpu=True, mixed_precision="bf16")
    AcceleratorState._reset_state(reset_partial_state=True)


def test_train_distill_under_bf16_autocast_trains_as_with_autocasts_own_casts(tmp_path, bf16_cpu_accelerator,
                                                                               monkeypatch):
    gen = torch.Generator().manual_seed(2)
    train, val = torch.randint(3, 320, (16, 24), generator=gen), torch.randint(3, 320, (4, 24), generator=gen)
    runs = {}
    for swapped in (True, False):
        made = []
        monkeypatch.setattr(loop, "FrozenCasts", lambda model, dtype, s=swapped: made.append(
            FrozenCasts(model, dtype if s else None)) or made[-1])
        teacher, student = _models()
        originals = list(teacher.parameters())
        tc = TrainConfig(max_steps=3, batch_size=4, warmup_steps=1, chunk_size=16, checkpoint_every=0,
                         val_batches=1, compile_loss=False)
        logs = []
        out = train_distill(student, teacher, train, val, tc, tmp_path / f"ckpt{swapped}",
                            accelerator=bf16_cpu_accelerator(), on_step=lambda step, entry: logs.append(entry["loss"]))
        runs[swapped] = logs, out["model"].state_dict()
        assert len(made[0]) == (LINEARS_PER_LAYER * 4 if swapped else 0)  # the loop ran under bf16 autocast
        assert all(p is q for p, q in zip(teacher.parameters(), originals, strict=True))
    assert runs[True][0] == runs[False][0]
    assert all(torch.equal(runs[True][1][k], runs[False][1][k]) for k in runs[False][1])

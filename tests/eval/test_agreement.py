"""Agreement with the teacher: a model agrees with itself completely, another model does not."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from support import tiny_llama_config
from eval.agreement import agreement, fixed_windows, teacher_reference
from common.errors import ShrinkError


def _model(seed: int):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_llama_config()).eval()


def test_fixed_windows_are_evenly_spaced_and_repeatable():
    ids = torch.arange(1000)
    w = fixed_windows(ids, 3, 100)
    assert w.shape == (3, 100)
    assert [int(r[0]) for r in w] == [0, 450, 900] and int(w[-1, -1]) == 999
    assert torch.equal(w, fixed_windows(ids, 3, 100))
    assert torch.equal(fixed_windows(ids, 1, 10)[0], ids[:10])
    with pytest.raises(ShrinkError, match="eval.agreement.window_len"):
        fixed_windows(ids[:5], 1, 10)


def test_self_agreement_is_total_and_another_model_is_not():
    teacher, other = _model(0), _model(1)
    ids = torch.randint(3, 320, (600,), generator=torch.Generator().manual_seed(0))
    ref = teacher_reference(teacher, fixed_windows(ids, 2, 64))
    same = agreement(teacher, ref)
    assert same["top1_agreement"] == 1.0
    assert same["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    diff = agreement(other, ref)
    assert diff["top1_agreement"] < 1.0 and diff["kl_to_teacher"] > 1e-3

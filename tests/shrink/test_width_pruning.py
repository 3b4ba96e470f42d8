"""Minitron width pruning of attention heads: heads ranked by the norm of their output on
calibration data, removed evenly from each GQA group so the key/value heads stay valid."""

from __future__ import annotations

import pytest
import torch
from support import tiny_llama_config

from common.errors import ShrinkError
from train.importance import channel_importance
from train.student_init import prune_width


def teacher(**overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config(**overrides)).eval()


def test_head_importance_is_the_summed_norm_of_each_head_output():
    model = teacher()
    ids = torch.randint(3, 320, (2, 16))
    imp = channel_importance(model, ids, batch_size=1)
    captured = []
    hook = model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda _m, a: captured.append(a[0]))
    with torch.no_grad():
        model.model(input_ids=ids)
    hook.remove()
    expected = captured[0].reshape(-1, 4, 16).norm(dim=-1).sum(0).double()
    assert imp["heads.1"].shape == (4,) and torch.allclose(imp["heads.1"], expected, rtol=1e-4)
    assert set(imp) >= {"hidden", "mlp.0", "heads.0", "heads.3"}


def test_heads_leave_each_gqa_group_evenly_by_importance():
    model = teacher()  # 4 query heads, 2 key/value heads: groups (0, 1) and (2, 3)
    scores = {f"heads.{i}": torch.tensor([0.1, 0.9, 0.8, 0.2]) for i in range(4)}
    student = prune_width(model, importance=scores, num_attention_heads=2)
    assert student.config.num_attention_heads == 2 and student.config.num_key_value_heads == 2
    assert student.config.head_dim == 16 and student.config.hidden_size == 64
    t_attn, s_attn = model.model.layers[2].self_attn, student.model.layers[2].self_attn
    # head 1 from group 0 and head 2 from group 1, in order; k/v untouched
    assert torch.equal(s_attn.q_proj.weight, torch.cat([t_attn.q_proj.weight[16:32], t_attn.q_proj.weight[32:48]]))
    assert torch.equal(s_attn.o_proj.weight,
                       torch.cat([t_attn.o_proj.weight[:, 16:32], t_attn.o_proj.weight[:, 32:48]], 1))
    assert torch.equal(s_attn.k_proj.weight, t_attn.k_proj.weight)
    ids = torch.randint(3, 320, (1, 8))
    with torch.no_grad():
        assert torch.isfinite(student(input_ids=ids).logits).all()


def test_head_pruning_matches_the_teacher_when_the_removed_heads_are_silent():
    """Zero the o_proj columns of the heads that go: the student computes exactly the teacher (the
    slicing of q_proj rows and o_proj columns is exact)."""
    model = teacher()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, 16:32] = 0  # head 1 (group 0)
            layer.self_attn.o_proj.weight[:, 48:64] = 0  # head 3 (group 1)
    ids = torch.randint(3, 320, (2, 12))
    scores = {f"heads.{i}": torch.tensor([0.9, 0.1, 0.9, 0.1]) for i in range(4)}
    student = prune_width(model, importance=scores, num_attention_heads=2)
    with torch.no_grad():
        assert torch.allclose(student(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
    # without scores, the weight norm of the o_proj columns ranks them: the silent heads go too
    with torch.no_grad():
        assert torch.allclose(prune_width(model, num_attention_heads=2)(input_ids=ids).logits,
                              model(input_ids=ids).logits, atol=1e-5)


def test_heads_with_hidden_and_mlp_together():
    model = teacher()
    ids = torch.randint(3, 320, (2, 12))
    student = prune_width(model, 48, 96, channel_importance(model, ids, 2), num_attention_heads=2)
    c = student.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.head_dim) == (48, 96, 2, 16)
    assert student.model.layers[0].self_attn.q_proj.weight.shape == (32, 48)
    with torch.no_grad():
        assert torch.isfinite(student(input_ids=ids).logits).all()


@pytest.mark.parametrize("heads", [3, 1, 6])
def test_head_counts_that_break_the_groups_are_refused(heads):
    with pytest.raises(ShrinkError, match=f"student.width.num_attention_heads={heads}: must be a multiple"):
        prune_width(teacher(), num_attention_heads=heads)


def test_the_teachers_head_count_prunes_nothing():
    model = teacher()
    assert prune_width(model, num_attention_heads=4) is model


@pytest.mark.parametrize("tied", [True, False])
def test_every_weight_and_buffer_of_the_student_comes_from_the_teacher(tied):
    """The student is built on the meta device and filled: each weight is its teacher slice (an untied
    head included), a tied head stays tied, and the rotary buffers, which no state dict holds, are the
    teacher's."""
    model = teacher(tie_word_embeddings=tied)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms: random, so that a wrong or missing copy shows
                p.uniform_(0.5, 1.5)
    ids = torch.randint(3, 320, (2, 12))
    student = prune_width(model, 48, 96, channel_importance(model, ids, 2), num_attention_heads=2)
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tied
    assert student.training and all(p.requires_grad for p in student.parameters())
    t, s = model.state_dict(), student.state_dict()
    # the kept hidden channels, found from the embedding's columns (random: each matches one)
    h_idx = torch.tensor([int((t["model.embed_tokens.weight"] == col[:, None]).all(0).nonzero())
                          for col in s["model.embed_tokens.weight"].T])
    assert h_idx.shape == (48,) and h_idx.unique().numel() == 48
    assert torch.equal(s["lm_head.weight"], t["lm_head.weight"][:, h_idx])
    for name in s:
        if name.endswith("norm.weight"):
            assert torch.equal(s[name], t[name][h_idx]), name
        if name.endswith("k_proj.weight"):
            assert torch.equal(s[name], t[name][:, h_idx]), name
    assert all(torch.isfinite(v).all() for v in s.values())
    t_buffers = dict(model.named_buffers())
    assert all(torch.equal(b, t_buffers[k]) for k, b in student.named_buffers())


def test_the_student_is_built_on_the_meta_device(monkeypatch):
    """No random initialisation of the narrower model on the host: every weight is copied in afterwards."""
    from transformers import AutoModelForCausalLM

    model = teacher()
    built_on, from_config = [], AutoModelForCausalLM.from_config

    def recording(*args, **kwargs):
        built_on.append(torch.empty(0).device.type)
        return from_config(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", recording)
    prune_width(model, 48, 96)
    assert built_on == ["meta"]

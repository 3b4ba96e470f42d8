"""Layer maps, projection shapes, and the intermediate-layer loss against a direct computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from support import tiny_llama_config
from common.errors import ShrinkError, config_section
from train.layer_distill import (LayerPair, LayerProjector, auto_layer_map, capture_layers, layer_loss,
                                 parse_layer_map)


def test_layer_map_specs():
    assert auto_layer_map([0, 2, 5], 8) == [LayerPair(0, 1), LayerPair(1, 4), LayerPair(2, 7)]
    assert parse_layer_map("auto", 3, 8, keep=[0, 2, 5]) == auto_layer_map([0, 2, 5], 8)
    assert parse_layer_map({0: 3, 2: 7}, 3, 8) == [LayerPair(0, 3), LayerPair(2, 7)]
    assert parse_layer_map([[1, 4, 0.5]], 3, 8) == [LayerPair(1, 4, 0.5)]
    assert parse_layer_map(None, 3, 8) == []
    with pytest.raises(ShrinkError, match="distill.layer_map"), config_section("distill"):
        parse_layer_map({3: 1}, 3, 8)
    with pytest.raises(ShrinkError, match="distill.layer_map=auto"), config_section("distill"):
        parse_layer_map("auto", 3, 8)


def test_projection_shapes_and_identity_when_widths_match():
    pairs = [LayerPair(0, 1), LayerPair(2, 5)]
    proj = LayerProjector(pairs, 48, 64)
    assert proj.needed and set(proj.proj) == {"0", "2"}
    assert proj(2, torch.randn(3, 7, 48)).shape == (3, 7, 64)
    same = LayerProjector(pairs, 64, 64)
    x = torch.randn(2, 5, 64)
    assert not same.needed and len(list(same.parameters())) == 0 and same(0, x) is x


def test_captured_states_and_loss_match_a_direct_computation():
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_llama_config(num_hidden_layers=4)).eval()
    student = AutoModelForCausalLM.from_config(tiny_llama_config(num_hidden_layers=2, hidden_size=32,
                                                                 intermediate_size=64, num_attention_heads=2,
                                                                 num_key_value_heads=1))
    ids = torch.randint(3, 320, (2, 9), generator=torch.Generator().manual_seed(2))
    pairs = [LayerPair(0, 1, 2.0), LayerPair(1, 3, 1.0)]
    proj = LayerProjector(pairs, 32, 64)
    with capture_layers(student, [0, 1]) as s_states:
        student.model(input_ids=ids)
    with torch.no_grad(), capture_layers(teacher, [1, 3]) as t_states:
        teacher.model(input_ids=ids)
    # Reference: the hidden_states tuple entry i+1 is the output of layer i (for all but the last layer).
    ref_t = teacher(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(t_states[1], ref_t[2])
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    for kind in ("mse", "cosine"):
        loss, value = layer_loss(s_states, t_states, pairs, proj, kind, mask)
        terms = []
        for p in pairs:
            s, t = proj(p.student, s_states[p.student]), t_states[p.teacher]
            d = (s - t).pow(2).mean(-1) if kind == "mse" else 1 - F.cosine_similarity(s, t, dim=-1)
            terms.append(p.weight * d[mask].mean())
        torch.testing.assert_close(loss, sum(terms) / 3.0)
        grads = torch.autograd.grad(loss, [proj.proj["0"].weight, student.model.layers[0].mlp.up_proj.weight],
                                    retain_graph=True)
        assert all(g.abs().sum() > 0 for g in grads)

"""Student initialisation: depth specs, importance, width pruning, scratch config, vocab mismatch."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from support import make_tiny_tokenizer, tiny_llama_config
from common.errors import ShrinkError
from train.importance import block_influence, channel_importance, drop_one_loss, top_layers
from train.student_init import (check_same_vocab, parse_keep_layers, prune_width, student_from_config,
                                student_from_teacher)


def _teacher(layers: int = 6):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config(num_hidden_layers=layers)).eval()


def _ids(n=4, t=24):
    return torch.randint(3, 320, (n, t), generator=torch.Generator().manual_seed(1))


def test_keep_layer_specs():
    assert parse_keep_layers("every:2", 6) == [0, 2, 4]
    assert parse_keep_layers("first:2", 6) == [0, 1]
    assert parse_keep_layers([5, 1], 6) == [1, 5]
    assert parse_keep_layers("importance:3", 6, scores=[0.1, 0.9, 0.0, 0.5, 0.2, 0.05]) == [0, 1, 5]
    with pytest.raises(ShrinkError, match="student.keep_layers"):
        parse_keep_layers("importance:3", 6)
    with pytest.raises(ShrinkError, match="student.keep_layers"):
        parse_keep_layers([0, 0], 6)
    assert top_layers([0.3, 0.2, 0.9, 0.1], 2) == [0, 2]


def test_importance_scores_are_finite_and_drop_loss_measures_removal():
    teacher, ids = _teacher(), _ids()
    bi = block_influence(teacher, ids, batch_size=2)
    assert len(bi) == 6 and all(0.0 <= s <= 2.0 for s in bi)
    drop = drop_one_loss(teacher, ids, batch_size=2)
    assert len(drop) == 6 and all(torch.isfinite(torch.tensor(drop)))
    assert len(teacher.model.layers) == 6  # restored after the drop-one passes


def test_student_keeps_the_chosen_teacher_layers_exactly():
    teacher, ids = _teacher(), _ids()
    student = student_from_teacher(teacher, [0, 3, 5])
    assert student.config.num_hidden_layers == 3
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    assert student(ids).logits.shape == teacher(ids).logits.shape
    student.generate(ids[:, :5], max_new_tokens=3, do_sample=False)  # KV cache follows the new numbering


def test_width_pruning_keeps_the_most_important_channels():
    teacher, ids = _teacher(layers=2), _ids()
    imp = channel_importance(teacher, ids, batch_size=2)
    narrow = prune_width(teacher, hidden_size=48, intermediate_size=96, importance=imp)
    assert narrow.config.hidden_size == 48 and narrow.config.intermediate_size == 96
    assert narrow.model.layers[0].self_attn.q_proj.weight.shape == (64, 48)  # heads keep their head_dim
    assert narrow.model.layers[1].mlp.down_proj.weight.shape == (48, 96)
    keep_h = imp["hidden"].topk(48).indices.sort().values
    keep_m = imp["mlp.1"].topk(96).indices.sort().values
    torch.testing.assert_close(narrow.model.layers[1].mlp.down_proj.weight,
                               teacher.model.layers[1].mlp.down_proj.weight[keep_h][:, keep_m])
    torch.testing.assert_close(narrow.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, keep_h])
    assert torch.isfinite(narrow(ids).logits).all() and narrow(ids).logits.shape[-1] == 320
    # Without activations: by weight norm.
    assert prune_width(teacher, intermediate_size=64).config.intermediate_size == 64
    with pytest.raises(ShrinkError, match="student.width.hidden_size"):
        prune_width(teacher, hidden_size=100)


def test_scratch_student_from_config():
    teacher = _teacher()
    student = student_from_config(teacher.config, {"num_hidden_layers": 2, "hidden_size": 32,
                                                   "intermediate_size": 64})
    assert student.config.num_hidden_layers == 2 and student(_ids()).logits.shape[-1] == 320
    with pytest.raises(ShrinkError, match="student.config.vocab_size"):
        student_from_config(teacher.config, {"vocab_size": 100})
    with pytest.raises(ShrinkError, match="student.config.nope"):
        student_from_config(teacher.config, {"nope": 1})


def test_vocab_mismatch_is_a_clear_error():
    tok = make_tiny_tokenizer(320)
    check_same_vocab(tok, make_tiny_tokenizer(320), 320, 320)
    with pytest.raises(ShrinkError, match="student's vocabulary has 300 entries, the teacher's 320"):
        check_same_vocab(tok, make_tiny_tokenizer(300), 320, 300)
    with pytest.raises(ShrinkError, match="tokenizers differ"):
        check_same_vocab(tok, make_tiny_tokenizer(330))

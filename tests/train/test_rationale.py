"""Rationale distillation data: PaLM rationales on the real files, multi-task batches, teacher cache."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from support import make_tiny_tokenizer, tiny_llama_config
from common.errors import ShrinkError
from common.tasks import TaskExample, get_task
from eval.tasks import generate_answers
from train.rationale import MultiTaskExamples, attach_rationales, cut_rationale, palm_rationales, teacher_rationales


def test_palm_rationales_align_with_the_real_examples(shared_data_dir):
    for task_name, split, n in [("cqa", "train", 9741), ("cqa", "test", 1221), ("svamp", "train", 800),
                                ("svamp", "test", 200)]:
        examples = get_task(task_name).load(shared_data_dir, split)
        rationales = palm_rationales(shared_data_dir, task_name, split)
        assert len(rationales) == len(examples) == n
        assert all("\n\nQ:" not in r and r for r in rationales)
    cqa = get_task("cqa").load(shared_data_dir, "test")
    r = palm_rationales(shared_data_dir, "cqa", "test")
    assert r[0] == ("The answer must be the place where beavers get their supplies. Of the above choices, only "
                    "wooded areas have the supplies that beavers need. So the answer is (c) wooded area.")
    # The PaLM rationale's final answer matches the gold label for most examples (it is a teacher, not an oracle).
    agree = sum(ex.answer.lower() in rat.lower().split("so the answer is")[-1] for ex, rat in zip(cqa, r))
    assert agree / len(cqa) > 0.6
    with pytest.raises(ShrinkError, match="rationales for"):
        attach_rationales(cqa, r[:-1], "palm")


def test_cut_rationale():
    assert cut_rationale(" So 3.\n\nQ: next question\nA: blah") == "So 3."


def _examples(n=6):
    return [TaskExample(str(i), f"What is {i} plus {i}?", str(2 * i), {}) for i in range(n)]


def test_multitask_batch_masks_prompts_and_weights_the_tasks():
    tok = make_tiny_tokenizer()
    exs = _examples()
    data = MultiTaskExamples([(ex, f"{i} and {i} make {2 * i}.") for i, ex in enumerate(exs)], tok, alpha=0.3,
                             max_len=64)
    batch = data.collate(torch.tensor([1, 4]))
    assert batch.input_ids.shape[0] == 4 and [g[0] for g in batch.groups] == ["label", "rationale"]
    assert [g[2] for g in batch.groups] == [0.3, pytest.approx(0.7)]
    # The label rows score exactly " <answer></s>", the rationale rows exactly " <rationale></s>".
    for row, text in [(0, " 2"), (1, " 8"), (2, " 1 and 1 make 2."), (3, " 4 and 4 make 8.")]:
        targets = batch.labels[row][batch.labels[row] != -100].tolist()
        assert targets == tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n_real = int(batch.attention_mask[row].sum())
        assert (batch.labels[row, n_real - 1:] == -100).all()  # nothing scored past the sequence
    label_only = MultiTaskExamples([(ex, None) for ex in exs], tok)
    b = label_only.collate(torch.tensor([0, 1, 2]))
    assert b.input_ids.shape[0] == 3 and b.groups == [("label", slice(0, 3), 1.0)]


def test_teacher_rationales_are_cached(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config())
    tok = make_tiny_tokenizer()
    calls = []
    real_generate = model.generate
    model.generate = lambda *a, **k: calls.append(1) or real_generate(*a, **k)
    exs = _examples(3)
    shots = "Q: What is 1 plus 1?\nA: 1 and 1 make 2. So the answer is 2.\n\n"
    generate = lambda prompts: generate_answers(model, tok, prompts, 8, batch_size=2)  # noqa: E731
    first = teacher_rationales(generate, exs, shots, tmp_path, "tiny", max_new_tokens=8)
    assert len(first) == 3 and len(calls) == 2
    cache_files = list((tmp_path / "rationales").glob("*.json"))
    assert len(cache_files) == 1 and len(json.loads(cache_files[0].read_text())) == 3
    again = teacher_rationales(generate, exs, shots, tmp_path, "tiny", max_new_tokens=8)
    assert again == first and len(calls) == 2  # served from disk


def test_stage_task_data_matches_the_config(shared_data_dir):
    """The distill stage's typed task data: the split and the rationales the `data` group asks for."""
    from omegaconf import OmegaConf

    from shrink.stages.distill import TaskDataSpec, load_task_data

    d = OmegaConf.create({"task": "cqa", "rationale": "palm", "alpha": 0.5, "max_len": 96, "max_train": 60,
                          "val_fraction": 0.1, "max_eval": 6, "eval_split": "test"})
    spec = TaskDataSpec.from_cfg(d)
    data = load_task_data(spec, shared_data_dir, make_tiny_tokenizer())
    assert (len(data.train), len(data.val), len(data.test)) == (54, 6, 6)
    assert data.train.with_rationale and data.task.name == "cqa"
    label_only = load_task_data(TaskDataSpec("cqa", "none", max_train=60, min_val=7), shared_data_dir,
                                make_tiny_tokenizer())
    assert len(label_only.val) == 7 and not label_only.train.with_rationale
    with pytest.raises(ShrinkError, match="data.rationale='nope'"):
        load_task_data(TaskDataSpec("cqa", "nope"), shared_data_dir, make_tiny_tokenizer())

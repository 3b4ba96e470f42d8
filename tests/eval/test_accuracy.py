"""Task accuracy through the engine: exact scoring of forced answers, and a real engine run whose
answers are transformers' greedy answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import make_tiny_tokenizer, save_tiny_artifact
from eval.accuracy import engine_generate, load_examples, tasks_accuracy
from common.tasks import get_task, render_prompt
from eval.tasks import generate_answers
from common.errors import ShrinkError

CQA_ROWS = [
    {"id": "q1", "question": "Where do fish live?", "choices": ["sky", "water", "desk", "tree", "car"], "answer": "water"},
    {"id": "q2", "question": "What is hot?", "choices": ["ice", "snow", "fire", "rain", "fog"], "answer": "fire"},
    {"id": "q3", "question": "What flies?", "choices": ["bird", "rock", "fish", "shoe", "cup"], "answer": "bird"},
    {"id": "q4", "question": "What is cold?", "choices": ["sun", "oven", "ice", "lava", "tea"], "answer": "ice"},
]


def test_forced_answers_score_exactly(task_dir: Path):
    examples = load_examples("cqa", task_dir, "test", limit=4)
    assert [e.id for e in examples] == ["q1", "q2", "q3", "q4"]
    forced = {render_prompt(e.question): a for e, a in zip(examples, ["water", "(c) Fire.", "rock", None])}
    tokenizer = make_tiny_tokenizer()
    seen: list[int] = []

    def stub(prompts: list[list[int]], max_tokens: list[int]) -> list[str | None]:
        seen.extend(max_tokens)
        return [forced[tokenizer.decode(p)] for p in prompts]

    result = tasks_accuracy(stub, tokenizer, {"cqa": (get_task("cqa"), examples)})["cqa"]
    assert result["accuracy"] == 0.5 and result["n"] == 4 and result["errors"] == 1
    assert seen == [get_task("cqa").max_answer_tokens] * 4
    assert [e["correct"] for e in result["examples"]] == [True, True, False]


def test_tasks_share_one_call_and_keep_their_answer_lengths(task_dir: Path):
    examples = load_examples("cqa", task_dir, "test", limit=4)
    calls: list[list[int]] = []

    def stub(prompts: list[list[int]], max_tokens: list[int]) -> list[str | None]:
        calls.append(max_tokens)
        return ["water"] * len(prompts)

    tasks = {"cqa": (get_task("cqa"), examples[:2]), "gsm8k": (get_task("gsm8k"), examples[2:])}
    result = tasks_accuracy(stub, make_tiny_tokenizer(), tasks)
    cqa_len = get_task("cqa").max_answer_tokens
    assert calls == [[cqa_len, cqa_len, get_task("gsm8k").max_answer_tokens, get_task("gsm8k").max_answer_tokens]]
    assert result["cqa"]["accuracy"] == 0.5 and result["gsm8k"]["accuracy"] == 0.0


def test_limit_takes_the_first_examples_and_names_the_key(task_dir: Path):
    assert [e.id for e in load_examples("cqa", task_dir, "test", limit=2)] == ["q1", "q2"]
    with pytest.raises(ShrinkError, match="eval.tasks.names"):
        load_examples("mmlu", task_dir, "test", limit=2)


def test_engine_answers_are_transformers_greedy_answers(task_dir: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    from engine import LLM

    model_dir = save_tiny_artifact(tmp_path / "m", seed=3)
    examples = load_examples("cqa", task_dir, "test", limit=4)
    llm = LLM(str(model_dir), max_model_len=256, max_num_seqs=4, device="cpu", dtype="float32")
    task = get_task("cqa")
    result = tasks_accuracy(engine_generate(llm), llm.tokenizer, {"cqa": (task, examples)})["cqa"]
    assert result["n"] == 4 and result["errors"] == 0 and 0.0 <= result["accuracy"] <= 1.0
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    expected = generate_answers(hf, llm.tokenizer, [render_prompt(e.question) for e in examples],
                                task.max_answer_tokens)
    assert [e["prediction"] for e in result["examples"]] == expected[:3]
    assert result["accuracy"] == sum(task.is_correct(p, e) for p, e in zip(expected, examples)) / 4

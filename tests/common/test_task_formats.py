"""Task loading, answer parsing and exact scoring on the real CQA / SVAMP / GSM8K files."""

from __future__ import annotations

import pytest

from common.errors import ShrinkError
from common.tasks import eval_arithmetic, get_task, parse_cqa, parse_gsm8k, parse_svamp, render_prompt


def test_cqa_real_files_and_exact_match(shared_data_dir):
    task = get_task("cqa")
    train, test = task.load(shared_data_dir, "train"), task.load(shared_data_dir, "test")
    assert (len(train), len(test)) == (9741, 1221)
    ex = test[0]
    assert ex.question.startswith("A beaver is know for building prowess")
    assert "(c) wooded area" in ex.question and ex.answer == "wooded area"
    assert task.is_correct(" wooded area", ex)
    assert task.is_correct("(c) Wooded area.", ex)
    assert not task.is_correct("wooded", ex)
    assert not task.is_correct("body of water", ex)
    # Every gold answer is one of its choices, so an oracle scores 100%.
    assert all(task.is_correct(e.answer, e) for e in test)


def test_svamp_real_files_equations_evaluate(shared_data_dir):
    task = get_task("svamp")
    train, test = task.load(shared_data_dir, "train"), task.load(shared_data_dir, "test")
    assert (len(train), len(test)) == (800, 200)
    ex = test[0]
    assert ex.answer == "( 10.0 * 45.0 )" and eval_arithmetic(ex.answer) == 450.0
    assert task.is_correct("(10 * 45)", ex) and task.is_correct("450", ex) and task.is_correct(" 45*10", ex)
    assert not task.is_correct("10 + 45", ex) and not task.is_correct("no idea", ex)
    assert all(eval_arithmetic(e.answer) is not None for e in train + test)


def test_gsm8k_real_file(shared_data_dir):
    task = get_task("gsm8k")
    test = task.load(shared_data_dir, "test")
    assert len(test) == 1319 and test[0].answer == "18"
    assert task.is_correct("She makes 9 * 2 = $18 a day. #### 18", test[0])
    assert not task.is_correct("#### 17", test[0])
    assert parse_gsm8k("1,234 apples") == 1234.0


def test_parsers():
    assert parse_cqa("(b) body of water\nsomething else") == "body of water"
    assert parse_svamp("( 76.0 - 25.0 )") == 51.0
    assert parse_svamp("The answer is 12.") == 12.0
    assert eval_arithmetic("__import__('os')") is None and eval_arithmetic("1/0") is None
    assert render_prompt("Q?").startswith("[label] Q?")
    with pytest.raises(ShrinkError, match="data.task"):
        get_task("mmlu")

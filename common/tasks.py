"""Reasoning tasks: load examples, format the question, parse a model's answer, score exactly.
Shared by train (rationale data) and eval (accuracy); plain Python, no model code.

- CommonsenseQA: the question with its five choices; the answer is the text of the right choice
  (a leading "(c)" is accepted); exact match after lower-casing and trimming.
- SVAMP: the word problem; the label is an equation such as "( 10.0 * 45.0 )"; a prediction is
  correct if it evaluates (arithmetic only, parsed safely) to the gold value.
- GSM8K: the word problem; gold is the number after "####"; the last number of the prediction counts.

Files are those of the Distilling Step-by-Step release under `<data_dir>/reasoning` (see
../shared/data/README.md).
"""

from __future__ import annotations

import ast
import json
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from common.errors import ShrinkError

REASONING_DIR = "reasoning"
_CHOICE_LETTERS = "abcde"


@dataclass
class TaskExample:
    id: str
    question: str          # the formatted input the model sees
    answer: str            # the gold label text the model is trained to write
    explanation: dict[str, str]  # other text columns (e.g. CoS-E explanations), usable as rationales


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise ShrinkError(f"task file not found: {path} (set data_dir= or SHRINK_DATA_DIR)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def format_cqa(question: str, choices: list[str]) -> str:
    lines = [question, "Answer Choices:"] + [f"({_CHOICE_LETTERS[i]}) {c}" for i, c in enumerate(choices)]
    return "\n".join(lines)


def normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def parse_cqa(prediction: str) -> str:
    """The answer text: first line, without a leading "(x)" and a trailing period."""
    line = prediction.strip().split("\n")[0]
    line = re.sub(r"^\(?[a-e]\)\s*", "", line.strip(), flags=re.I)
    return normalize(line.rstrip("."))


_OPS: dict[type, Callable[[Any, Any], Any]] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                                               ast.Div: operator.truediv}


def eval_arithmetic(expr: str) -> float | None:
    """The value of an arithmetic expression (numbers, + - * /, parentheses), or None."""
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        return None

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        raise ValueError("not arithmetic")

    try:
        return ev(tree)
    except (ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def parse_svamp(prediction: str) -> float | None:
    line = prediction.strip().split("\n")[0].strip().rstrip(".")
    value = eval_arithmetic(line)
    if value is None:  # a plain number somewhere in the answer
        numbers = _NUMBER.findall(line.replace(",", ""))
        value = float(numbers[-1]) if numbers else None
    return value


def parse_gsm8k(prediction: str) -> float | None:
    text = prediction.split("####")[-1] if "####" in prediction else prediction
    numbers = _NUMBER.findall(text.replace(",", ""))
    return float(numbers[-1]) if numbers else None


@dataclass
class Task:
    name: str
    load: Callable[[Path, str], list[TaskExample]]
    is_correct: Callable[[str, TaskExample], bool]
    max_answer_tokens: int


def _load_cqa(data_dir: Path, split: str) -> list[TaskExample]:
    rows = _read_jsonl(Path(data_dir) / REASONING_DIR / "cqa" / f"cqa_{split}.json")
    return [TaskExample(r["id"], format_cqa(r["question"], r["choices"]), r["answer"],
                        {k: r[k] for k in ("abstractive_explanation", "extractive_explanation") if r.get(k)})
            for r in rows]


def _load_svamp(data_dir: Path, split: str) -> list[TaskExample]:
    rows = _read_jsonl(Path(data_dir) / REASONING_DIR / "svamp" / f"svamp_{split}.json")
    return [TaskExample(f"svamp-{split}-{i}", r["input"], r["label"], {}) for i, r in enumerate(rows)]


def _load_gsm8k(data_dir: Path, split: str) -> list[TaskExample]:
    rows = _read_jsonl(Path(data_dir) / REASONING_DIR / "gsm8k" / f"{split}.jsonl")
    out = []
    for i, r in enumerate(rows):
        reasoning, _, final = r["answer"].rpartition("####")
        out.append(TaskExample(f"gsm8k-{split}-{i}", r["question"], final.strip(), {"solution": reasoning.strip()}))
    return out


def _close(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) <= 1e-4 * max(1.0, abs(b))


TASKS: dict[str, Task] = {
    "cqa": Task("cqa", _load_cqa, lambda p, ex: parse_cqa(p) == normalize(ex.answer), 16),
    "svamp": Task("svamp", _load_svamp, lambda p, ex: _close(parse_svamp(p), eval_arithmetic(ex.answer)), 32),
    "gsm8k": Task("gsm8k", _load_gsm8k, lambda p, ex: _close(parse_gsm8k(p), parse_gsm8k(ex.answer)), 16),
}


def get_task(name: str, key: str = "data.task") -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ShrinkError(f"{key}={name!r}: unknown task; known: {', '.join(sorted(TASKS))}") from None


LABEL_PREFIX = "[label] "
RATIONALE_PREFIX = "[rationale] "


def render_prompt(question: str, prefix: str = LABEL_PREFIX) -> str:
    """The text the model continues (training and evaluation use the same rendering)."""
    return f"{prefix}{question}\nA:"

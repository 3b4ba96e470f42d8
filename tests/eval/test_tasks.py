"""Task accuracy: greedy generation on the rendered prompts, scored exactly."""

from __future__ import annotations

import torch

from common.tasks import TaskExample, get_task
from eval.tasks import task_accuracy


def test_task_accuracy_generates_and_scores(tmp_path):
    from transformers import AutoModelForCausalLM

    from support import make_tiny_tokenizer, tiny_llama_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config())
    tok = make_tiny_tokenizer()
    task = get_task("cqa")
    exs = [TaskExample(str(i), f"question {i}?\nAnswer Choices:\n(a) x\n(b) y", "x", {}) for i in range(5)]
    result = task_accuracy(model, tok, task, exs, batch_size=2)
    assert result["n"] == 5 and 0.0 <= result["accuracy"] <= 1.0
    assert len(result["examples"]) == 5 and all(isinstance(e["prediction"], str) for e in result["examples"])

"""Task accuracy: greedy answers to the rendered task prompts, parsed and scored exactly (the
task formats and readers live in common/tasks.py)."""

from __future__ import annotations

from typing import Any

import torch

from common.errors import ShrinkError
from common.tasks import LABEL_PREFIX, Task, TaskExample, render_prompt


@torch.no_grad()
def generate_answers(model: torch.nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                     batch_size: int = 64) -> list[str]:
    """Greedy continuations, batched with left padding; decoding stops at EOS."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start : start + batch_size]]
        width = max(len(e) for e in enc)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=eos)
        for row in out[:, width:]:
            row = row.tolist()
            if eos in row:
                row = row[: row.index(eos)]
            outputs.append(tokenizer.decode(row, skip_special_tokens=True))
    model.train(was_training)
    return outputs


def task_accuracy(model: torch.nn.Module, tokenizer: Any, task: Task, examples: list[TaskExample],
                  batch_size: int = 64, prefix: str = LABEL_PREFIX) -> dict[str, Any]:
    """Greedy answers to the label-task prompts, parsed and compared exactly."""
    if not examples:
        raise ShrinkError(f"{task.name}: no examples to evaluate")
    preds = generate_answers(model, tokenizer, [render_prompt(ex.question, prefix) for ex in examples],
                             task.max_answer_tokens, batch_size)
    correct = [task.is_correct(p, ex) for p, ex in zip(preds, examples)]
    return {"accuracy": sum(correct) / len(correct), "n": len(correct), "examples": [
        {"id": ex.id, "prediction": p, "gold": ex.answer, "correct": c}
        for ex, p, c in list(zip(examples, preds, correct))[:5]]}

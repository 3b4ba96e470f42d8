"""Task accuracy through our engine: the label-task prompts of eval/tasks.py, greedy answers from
`engine.LLM`, parsed and scored exactly by each task's own rule. The prompts of every task go to
the engine in one call (each with its task's answer length), so they share the batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from common.errors import ShrinkError
from common.tasks import LABEL_PREFIX, Task, TaskExample, get_task, render_prompt

# prompts (token ids), max new tokens per prompt -> one answer text per prompt (None: the request failed)
Generate = Callable[[list[list[int]], list[int]], list[str | None]]


def engine_generate(llm: Any) -> Generate:
    """Greedy answers from an engine.LLM; decoding stops at EOS or the prompt's answer length."""
    from engine import SamplingParams

    def generate(prompts: list[list[int]], max_tokens: list[int]) -> list[str | None]:
        outs = llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=n) for n in max_tokens])
        return [None if o.error else o.text for o in outs]

    return generate


def load_examples(task_name: str, data_dir: Path, split: str, limit: int) -> list[TaskExample]:
    """The first `limit` examples of the split (the same subset for every artifact)."""
    examples = get_task(task_name, "eval.tasks.names").load(data_dir, split)[:limit]
    if not examples:
        raise ShrinkError(f"eval.tasks: {task_name} {split} split has no examples in {data_dir}")
    return examples


def tasks_accuracy(generate: Generate, tokenizer: Any, tasks: dict[str, tuple[Task, list[TaskExample]]],
                   prefix: str = LABEL_PREFIX) -> dict[str, dict[str, Any]]:
    """Per task: accuracy over its examples; a request the engine refused (a prompt too long)
    counts as wrong and is counted in `errors`."""
    jobs = [(name, task, ex) for name, (task, examples) in tasks.items() for ex in examples]
    prompts = [tokenizer(render_prompt(ex.question, prefix), add_special_tokens=False)["input_ids"]
               for _, _, ex in jobs]
    answers = generate(prompts, [task.max_answer_tokens for _, task, _ in jobs])
    out: dict[str, dict[str, Any]] = {}
    for name, (task, examples) in tasks.items():
        if not examples:
            raise ShrinkError(f"{name}: no examples to evaluate")
        mine = [(ex, a) for (n, _, ex), a in zip(jobs, answers) if n == name]
        correct = [a is not None and task.is_correct(a, ex) for ex, a in mine]
        out[name] = {"accuracy": sum(correct) / len(correct), "n": len(correct),
                     "errors": sum(a is None for _, a in mine),
                     "examples": [{"id": ex.id, "prediction": a, "gold": ex.answer, "correct": c}
                                  for (ex, a), c in list(zip(mine, correct))[:3]]}
    return out

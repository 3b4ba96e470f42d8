"""Task accuracy through our engine: the label-task prompts of eval/tasks.py, greedy answers from
`engine.LLM`, parsed and scored exactly by the task's own rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from common.errors import ShrinkError
from eval.tasks import LABEL_PREFIX, Task, TaskExample, get_task, render_prompt

# prompts (token ids), max new tokens -> one answer text per prompt (None: the request failed)
Generate = Callable[[list[list[int]], int], list[str | None]]


def engine_generate(llm: Any) -> Generate:
    """Greedy answers from an engine.LLM; decoding stops at EOS or the task's answer length."""
    from engine import SamplingParams

    def generate(prompts: list[list[int]], max_tokens: int) -> list[str | None]:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
        return [None if o.error else o.text for o in outs]

    return generate


def load_examples(task_name: str, data_dir: Path, split: str, limit: int) -> list[TaskExample]:
    """The first `limit` examples of the split (the same subset for every artifact)."""
    examples = get_task(task_name, "eval.tasks.names").load(data_dir, split)[:limit]
    if not examples:
        raise ShrinkError(f"eval.tasks: {task_name} {split} split has no examples in {data_dir}")
    return examples


def task_accuracy(generate: Generate, tokenizer: Any, task: Task, examples: list[TaskExample],
                  prefix: str = LABEL_PREFIX) -> dict[str, Any]:
    """accuracy over the examples; a request the engine refused (prompt too long) counts as wrong
    and is counted in `errors`."""
    prompts = [tokenizer(render_prompt(ex.question, prefix), add_special_tokens=False)["input_ids"]
               for ex in examples]
    answers = generate(prompts, task.max_answer_tokens)
    correct = [a is not None and task.is_correct(a, ex) for a, ex in zip(answers, examples)]
    return {"accuracy": sum(correct) / len(correct), "n": len(correct),
            "errors": sum(a is None for a in answers),
            "examples": [{"id": ex.id, "prediction": a, "gold": ex.answer, "correct": c}
                         for ex, a, c in list(zip(examples, answers, correct))[:3]]}

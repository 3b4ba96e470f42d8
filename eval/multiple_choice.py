"""CommonsenseQA as multiple choice scored by log-likelihood, the way lm-eval scores a
`multiple_choice` task: for each question, the log-likelihood of each choice's text as the
continuation of the question prompt; `acc` is the argmax of the summed log-likelihoods, `acc_norm`
the argmax after dividing each by its choice's length in characters (lm-eval's acc_norm; its
acc_bytes divides by bytes, the same but for 4 non-ASCII choices of CommonsenseQA's 54,810).
The prompt is the cloze form of the project's lm-eval task
(tests/engine/server/lm_eval_tasks/shrink_cqa_mc.yaml): "Question: ...\\nAnswer:" and the
continuation " <choice>". A model never trained on our `[label]` format scores
above chance here, where its greedy `[label]` answers (eval/accuracy.py) score near zero.

The log-likelihoods come from the engine's prompt logprobs (`SamplingParams.prompt_logprobs`, the
numbers the server's echo path hands lm-eval), one request per choice, in two engine calls
(engine_loglikelihoods): a question's later choices take its blocks, and their prompt logprobs,
from the prefix cache. Scoring costs about a prefill of the same tokens plus the LM head on every
prompt row (experiments/mc_scoring_cost.py measures both)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from common.errors import ShrinkError
from common.tasks import REASONING_DIR, _read_jsonl

TARGET_DELIMITER = " "  # between the prompt and a choice, as lm-eval's target_delimiter
# (context ids, continuation ids) per request -> the continuation's summed log-likelihood (None: refused)
Loglikelihoods = Callable[[list[tuple[list[int], list[int]]]], list[float | None]]


@dataclass
class MultipleChoice:
    id: str
    context: str  # the prompt, without a trailing space
    choices: list[str]  # the choices' texts; the continuation is TARGET_DELIMITER + choice
    gold: int


def cqa_questions(data_dir: Path, split: str, limit: int) -> list[MultipleChoice]:
    """The first `limit` CommonsenseQA questions of the split (the generative subset's questions)."""
    rows = _read_jsonl(Path(data_dir) / REASONING_DIR / "cqa" / f"cqa_{split}.json")[:limit]
    if not rows:
        raise ShrinkError(f"eval.tasks.cqa_mc: cqa {split} split has no examples in {data_dir}")
    out = []
    for r in rows:
        if r["answer"] not in r["choices"]:
            raise ShrinkError(f"eval.tasks.cqa_mc: cqa {split} example {r['id']}: answer {r['answer']!r} "
                              f"is not one of its choices")
        out.append(MultipleChoice(r["id"], f"Question: {r['question']}\nAnswer:", list(r["choices"]),
                                  r["choices"].index(r["answer"])))
    return out


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a request into tokens: the context's trailing spaces move to the
    continuation, the whole is encoded at once and the continuation is what follows the context's
    own tokens (so a merge across the boundary is not double-counted)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def engine_loglikelihoods(llm: Any) -> Loglikelihoods:
    """Each continuation's summed log-likelihood from an engine.LLM's prompt logprobs: the request
    is context + continuation; one generated token is asked for and ignored. Two waves: the first
    pair of each context, then the others, which find that context's blocks (and their prompt
    logprobs) in the prefix cache; in one wave a question's choices are admitted together, before
    any of them has computed a block."""
    from engine import SamplingParams

    def loglikelihoods(pairs: list[tuple[list[int], list[int]]]) -> list[float | None]:
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        seen: set[tuple[int, ...]] = set()
        first = [i for i, (ctx, _) in enumerate(pairs) if not (tuple(ctx) in seen or seen.add(tuple(ctx)))]
        rest = sorted(set(range(len(pairs))) - set(first))
        outs: list[Any] = [None] * len(pairs)
        for wave in (first, rest):
            if wave:
                for i, out in zip(wave, llm.generate([pairs[i][0] + pairs[i][1] for i in wave], [params] * len(wave))):
                    outs[i] = out
        result: list[float | None] = []
        for (ctx, cont), out in zip(pairs, outs):
            if out.error:
                result.append(None)
                continue
            entries = out.prompt_logprobs[len(ctx):len(ctx) + len(cont)]
            result.append(sum(entry[token].logprob for entry, token in zip(entries, cont)))
        return result

    return loglikelihoods


def multiple_choice_accuracy(loglikelihoods: Loglikelihoods, tokenizer: Any,
                             questions: list[MultipleChoice]) -> dict[str, Any]:
    """acc and acc_norm over the questions; a question with a refused request (a prompt longer than
    the engine takes) counts as wrong and is counted in `errors`."""
    if not questions:
        raise ShrinkError("multiple choice: no questions to score")
    pairs = []
    for q in questions:
        for choice in q.choices:
            ctx, cont = encode_pair(tokenizer, q.context, TARGET_DELIMITER + choice)
            if not ctx or not choice:
                raise ShrinkError(f"multiple choice {q.id}: the context and the choice {choice!r} must each be "
                                  "non-empty")
            pairs.append((ctx, cont))
    lls = loglikelihoods(pairs)
    correct = correct_norm = errors = 0
    examples = []
    start = 0
    for q in questions:
        mine = lls[start:start + len(q.choices)]
        start += len(q.choices)
        if any(ll is None for ll in mine):
            errors += 1
            continue
        pred = max(range(len(mine)), key=lambda i: mine[i])
        pred_norm = max(range(len(mine)), key=lambda i: mine[i] / len(q.choices[i]))
        correct += pred == q.gold
        correct_norm += pred_norm == q.gold
        if len(examples) < 3:
            examples.append({"id": q.id, "loglikelihoods": mine, "prediction": pred, "prediction_norm": pred_norm,
                             "gold": q.gold})
    n = len(questions)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n, "errors": errors, "examples": examples}

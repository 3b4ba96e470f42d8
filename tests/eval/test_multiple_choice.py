"""CommonsenseQA as multiple choice by log-likelihood: lm-eval's split of a request into tokens, its
acc / acc_norm on constructed log-likelihoods, and the engine's per-choice log-likelihoods equal
to a transformers forward (a tiny model, and the real teacher)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.errors import ShrinkError
from eval.multiple_choice import (TARGET_DELIMITER, MultipleChoice, cqa_questions, encode_pair,
                                  engine_loglikelihoods, multiple_choice_accuracy)
from support import make_tiny_tokenizer, save_tiny_artifact

# fp32 on CPU on both sides: the engine's attention and transformers' differ in summation order only
TOLERANCE = 1e-4  # absolute, on each choice's summed log-likelihood (nats)

CQA_ROWS = [
    {"id": "q1", "question": "Where do fish live?", "choices": ["sky", "water", "desk", "tree", "car"],
     "answer": "water"},
    {"id": "q2", "question": "What is hot?", "choices": ["ice", "snow", "fire", "rain", "fog"], "answer": "fire"},
    {"id": "q3", "question": "What flies?", "choices": ["bird", "rock", "a small fish", "shoe", "cup"],
     "answer": "bird"},
]


def test_questions_are_the_lm_eval_cloze_prompts(task_dir: Path):
    qs = cqa_questions(task_dir, "test", limit=2)
    assert [q.id for q in qs] == ["q1", "q2"] and [q.gold for q in qs] == [1, 2]
    assert qs[0].context == "Question: Where do fish live?\nAnswer:" and qs[0].choices[1] == "water"


def test_an_answer_outside_the_choices_is_refused(task_dir: Path):
    rows = [{**CQA_ROWS[0], "answer": "space"}]
    (task_dir / "reasoning" / "cqa" / "cqa_test.json").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ShrinkError, match="eval.tasks.cqa_mc.*q1.*space"):
        cqa_questions(task_dir, "test", limit=4)


def test_encode_pair_splits_as_lm_eval():
    """Trailing spaces of the context move to the continuation; context + continuation is the
    tokenization of the whole text."""
    tok = make_tiny_tokenizer()
    ctx, cont = encode_pair(tok, "Question: x?\nAnswer: ", "water")
    assert (ctx, cont) == encode_pair(tok, "Question: x?\nAnswer:", " water")
    assert ctx + cont == tok("Question: x?\nAnswer: water", add_special_tokens=False)["input_ids"]
    assert tok.decode(cont) == " water"


def _stub(tokenizer, scores: dict[str, float | None]):
    """Log-likelihoods by the continuation's text."""
    calls = []

    def loglikelihoods(pairs):
        calls.append(len(pairs))
        return [scores[tokenizer.decode(cont)] for _, cont in pairs]

    return loglikelihoods, calls


def test_acc_takes_the_largest_sum_and_acc_norm_the_largest_per_character():
    tok = make_tiny_tokenizer()
    q = MultipleChoice("c", "Question: what?\nAnswer:", ["ab", "abcdefgh", "x"], gold=1)
    # sums: "x" wins (-2.0); per character: "abcdefgh" wins (-4/8 = -0.5 against -1.5 and -2.0)
    lls, calls = _stub(tok, {" ab": -3.0, " abcdefgh": -4.0, " x": -2.0})
    result = multiple_choice_accuracy(lls, tok, [q])
    assert calls == [3]
    assert result["acc"] == 0.0 and result["acc_norm"] == 1.0
    assert result["examples"][0]["prediction"] == 2 and result["examples"][0]["prediction_norm"] == 1


def test_one_call_for_every_choice_and_a_refused_request_counts_as_wrong():
    tok = make_tiny_tokenizer()
    qs = [MultipleChoice("a", "Q: 1\nA:", ["yes", "no"], gold=0),
          MultipleChoice("b", "Q: 2\nA:", ["up", "down"], gold=1),
          MultipleChoice("c", "Q: 3\nA:", ["left", "right"], gold=0)]
    lls, calls = _stub(tok, {" yes": -1.0, " no": -5.0, " up": -9.0, " down": -1.0, " left": None, " right": -1.0})
    result = multiple_choice_accuracy(lls, tok, qs)
    assert calls == [6]
    assert result["n"] == 3 and result["errors"] == 1
    assert result["acc"] == pytest.approx(2 / 3) and result["acc_norm"] == pytest.approx(2 / 3)


def test_empty_inputs_are_refused():
    tok = make_tiny_tokenizer()
    with pytest.raises(ShrinkError, match="no questions"):
        multiple_choice_accuracy(lambda pairs: [], tok, [])
    with pytest.raises(ShrinkError, match="non-empty"):
        multiple_choice_accuracy(lambda pairs: [0.0], tok, [MultipleChoice("e", "Q:", [""], gold=0)])


def transformers_loglikelihoods(model, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    """The reference: one forward over context + continuation, the continuation tokens' log-softmax."""
    out = []
    with torch.no_grad():
        for ctx, cont in pairs:
            ids = torch.tensor([ctx + cont])
            logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            out.append(sum(float(logp[len(ctx) + i - 1, t]) for i, t in enumerate(cont)))
    return out


def transformers_loglikelihoods_per_context(model, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    """The same reference a context at a time (the pairs of one question follow each other): a
    transformers forward of the context (its KV cache, its last position's logits), then one forward
    of all its continuations on that cache, right-padded (under causal attention the padding after a
    continuation changes none of its positions). A question's context is computed once, not once per
    choice: the real teacher's test spent most of its time in the one-request forwards. Equal to
    transformers_loglikelihoods (checked on the tiny model)."""
    out = []
    with torch.no_grad():
        start = 0
        while start < len(pairs):
            ctx = pairs[start][0]
            end = start
            while end < len(pairs) and pairs[end][0] == ctx:
                end += 1
            conts = [cont for _, cont in pairs[start:end]]
            prefix = model(torch.tensor([ctx]), use_cache=True, logits_to_keep=1)
            first = torch.log_softmax(prefix.logits[0, -1].float(), dim=-1)
            prefix.cache.batch_repeat_interleave(len(conts))
            width = max(map(len, conts))
            ids = torch.tensor([cont + [0] * (width - len(cont)) for cont in conts])
            logits = model(ids, cache=prefix.cache, use_cache=True).logits
            for row, cont in enumerate(conts):
                logp = torch.cat([first[None], torch.log_softmax(logits[row, :len(cont) - 1].float(), dim=-1)])
                out.append(sum(float(logp[i, t]) for i, t in enumerate(cont)))
            start = end
    return out


def _pairs(tokenizer, questions: list[MultipleChoice]) -> list[tuple[list[int], list[int]]]:
    return [encode_pair(tokenizer, q.context, TARGET_DELIMITER + c) for q in questions for c in q.choices]


def test_engine_loglikelihoods_equal_a_transformers_forward(task_dir: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    from engine import LLM

    model_dir = save_tiny_artifact(tmp_path / "m", seed=5)
    llm = LLM(str(model_dir), max_model_len=256, max_num_seqs=8, device="cpu", dtype="float32")
    questions = cqa_questions(task_dir, "test", limit=3)
    pairs = _pairs(llm.tokenizer, questions)
    ours = engine_loglikelihoods(llm)(pairs)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    theirs = transformers_loglikelihoods(hf, pairs)
    assert len(ours) == len(theirs) == 15
    per_context = transformers_loglikelihoods_per_context(hf, pairs)  # the real teacher's reference
    assert max(abs(a - b) for a, b in zip(per_context, theirs)) < 1e-5
    worst = max(abs(a - b) for a, b in zip(ours, theirs))
    print(f"largest log-likelihood difference, 15 choices: {worst:.2e}")
    assert worst < TOLERANCE
    assert len({round(x, 3) for x in ours}) > 1  # not a constant
    result = multiple_choice_accuracy(engine_loglikelihoods(llm), llm.tokenizer, questions)
    expected = sum(max(range(5), key=lambda i: theirs[5 * k + i]) == q.gold for k, q in enumerate(questions)) / 3
    assert result["errors"] == 0 and result["acc"] == pytest.approx(expected)


def test_choices_after_the_first_of_their_question_score_from_the_prefix_cache(task_dir: Path, tmp_path: Path):
    """One generate() of every pair admitted each question's choices together, before any block of the
    shared question was computed: no prefix-cache hits (0 of 2,622 prompt tokens on 10 questions)."""
    from engine import LLM

    model_dir = save_tiny_artifact(tmp_path / "m", seed=5)
    llm = LLM(str(model_dir), max_model_len=256, max_num_seqs=8, device="cpu", dtype="float32")
    questions = cqa_questions(task_dir, "test", limit=3)
    pairs = _pairs(llm.tokenizer, questions)
    cached: list[int] = []
    generate = llm.generate

    def counting(prompts, params):
        outs = generate(prompts, params)
        cached.extend(o.num_cached_tokens for o in outs)
        return outs

    llm.generate = counting
    ours = engine_loglikelihoods(llm)(pairs)
    context_blocks = sum(len(ctx) // llm.engine.config.block_size for ctx, _ in pairs[1::5])
    assert len(cached) == 15 and sum(cached) >= context_blocks * llm.engine.config.block_size > 0
    cold = LLM(str(model_dir), max_model_len=256, max_num_seqs=8, device="cpu", dtype="float32",
               enable_prefix_caching=False)
    expected = engine_loglikelihoods(cold)(pairs)
    assert max(abs(a - b) for a, b in zip(ours, expected)) < TOLERANCE


def test_a_prompt_past_the_engine_limit_is_an_error_not_a_crash(tmp_path: Path):
    from engine import LLM

    model_dir = save_tiny_artifact(tmp_path / "m", seed=5)
    llm = LLM(str(model_dir), max_model_len=64, max_num_seqs=4, device="cpu", dtype="float32")
    long = MultipleChoice("long", "Question: " + "why " * 40 + "\nAnswer:", ["a", "b"], gold=0)
    short = MultipleChoice("short", "Question: ok?\nAnswer:", ["a", "b"], gold=0)
    result = multiple_choice_accuracy(engine_loglikelihoods(llm), llm.tokenizer, [long, short])
    assert result["n"] == 2 and result["errors"] == 1


@pytest.mark.slow
def test_real_teacher_engine_scores_equal_transformers(smollm2_artifact: Path, shared_data_dir: Path):
    """The SmolLM2 teacher on the first 50 CommonsenseQA test questions: every per-choice
    log-likelihood through the engine equals transformers' (fp32), and so do acc and acc_norm.
    Measured 2026-11-29: acc 0.200, acc_norm 0.200 on these 50 (chance: 0.2); 0.243 on the first
    300 (transformers, the same scoring), where its greedy [label] answers score 0.008."""
    from transformers import AutoModelForCausalLM

    from engine import LLM

    questions = cqa_questions(shared_data_dir, "test", limit=50)
    llm = LLM(str(smollm2_artifact), max_model_len=512, max_num_seqs=16, device="cpu", dtype="float32")
    pairs = _pairs(llm.tokenizer, questions)
    scored: list[tuple[list, list]] = []  # the engine runs once: the accuracy's own call, recorded

    def recorded(requests):
        scored.append((requests, engine_loglikelihoods(llm)(requests)))
        return scored[-1][1]

    result = multiple_choice_accuracy(recorded, llm.tokenizer, questions)
    ((requests, ours),) = scored
    assert requests == pairs
    hf = AutoModelForCausalLM.from_pretrained(smollm2_artifact, dtype=torch.float32).eval()
    theirs = transformers_loglikelihoods_per_context(hf, pairs)
    worst = max(abs(a - b) for a, b in zip(ours, theirs))
    print(f"largest log-likelihood difference over {len(pairs)} choices: {worst:.2e}")
    assert worst < 1e-3  # 30 layers in fp32: more summation-order drift than the tiny model's

    reference = multiple_choice_accuracy(lambda p: theirs, llm.tokenizer, questions)
    print(f"teacher, first 50 CQA test questions: acc {result['acc']:.3f}, acc_norm {result['acc_norm']:.3f}")
    assert result["n"] == 50 and result["errors"] == 0
    assert (result["acc"], result["acc_norm"]) == (reference["acc"], reference["acc_norm"])
    assert 0.1 <= result["acc"] <= 0.6  # about chance for a 135M model, not the 0.008 of greedy [label] answers

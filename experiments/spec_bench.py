"""Issue 14's speculative-decoding benchmarks.

    python experiments/spec_bench.py acceptance --target DIR [--draft DIR ...] [--data-dir D]
    python experiments/spec_bench.py speed --target DIR|X.gguf [--draft DIR ...] [--medusa HEADS_DIR ...]
                                           [--truncated 4 ...] [--batch 1 4 16 64]
    python experiments/spec_bench.py verify-cost --shape llama2-7b [--context 512]

Workloads (``--workloads``), batch 1, greedy, ``--new-tokens`` 256, ``--prompts`` per workload:
  wikitext   WikiText-2 test paragraphs (their first ``--prompt-tokens`` tokens) to continue
             (the prompt-token count also sizes the grounded workload's passages)
  cqa        CommonsenseQA test questions with their choices (chat template when the tokenizer has one)
  gsm8k      GSM8K test questions
  grounded   input-grounded: rewrite a given WikiText paragraph / answer with quotes from it (n-gram's case)

acceptance  works today. The target's greedy continuations come from the engine without speculation;
            for every k in ``--ks`` (1..8) a speculative run is replayed exactly as greedy verification
            would go (rejection.greedy_verify's rule: the accepted prefix is the draft's agreement with
            the target's greedy tokens, then one target token), with the n-gram proposer and with each
            draft model. A draft model's proposals are its greedy continuations at every position of
            the target's output, computed in one batched engine call per prompt (prefix caching
            makes it cheap). Reports acceptance rate, per position, and mean accepted length
            (SpecDecodeMetrics), and the speed-up these imply for given draft and verify costs.
speed       tok/s of LLM.generate without speculation and with ``speculative_config`` for n-gram, each
            --medusa heads directory (method "medusa", row spec "medusa:DIR", k up to its num_heads),
            each --draft directory and each --truncated copy of the target (its first N layers, built here), at
            each k and batch size (1, 4, 16, 64): median of --repeats runs after a warm-up, with the
            acceptance metrics; then (--auto, the default) k "auto": num_speculative_tokens_per_batch_size
            "auto" up to the largest k, the engine choosing k per step from the step costs it measured
            at startup (the row's ``policy``: steps per chosen k, probes, the cost table) and the
            acceptance it sees. Expected: never below ~0.98x of no speculation (0 where no fixed k pays,
            e.g. the distilled SmolLM2-135M drafter at batch 16, fixed k=4 0.70x; the probes cost ~1%),
            and within a few % of the best fixed k where one pays. Then the per-batch-size k policy the
            fixed-k rows recommend (0 where speculation does not pay); with --num-rounds R (> 1) n-gram
            and each model drafter again as "<drafter>-rounds<R>", speculative_config num_rounds R at the largest
            k (device-resident greedy rounds, engine/spec_decode/rounds.py) and "auto" (the policy choosing
            per step between plain decoding, R rounds at the largest k and one round at a smaller k);
            then verify-cost at --verify-shape. One process, variants past --budget-s skipped.
            Every row records its timed runs (engine steps, prompt tokens computed, wall and CPU time)
            and the host's state when it began (experiments/spec_baseline.py). --check: each
            speculative engine also with drafting off (k 0), the plain engine again after the
            drafters, and a "check" row per batch size: is the baseline measured like the others?
verify-cost the target's verify forward (k + 1 tokens after a context, logits at every row) through
            every path (decode pseudo-rows, the varlen prefill path, each also with multi-query
            decode attention: pseudo_rows_mq, prefill_mq), against one decode step
            (the one-row forward and the engine's step), medians in one process; the issue asks
            <= 1.15x for k + 1 = 5 on the Llama-2-7B shape.

Prints one JSON line per result and appends them to ``--json`` when given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.errors import ShrinkError  # noqa: E402
from common.paths import default_data_dir  # noqa: E402
from engine.spec_decode.metrics import SpecDecodeMetrics  # noqa: E402
from engine.spec_decode.ngram import ngram_proposal  # noqa: E402
from engine.spec_decode.rejection import greedy_agreement  # noqa: E402
from experiments.spec_baseline import RunClock, check_rows, host_state  # noqa: E402

WORKLOADS = ("wikitext", "cqa", "gsm8k", "grounded")
GROUNDED_TEMPLATES = (
    "Rewrite the following paragraph in clear English, keeping every fact:\n\n{passage}\n\nRewritten paragraph:",
    "Read the passage and answer by quoting the sentences of the passage that say who or what it is about.\n\n"
    "Passage: {passage}\n\nQuotes:",
)


def emit(result: dict, path: str | None) -> None:
    line = json.dumps(result, default=str)
    print(line, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


# -- workloads ---------------------------------------------------------------------------------------
def _paragraphs(data_dir: Path, min_chars: int = 400) -> list[str]:
    from eval.perplexity import wikitext2_text

    text = wikitext2_text(data_dir)
    return [p.strip() for p in text.split("\n\n") if len(p) >= min_chars and not p.strip().startswith("=")]


def _cut(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    end = text.rfind(". ", 0, max_chars)
    return text[: end + 1] if end > 0 else text[:max_chars]


def _chat(tokenizer: Any, text: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        return list(out["input_ids"] if isinstance(out, Mapping) else out)  # a BatchEncoding (5.17) or ids
    return tokenizer.encode(text + "\nAnswer:")


def load_prompts(workload: str, data_dir: Path, tokenizer: Any, n: int, prompt_tokens: int) -> list[list[int]]:
    """Token ids of ``n`` prompts of one workload (deterministic: the first n usable items)."""
    from common.tasks import TASKS

    if workload == "wikitext":
        return [tokenizer.encode(p)[:prompt_tokens] for p in _paragraphs(data_dir)[:n]]
    if workload == "cqa":
        return [_chat(tokenizer, ex.question) for ex in TASKS["cqa"].load(data_dir, "test")[:n]]
    if workload == "gsm8k":
        return [_chat(tokenizer, ex.question) for ex in TASKS["gsm8k"].load(data_dir, "test")[:n]]
    if workload == "grounded":
        # The passage, cut at a sentence end near 4 characters per wanted prompt token.
        paras = [_cut(p, 4 * prompt_tokens) for p in _paragraphs(data_dir)[:n]]
        return [_chat(tokenizer, GROUNDED_TEMPLATES[i % len(GROUNDED_TEMPLATES)].format(passage=p))
                for i, p in enumerate(paras)]
    raise ShrinkError(f"--workloads: {workload!r} is not one of {list(WORKLOADS)}")


# -- greedy acceptance, replayed -----------------------------------------------------------------------
Propose = Callable[[int, int, int], list[int]]  # (prompt index, output position t, k) -> draft tokens


def replay_greedy(outputs: list[list[int]], propose: Propose, k: int) -> SpecDecodeMetrics:
    """Speculative greedy decoding of each target output, step by step: at position t the drafter
    proposes up to k tokens (never past the output's end), the accepted prefix is their agreement
    with the target's tokens, and the target adds one; the next step starts after it."""
    metrics = SpecDecodeMetrics()
    for i, out in enumerate(outputs):
        t = 0
        while t < len(out):
            n = min(k, len(out) - t - 1)
            draft = propose(i, t, n)[:n] if n > 0 else []
            a = greedy_agreement(draft, out[t : t + len(draft)])
            metrics.record([len(draft)], [a])
            t += a + 1
    return metrics


def ngram_proposer(prompts: list[list[int]], outputs: list[list[int]], lo: int, hi: int) -> Propose:
    contexts = [np.asarray(p + o, dtype=np.int64) for p, o in zip(prompts, outputs)]
    lens = [len(p) for p in prompts]
    return lambda i, t, k: ngram_proposal(contexts[i][: lens[i] + t], lo, hi, k).tolist()


def draft_model_proposer(draft_dir: str, prompts: list[list[int]], outputs: list[list[int]], k_max: int,
                         engine_kwargs: dict) -> Propose:
    """The draft's greedy k_max-token continuation at every position of every target output (its
    first k tokens are its k-token proposal), from one batched engine call per prompt."""
    from engine import LLM, SamplingParams

    llm = LLM(draft_dir, **engine_kwargs)
    table: list[list[list[int]]] = []
    for p, o in zip(prompts, outputs):
        ctxs = [p + o[:t] for t in range(len(o))]
        res = llm.generate(ctxs, SamplingParams(temperature=0, max_tokens=k_max, ignore_eos=True))
        table.append([r.token_ids for r in res])
    del llm
    return lambda i, t, k: table[i][t][:k]


def implied_speedup(mean_len: float, k: int, draft_step: float, verify_step: float) -> float:
    """Tokens per unit of target-decode time: one round costs k draft steps and one verify (both in
    target decode steps) and yields mean_len tokens (accepted + 1), against 1 token per decode step."""
    return mean_len / (k * draft_step + verify_step) if mean_len else 1.0


def target_outputs(target: str, prompts: list[list[int]], new_tokens: int, engine_kwargs: dict,
                   stop_at_eos: bool = False) -> list[list[int]]:
    from engine import LLM, SamplingParams

    llm = LLM(target, **engine_kwargs)
    res = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=not stop_at_eos))
    del llm
    return [r.token_ids for r in res]


# -- divergence from plain greedy decoding ----------------------------------------------------------
def greedy_with_margins(llm: Any, prompts: list[list[int]], new_tokens: int,
                        stop_at_eos: bool = False) -> tuple[list[list[int]], list[list[float]]]:
    """Plain greedy outputs and, at every position, the margin of the top-1 over the top-2 logit: the
    difference of their logprobs (log-softmax shifts every logit of a row by the same amount)."""
    from engine import SamplingParams

    res = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=not stop_at_eos,
                                               logprobs=2))
    outputs, margins = [], []
    for r in res:
        outputs.append(list(r.token_ids))
        top = [sorted((lp.logprob for lp in entry.values()), reverse=True) for entry in r.logprobs or []]
        margins.append([t[0] - t[1] if len(t) > 1 else 0.0 for t in top])
    return outputs, margins


def divergence_report(plain: list[list[int]], margins: list[list[float]], other: list[list[int]]) -> dict:
    """Where ``other`` leaves ``plain`` (same prompts): per sequence the first position whose token
    differs (None: identical; a shorter run diverges where it ends) and the plain run's top-1/top-2
    margin there, so that a report can say whether every divergence is a near-tie."""
    first: list[int | None] = []
    for p, o in zip(plain, other, strict=True):
        i = next((j for j, (a, b) in enumerate(zip(p, o)) if a != b), None)
        first.append(min(len(p), len(o)) if i is None and len(p) != len(o) else i)
    at = [margins[s][i] if i is not None and i < len(margins[s]) else None for s, i in enumerate(first)]
    known = [m for m in at if m is not None]
    return {"greedy_equal": plain == other, "diverged": sum(i is not None for i in first),
            "first_divergence": first, "margin_at_divergence": at, "max_margin_at_divergence": max(known, default=None)}


def _workload_setup(args) -> tuple[Path, dict, Any, Any]:
    """The shared data directory, the --engine overrides, the target's EngineConfig (a .gguf file's
    model is its converted directory) and its tokenizer, each checked before any work."""
    from engine.config import EngineConfig
    from engine.tokenizer import load_tokenizer

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    if data_dir is None or not data_dir.is_dir():
        raise ShrinkError("--data-dir: no shared data directory (pass it or set SHRINK_DATA_DIR)")
    engine_kwargs = json.loads(args.engine) if args.engine else {}
    target_config = EngineConfig(model=args.target, **engine_kwargs)
    tokenizer = load_tokenizer(target_config.model)
    if tokenizer is None:
        raise ShrinkError(f"--target: {args.target!r} has no tokenizer to encode the workloads with")
    return data_dir, engine_kwargs, target_config, tokenizer


def acceptance(args) -> None:
    data_dir, engine_kwargs, target_config, tok = _workload_setup(args)
    max_model_len = target_config.max_model_len
    for workload in args.workloads:
        prompts = fitting_prompts(load_prompts(workload, data_dir, tok, args.prompts, args.prompt_tokens),
                                  args.new_tokens, max_model_len, workload, args.json, "acceptance")
        if not prompts:
            emit({"bench": "acceptance", "workload": workload, "skipped": "no prompt fits max_model_len"}, args.json)
            continue
        outputs = target_outputs(args.target, prompts, args.new_tokens, engine_kwargs, args.stop_at_eos)
        drafters: dict[str, Propose] = {
            f"ngram[{args.ngram_min},{args.ngram_max}]":
                ngram_proposer(prompts, outputs, args.ngram_min, args.ngram_max)}
        for d in args.draft or []:
            drafters[d] = draft_model_proposer(d, prompts, outputs, max(args.ks), engine_kwargs)
        for name, propose in drafters.items():
            draft_cost = 0.0 if name.startswith("ngram") else args.draft_step_cost
            for k in args.ks:
                m = replay_greedy(outputs, propose, k)
                emit({"bench": "acceptance", "workload": workload, "drafter": name, "k": k,
                      "prompts": len(prompts), "new_tokens": args.new_tokens, **m.as_dict(),
                      "implied_speedup": implied_speedup(m.mean_accepted_length, k, draft_cost, args.verify_step_cost)},
                     args.json)


# -- speed -----------------------------------------------------------------------------------------------
def truncated_draft(target_dir: str, num_layers: int, out_dir: Path) -> str:
    """A drafter made from the target: its first ``num_layers`` layers, final norm and head (and
    tokenizer), saved as a model directory. Cheap for a small target; our trained students are not
    on the benchmark machine."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    path = out_dir / f"truncated{num_layers}"
    if (path / "config.json").exists():
        return str(path)
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]
    model.save_pretrained(path)
    for f in Path(target_dir).iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy(f, path / f.name)
    return str(path)


def medusa_k(heads_dir: str, k_max: int) -> int:
    """num_speculative_tokens of a Medusa arm: k_max, at most the artifact's num_heads (load_heads'
    checks: a bad artifact is that arm's error row, naming what is wrong)."""
    from common.medusa import load_heads

    return min(k_max, load_heads(heads_dir).num_heads)


def fitting_prompts(prompts: list[list[int]], new_tokens: int, max_model_len: int, workload: str,
                    json_path: str | None, bench: str) -> list[list[int]]:
    """The prompts that leave room for ``new_tokens`` within max_model_len; the others are left
    out with a message line (a prompt the engine cannot finish would time 0 generated tokens)."""
    limit = max_model_len - new_tokens
    fit = [p for p in prompts if len(p) <= limit]
    if len(fit) < len(prompts):
        longest = max(len(p) for p in prompts)
        emit({"bench": bench, "workload": workload, "warning":
              f"{len(prompts) - len(fit)} of {len(prompts)} prompts left out: longer than max_model_len "
              f"{max_model_len} - new tokens {new_tokens} = {limit} tokens (longest {longest}); pass a larger "
              f"max_model_len in --engine or fewer --prompt-tokens / --new-tokens"}, json_path)
    return fit


def batches_of(prompts: list[list[int]], bs: int) -> list[list[list[int]]]:
    """The batches of size ``bs`` a row times one after another: every prompt once where there are at
    least bs of them (len(prompts) // bs batches; a remainder short of bs is left out), else one batch of
    the prompts repeated to bs. Batch 1 is then every prompt in turn, not the first prompt alone."""
    if bs >= len(prompts):
        return [(prompts * bs)[:bs]]
    return [prompts[i : i + bs] for i in range(0, len(prompts) - bs + 1, bs)]


def _median_tok_s(llm: Any, batches: list[list[list[int]]], new_tokens: int, repeats: int,
                  after_each: Callable[[], None] | None = None,
                  stop_at_eos: bool = False) -> tuple[float, list[float], list[list[int]], list[dict]]:
    """Warm-up, then ``repeats`` timed runs, each generating the ``batches`` one after another; the
    median tok/s (one stall does not decide), the last run's outputs (all batches', in order) and each
    run's record (spec_baseline.RunClock: wall and CPU time, engine steps, prompt tokens computed).
    Counts the tokens generated; a request that ended short of ``new_tokens`` (an error, a length limit;
    with ``stop_at_eos`` anything but its EOS or a stop) is an error. ``after_each``: called after the
    warm-up and after each timed run (outside the timing)."""
    from engine import SamplingParams

    llm.generate(batches[0], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    if after_each is not None:
        after_each()
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=not stop_at_eos)
    runs, records = [], []
    for _ in range(repeats):
        clock = RunClock(llm)
        outs = [o for batch in batches for o in llm.generate(batch, params)]
        seconds = clock.seconds()
        short = [(i, len(o.token_ids), o.finish_reason) for i, o in enumerate(outs)
                 if len(o.token_ids) != new_tokens and not (stop_at_eos and o.finish_reason == "stop")]
        if short:
            i, n, why = short[0]
            raise ShrinkError(f"request {i} generated {n} of {new_tokens} tokens (finish_reason {why!r}; "
                              f"{len(short)} of {len(outs)} requests short)")
        runs.append(sum(len(o.token_ids) for o in outs) / seconds)
        records.append(clock.record(outs, seconds))
        if after_each is not None:
            after_each()
    return float(np.median(runs)), runs, [list(o.token_ids) for o in outs], records


def free_device_memory() -> None:
    """After an engine's last reference is gone: collect it and give its cached CUDA memory back, so
    the next engine's KV pool is sized on a free device."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _speed_variant(args, workload: str, name: str, spec: dict | None, prompts: list[list[int]],
                   engine_kwargs: dict, base: dict[int, float],
                   reference: dict[int, tuple[list, list]] | None = None, rerun: bool = False) -> list[dict]:
    """One engine's rows (every k and batch size, then k "auto": the engine's measured policy, its
    step costs timed when the engine was built, a fresh acceptance estimate per batch size); the
    engine dies when this returns. ``reference`` {batch size: plain greedy outputs and margins}:
    filled by the plain variant, then each speculative row says where its outputs leave them
    (divergence_report). With ``args.check`` a speculative engine's rows start with k 0 (drafting
    off, the same engine running plain steps) and the others also give their speed-up over it
    (``speedup_vs_off``). ``rerun``: the plain engine again, after the drafters (--check): its rows
    are marked and leave ``base`` and ``reference`` as the first plain rows made them."""
    reference = {} if reference is None else reference
    from engine import LLM

    rounds = spec.get("num_rounds", 1) if spec is not None else 1
    if spec is not None and args.auto:
        spec = {**spec, "num_speculative_tokens_per_batch_size": "auto"}
    llm = LLM(args.target, **engine_kwargs, **({"speculative_config": spec} if spec else {}))
    engine = llm.engine
    worker = engine.spec_worker
    rows = []
    # k up to the engine's num_speculative_tokens (a Medusa arm's: at most its heads).
    k_max = spec["num_speculative_tokens"] if spec is not None else max(args.ks)
    fixed = [k for k in args.ks if k <= k_max]
    ks = ([max(args.ks)] if rounds > 1 else fixed) + (["auto"] if args.auto and spec is not None else [])
    ks = [0] + ks if args.check and spec is not None else ks
    off: dict[int, float] = {}  # tok/s of this engine with drafting off, by batch size
    for k in ([0] if spec is None else ks):
        if k == "auto":
            engine.scheduler.spec_k = worker.k_for_step
        elif spec is not None:
            engine.scheduler.spec_k = lambda n, k=k: k
        for bs in args.batch:
            if worker is not None:
                worker.metrics = SpecDecodeMetrics()
            by_run: list[dict] = []  # the policy's cumulative choices after the warm-up and each run

            def snapshot() -> None:
                by_run.append({key: worker.policy.as_dict()[key] for key in ("steps_by_k", "num_probes")})

            if k == "auto":
                worker.policy = worker.policy.fresh()  # its rounds and lookups as the worker built it
            host = host_state()
            if (host["gpu_processes"] or 0) > 1:
                emit({"bench": "speed", "workload": workload, "spec": name, "k": k, "batch": bs, "warning":
                      f"{host['gpu_processes'] - 1} other process(es) on the GPU as this row begins: its tok/s is "
                      f"not this engine's alone"}, args.json)
            batches = batches_of(prompts, bs)
            tok_s, runs, outputs, records = _median_tok_s(llm, batches, args.new_tokens, args.repeats,
                                                        snapshot if k == "auto" else None, args.stop_at_eos)
            if spec is None and not rerun:
                base[bs] = tok_s
                reference[bs] = greedy_with_margins(llm, [p for b in batches for p in b], args.new_tokens,
                                                    args.stop_at_eos)
            if spec is not None and k == 0:
                off[bs] = tok_s
            m = engine.spec_metrics
            row = {"bench": "speed", "workload": workload, "spec": name, "k": k, "num_rounds": rounds, "batch": bs,
                   "tok_s": tok_s, "runs_tok_s": runs, "speedup": tok_s / base[bs] if bs in base else None,
                   **({"speedup_vs_off": tok_s / off[bs]} if bs in off and k != 0 else {}),
                   **({"rerun": True} if rerun else {}),
                   "metrics": m.as_dict() if m is not None else None, "runs": records, "host": host,
                   **({"vs_plain": divergence_report(*reference[bs], outputs)} if bs in reference else {})}
            if k == "auto":
                row["policy"] = worker.policy.as_dict()  # the k it chose (steps_by_k), probes, costs
                row["policy_by_run"] = by_run
            rows.append(row)
            emit(row, args.json)
    return rows


def speed(args) -> None:
    """tok/s per batch size without speculation, then per drafter (n-gram, each --draft directory and
    each --truncated copy of the target) at each k, in one process: the median of --repeats timed
    runs after a warm-up. One engine per drafter (built with the largest k; each run sets its k
    through the scheduler's policy), speculation on at every measured batch size; then the
    num_speculative_tokens_per_batch_size these rows recommend. Each engine is freed before the
    next is built (its KV pool is sized from the free memory); prompts that do not fit
    max_model_len with the new tokens are left out with a message. Each variant is in try/except,
    and variants past --budget-s seconds are reported as skipped."""
    import tempfile

    start = time.perf_counter()
    data_dir, engine_kwargs, target_config, tokenizer = _workload_setup(args)
    target_dir = target_config.model
    work = Path(tempfile.mkdtemp(prefix="spec_bench_"))
    k_max = max(args.ks)
    common = {"num_speculative_tokens": k_max, "max_batch_size": max(args.batch)}
    # Medusa heads first: with several drafters the later ones are the first the time budget skips
    drafters: list[tuple[str, Callable[[], dict]]] = [
        (f"medusa:{d}", lambda d=d: {"method": "medusa", "model": d, **common,
                                    "num_speculative_tokens": medusa_k(d, k_max)}) for d in args.medusa or []]
    drafters += [("ngram", lambda: {"method": "ngram", "prompt_lookup_min": args.ngram_min,
                                    "prompt_lookup_max": args.ngram_max, **common})]
    models = [(d, lambda d=d: {"model": d, **common}) for d in args.draft or []]
    models += [(f"truncated{n}", lambda n=n: {"model": truncated_draft(target_dir, n, work), **common})
               for n in args.truncated or []]
    rounds = [d for d in drafters if d[0] == "ngram"] + models  # the drafters num_rounds takes
    drafters += models + [(f"{name}-rounds{r}", lambda make=make, r=r: {**make(), "num_rounds": r})
                          for name, make in rounds for r in args.num_rounds if r > 1]
    for workload in args.workloads:
        wanted = max(*args.batch, args.prompts)
        prompts = fitting_prompts(load_prompts(workload, data_dir, tokenizer, wanted, args.prompt_tokens),
                                  args.new_tokens, target_config.max_model_len, workload, args.json, "speed")
        if not prompts:
            emit({"bench": "speed", "workload": workload, "skipped": "no prompt fits max_model_len"}, args.json)
            continue
        rows: list[dict] = []
        base: dict[int, float] = {}
        reference: dict[int, tuple[list, list]] = {}
        for name, make_spec in [("none", lambda: None)] + drafters:
            if time.perf_counter() - start > args.budget_s:
                emit({"bench": "speed", "workload": workload, "spec": name, "skipped": "time budget"}, args.json)
                continue
            try:
                rows += _speed_variant(args, workload, name, make_spec(), prompts, engine_kwargs, base, reference)
            except Exception as e:  # one variant failing must not lose the others
                emit({"bench": "speed", "workload": workload, "spec": name, "error": f"{type(e).__name__}: {e}"},
                     args.json)
            free_device_memory()
        if args.check and time.perf_counter() - start > args.budget_s:
            emit({"bench": "speed", "workload": workload, "spec": "none", "rerun": True, "skipped": "time budget"},
                 args.json)
        elif args.check:  # the plain engine again, after the drafters: did the machine change under the run?
            try:
                rows += _speed_variant(args, workload, "none", None, prompts, engine_kwargs, base, reference,
                                       rerun=True)
            except Exception as e:
                emit({"bench": "speed", "workload": workload, "spec": "none", "rerun": True,
                      "error": f"{type(e).__name__}: {e}"}, args.json)
            free_device_memory()
        if args.check:
            for check in check_rows(rows, args.check_tolerance):
                emit(check, args.json)
        for name in dict.fromkeys(r["spec"] for r in rows if r["spec"] != "none"):
            emit({"bench": "policy", "workload": workload, "spec": name,
                  "num_speculative_tokens_per_batch_size": recommend_policy([r for r in rows if r["spec"] == name])},
                 args.json)
    if args.verify_shape and time.perf_counter() - start < args.budget_s:
        try:
            verify_cost(argparse.Namespace(model=None, shape=args.verify_shape, engine=args.engine, context=[512],
                                           k=4, repeat=10, json=args.json))
        except Exception as e:
            emit({"bench": "verify-cost", "shape": args.verify_shape, "error": f"{type(e).__name__}: {e}"}, args.json)
        free_device_memory()


def recommend_policy(rows: list[dict], min_speedup: float = 1.02) -> dict[int, int]:
    """{batch size: k} from speed rows of one drafter: the fastest k per batch size, or 0 (plain
    decoding) where no k beats it by ``min_speedup``, so the policy is never slower than no
    speculation (within the measurement). The "auto" rows are the engine's own policy, not a k."""
    best: dict[int, tuple[float, int]] = {}
    for r in rows:
        if r.get("speedup") is None or r["k"] in ("auto", 0):  # 0: drafting off (--check), plain decoding
            continue
        bs, cand = r["batch"], (r["speedup"], r["k"])
        if bs not in best or cand > best[bs]:
            best[bs] = cand
    return {bs: (k if speedup >= min_speedup else 0) for bs, (speedup, k) in sorted(best.items())}


# -- verify cost ------------------------------------------------------------------------------------------
def verify_cost(args) -> None:
    """The target's verify forward (k + 1 tokens after a ``--context``-token context, fp32 logits at
    every row) through every verify path (runner.verify_paths.forwards), against a plain decode step at
    the same context, in one process, at each ``--context``: ``pseudo_rows`` (VerifyPaths.pseudo_row_logits:
    one decode row per token, the decode graphs), ``prefill`` (VerifyPaths.prefill_all_logits: the varlen
    prefill path and its verify graphs), and each with multi-query decode attention, ``pseudo_rows_mq``
    and ``prefill_mq`` (kernels/verify_attention.py: each sequence's K/V read once for its k + 1
    tokens). Each line says whether its path ran in CUDA graphs (``graphed``) and which path the
    runner's startup timing chose for one sequence of k + 1 tokens (``chosen``). The decode step is timed twice:
    the one-row decode forward the same way as the verifies (``decode_forward_us``), and the engine's
    own decode steps with sampling (``decode_step_us``, eval.bench.decode_profile.StepTimer).
    Medians over --repeat, the paths interleaved, each forward timed to a device sync. One JSON line
    per verify path, with its ratio to both decode figures."""
    from engine import LLM
    from eval.bench.common import shape_dir

    path = args.model or shape_dir(args.shape)
    engine_kwargs = json.loads(args.engine) if args.engine else {}
    max_len = max(args.context) + 80
    # An n-gram speculative config sizes the runner as a speculative engine's: decode rows for a
    # pseudo-row verify, verify graphs for a batch of 16 sequences. Speculation itself stays off.
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "max_batch_size": 16}
    # --engine overrides win over this probe's sizing (speed mode hands its target's settings on:
    # a max_model_len there was passed twice, a TypeError, on the H200).
    settings = {"load_format": "safetensors" if args.model else "dummy", "max_model_len": max_len,
                "max_num_seqs": 1, "cuda_graph_max_bs": 1, "kv_cache_tokens": 2 * max_len,
                "speculative_config": spec, **engine_kwargs}
    if "kv_cache_tokens" not in engine_kwargs:  # room for one sequence of the max_model_len in force
        settings["kv_cache_tokens"] = 2 * settings["max_model_len"]
    if settings["max_model_len"] < max_len:
        raise ShrinkError(f"--engine: max_model_len {settings['max_model_len']} < the longest --context + 80 = {max_len}")
    llm = LLM(path, **settings)
    engine = llm.engine
    engine.scheduler.spec_k = lambda n: 0
    runner = engine.runner
    max_rows = runner.verify_paths.max_pseudo_rows
    if args.k + 1 > max_rows:
        raise ShrinkError(f"--k: {args.k} + 1 tokens do not fit the {max_rows} decode rows of a pseudo-row verify")
    # Any blocks, as many as one sequence of max_model_len has: the timing does not depend on them.
    table = list(range(-(-max_len // engine.config.block_size)))
    for context in args.context:
        _verify_cost_at(args, llm, table, context)


def _verify_cost_at(args, llm: Any, table: list[int], context: int) -> None:
    """verify_cost's lines at one context length."""
    import torch

    from engine import SamplingParams
    from eval.bench.common import prompts as random_prompts
    from eval.bench.decode_profile import StepTimer

    engine = llm.engine
    runner, vocab = engine.runner, engine.vocab_size
    prefix = random_prompts(1, context, vocab, 0)[0]
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    paths = runner.verify_paths.forwards()
    forwards = {**paths, "decode": runner.verify_paths.pseudo_row_logits}
    times: dict[str, list[float]] = {name: [] for name in forwards}
    with torch.inference_mode():
        runner.verify_paths.last_logits([(prefix, 0, table)])  # fills the context's K/V
        for r in range(args.repeat + 1):
            tail = random_prompts(1, args.k + 1, vocab, 100 + r)[0]
            for name, forward in forwards.items():
                chunk = (tail[:1] if name == "decode" else tail, context, table)
                sync()
                t = time.perf_counter()
                forward([chunk])
                sync()
                if r:  # the first round is a warm-up
                    times[name].append(time.perf_counter() - t)
    llm.generate([prefix], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm-up
    with StepTimer(engine) as st:
        llm.generate([prefix], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    per_step = [t / (int(kind.split("x")[1]) if "x" in kind else 1)
                for kind, ts in st.times.items() if kind.startswith("decode") for t in ts]
    decode_step = float(np.median(per_step))
    decode_forward = float(np.median(times["decode"]))
    graph_sets = runner.verify_paths.graph_sets()
    for name in paths:
        verify_s = float(np.median(times[name]))
        emit({"bench": "verify-cost", "path": name, "model": args.model or args.shape, "context": context,
              "k": args.k, "verify_step_us": 1e6 * verify_s, "decode_forward_us": 1e6 * decode_forward,
              "decode_step_us": 1e6 * decode_step, "ratio": verify_s / decode_step,
              "ratio_to_forward": verify_s / decode_forward, "repeats": len(times[name]),
              "graphed": graph_sets[name] is not None,
              "chosen": runner.verify_paths.path.get(args.k + 1, "pseudo_rows")}, args.json)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="experiments/spec_bench.py")
    ap.add_argument("--json", help="append every result line to this file")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("acceptance", "speed"):
        p = sub.add_parser(name)
        p.add_argument("--target", required=True)
        p.add_argument("--draft", nargs="*", help="draft model directories")
        p.add_argument("--data-dir", help="shared data (default: SHRINK_DATA_DIR or ../shared/data)")
        p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
        p.add_argument("--prompts", type=int, default=8,
                       help="prompts per workload (speed: at least the largest --batch; smaller batches walk them all)")
        p.add_argument("--prompt-tokens", type=int, default=128, help="wikitext prompts: first N tokens")
        p.add_argument("--new-tokens", type=int, default=256)
        p.add_argument("--stop-at-eos", action="store_true",
                       help="requests end at their EOS as served ones do (a chat answer is short; without it every "
                            "request runs --new-tokens, past its answer)")
        p.add_argument("--ngram-min", type=int, default=2)
        p.add_argument("--ngram-max", type=int, default=4)
        p.add_argument("--engine", help='EngineConfig overrides as JSON, e.g. \'{"device": "cpu"}\'')
    acc = sub.choices["acceptance"]
    acc.add_argument("--ks", type=int, nargs="+", default=list(range(1, 9)))
    acc.add_argument("--draft-step-cost", type=float, default=0.2,
                     help="a draft model's step in target decode steps, for implied_speedup (issue: 4 layers ~0.2)")
    acc.add_argument("--verify-step-cost", type=float, default=1.0, help="the verify forward in target decode steps")
    sub.choices["speed"].add_argument("--ks", type=int, nargs="+", default=[2, 4, 6])
    sub.choices["speed"].add_argument("--medusa", nargs="*",
                                      help="Medusa heads directories (common/medusa.py), k up to their num_heads")
    sub.choices["speed"].add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    sub.choices["speed"].add_argument("--truncated", type=int, nargs="*", default=[4],
                                      help="drafters made of the target's first N layers (+ norm and head)")
    sub.choices["speed"].add_argument("--num-rounds", type=int, nargs="+", default=[1],
                                      help="also n-gram and each model drafter with speculative_config num_rounds "
                                           "R (> 1), at the largest --ks and auto: device-resident greedy rounds")
    sub.choices["speed"].add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    sub.choices["speed"].add_argument("--auto", action=argparse.BooleanOptionalAction, default=True,
                                      help='also k "auto" (the engine\'s measured policy, up to the largest --ks)')
    sub.choices["speed"].add_argument("--budget-s", type=float, default=270.0,
                                      help="variants starting later are skipped (the whole run stays < 6 min)")
    sub.choices["speed"].add_argument("--check", action="store_true",
                                      help="also each speculative engine with drafting off (k 0) and the plain "
                                           "engine again after the drafters; a 'check' row per batch size says "
                                           "whether the baseline is measured like the others (spec_baseline.py)")
    sub.choices["speed"].add_argument("--check-tolerance", type=float, default=0.10,
                                      help="--check: tok/s ratios beyond 1 + this disagree")
    sub.choices["speed"].add_argument("--verify-shape", default="llama2-7b",
                                      help="then verify-cost at this shape ('' to skip)")
    v = sub.add_parser("verify-cost")
    v.add_argument("--shape", default="llama2-7b", help="random weights of this shape (eval.bench.common.SHAPES)")
    v.add_argument("--model", help="or a model directory")
    v.add_argument("--engine", help="EngineConfig overrides as JSON")
    v.add_argument("--context", type=int, nargs="+", default=[512],
                   help="context lengths, one engine sized for the longest (pseudo-rows read the context once a row)")
    v.add_argument("--k", type=int, default=4)
    v.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    {"acceptance": acceptance, "speed": speed, "verify-cost": verify_cost}[args.cmd](args)


if __name__ == "__main__":
    main()

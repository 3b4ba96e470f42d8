"""Issue 14: a draft vocabulary (speculative_config's ``draft_vocab_size``, FR-Spec) for a small drafter.

    python experiments/draft_vocab.py counts   --tokenizer DIR --out DRAFT/token_frequencies.tsv [--corpus F]
    python experiments/draft_vocab.py coverage --target DIR --frequencies F [--sizes 4096 8192 16384 32768]
    python experiments/draft_vocab.py cost     [--layers 4] [--sizes 8192 16384]            (CPU is fine)
    python experiments/draft_vocab.py speed    --target DIR|X.gguf --frequencies F [--sizes 8192 16384]  (H200)

counts    token counts of the corpus (default: $SHRINK_DATA_DIR/corpus/docs-en.jsonl.gz; with --corpus,
          each .jsonl(.gz) file's records, their --fields) in the tokenizer, written as the frequency file the engine reads beside a drafter
          (engine/spec_decode/draft_vocab.py); an existing file is never overwritten.
coverage  the share of the target's greedy tokens inside the draft vocabulary of each size (the
          special tokens plus the most frequent): an upper bound on a subset drafter's acceptance
          (a draft can only propose subset tokens, so a target token outside is never accepted).
          Greedy tokens teacher-forced (the target's argmax at every position of the text: WikiText-2
          test windows, GSM8K test question + answer) and free-running (engine greedy continuations
          of spec_bench's wikitext and gsm8k prompts); also the texts' own tokens.
cost      a draft step of the target's shape cut to --layers layers (random weights): the bytes of
          weights it reads and its FLOPs per token (torch's FlopCounterMode over the runner's decode
          forward), full head against each subset size, and its eager CPU time (median).
speed     on the GPU (on the CPU it runs eagerly: a smoke run): a draft step's time (the draft runner's CUDA decode graph at batch 1, and its
          multi-step greedy step graph) against one target decode step, and spec decode tok/s at
          batch 1 (spec_bench's timing: median of --repeats generate calls after a warm-up) without
          speculation, with the truncated drafter (the target's first --layers layers) and with the
          same drafter restricted to each --sizes, for each --ks and workload (--prompts prompts,
          each alone; their harmonic mean); acceptance metrics with each. One JSON line per result (also appended to --json).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.errors import ShrinkError  # noqa: E402
from common.paths import default_data_dir  # noqa: E402
from engine.spec_decode.draft_vocab import (  # noqa: E402
    FREQUENCY_FILE, count_tokens, read_token_frequencies, select_subset, special_token_ids, write_token_frequencies,
)
from experiments.spec_bench import (  # noqa: E402
    _median_tok_s, emit, fitting_prompts, free_device_memory, load_prompts, truncated_draft,
)

CORPUS = "corpus/docs-en.jsonl.gz"


def _data_dir(arg: str | None) -> Path:
    data_dir = Path(arg) if arg else default_data_dir()
    if data_dir is None or not data_dir.is_dir():
        raise ShrinkError("--data-dir: no shared data directory (pass it or set SHRINK_DATA_DIR)")
    return data_dir


def _tokenizer(path: str) -> Any:
    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    if tok is None:
        raise ShrinkError(f"{path!r} has no tokenizer")
    return tok


# -- counts ------------------------------------------------------------------------------------------------
def counts(args) -> None:
    corpora = [Path(c) for c in args.corpus] if args.corpus else [_data_dir(args.data_dir) / CORPUS]
    out = Path(args.out)
    if out.exists():
        raise ShrinkError(f"--out: {out} exists; it is not overwritten")
    tok = _tokenizer(args.tokenizer)
    vocab = len(tok) if args.vocab_size is None else args.vocab_size
    start = time.perf_counter()
    texts: list[str] = []
    for corpus in corpora:
        with (gzip.open if corpus.suffix == ".gz" else open)(corpus, "rt", encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        texts += ["\n".join(r[k] for k in args.fields if isinstance(r.get(k), str)) for r in records]
    total = torch.zeros(vocab, dtype=torch.int64)
    tokens = 0
    for i in range(0, len(texts), 256):
        ids = tok(texts[i : i + 256], add_special_tokens=False)["input_ids"]
        tokens += sum(len(x) for x in ids)
        total += count_tokens(ids, vocab)
    n = write_token_frequencies(str(out), total)
    emit({"bench": "counts", "corpus": [str(c) for c in corpora], "documents": len(texts), "tokens": tokens, "distinct": n,
          "out": str(out), "seconds": time.perf_counter() - start}, args.json)


# -- coverage ----------------------------------------------------------------------------------------------
def _subsets(target: str, freq_file: str, sizes: list[int]) -> dict[int, torch.Tensor]:
    from transformers import AutoConfig

    from engine.llm_engine import _eos_ids

    hf = AutoConfig.from_pretrained(target)
    tok = _tokenizer(target)
    vocab = int(hf.vocab_size)
    specials = special_token_ids(hf, tok, _eos_ids(target, hf, tok), vocab)
    freq = read_token_frequencies(freq_file, vocab)
    return {n: select_subset(freq, n, specials) for n in sizes}


def _teacher_forced_argmax(model: Any, ids: list[int], window: int) -> list[int]:
    """The model's argmax after each token of ``ids`` (non-overlapping windows; the window's last
    prediction has no next text token, but it is a greedy token all the same)."""
    out: list[int] = []
    with torch.inference_mode():
        for i in range(0, len(ids), window):
            chunk = torch.tensor([ids[i : i + window]])
            out += model(chunk).logits[0].argmax(-1).tolist()
    return out


def coverage(args) -> None:
    from transformers import AutoModelForCausalLM

    from common.tasks import TASKS
    from engine import LLM, SamplingParams
    from eval.perplexity import wikitext2_text

    data_dir = _data_dir(args.data_dir)
    subsets = {(Path(f).name, n): s for f in args.frequencies for n, s in _subsets(args.target, f, args.sizes).items()}
    tok = _tokenizer(args.target)
    texts = {
        "wikitext": tok.encode(wikitext2_text(data_dir))[: args.text_tokens],
        "gsm8k": [t for ex in TASKS["gsm8k"].load(data_dir, "test")
                  for t in tok.encode(ex.question + "\n" + ex.explanation["solution"] + "\n#### " + ex.answer + "\n\n")
                  ][: args.text_tokens],
    }
    def report(name: str, kind: str, ids: list[int], seconds: float) -> None:
        t = torch.tensor(ids)
        emit({"bench": "coverage", "workload": name, "tokens": kind, "count": len(ids), "seconds": round(seconds, 1),
              "inside": {f"{f}:{n}": round(torch.isin(t, s).float().mean().item(), 4) for (f, n), s in subsets.items()}},
             args.json)

    model = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    for name, ids in texts.items():
        report(name, "text", ids, 0.0)
        start = time.perf_counter()
        report(name, "teacher_forced_greedy", _teacher_forced_argmax(model, ids, args.window),
               time.perf_counter() - start)
    del model
    llm = LLM(args.target, **(json.loads(args.engine) if args.engine else {}))
    for name in texts:
        start = time.perf_counter()
        prompts = load_prompts(name, data_dir, tok, args.prompts, args.prompt_tokens)
        res = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True))
        report(name, "free_running_greedy", [t for r in res for t in r.token_ids], time.perf_counter() - start)


# -- cost ----------------------------------------------------------------------------------------------------
def _shape_dir(layers: int, work: Path, target: str | None) -> str:
    """A config.json of the target's shape (default: SmolLM2-135M's) cut to ``layers`` layers."""
    from transformers import AutoConfig, LlamaConfig

    if target:
        cfg = AutoConfig.from_pretrained(target)
    else:  # SmolLM2-135M
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                          rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                          bos_token_id=1, eos_token_id=2)
    cfg.num_hidden_layers = layers
    path = work / f"shape{layers}"
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(path)
    return str(path)


def _step_bytes(model: Any, dtype: torch.dtype) -> dict[str, int]:
    """Weight bytes one decode step of one token reads: every decoder and head weight, one row of
    the input embedding (a tied head is counted once as the head: its rows, not the table)."""
    item = torch.empty((), dtype=dtype).element_size()
    layers = sum(p.numel() for p in model.model.layers.parameters()) + model.model.norm.weight.numel()
    head = model.lm_head.weight.numel()
    return {"layers": layers * item, "head": head * item, "embedding_row": model.config.hidden_size * item,
            "total": (layers + head + model.config.hidden_size) * item}


def cost(args) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from engine.config import EngineConfig
    from engine.model_runner import ModelRunner
    from engine.sequence import Sequence
    from engine.sampling_params import SamplingParams

    work = Path(tempfile.mkdtemp(prefix="draft_vocab_cost_"))
    path = _shape_dir(args.layers, work, args.target)
    # The target's step, for the ratio: the same shape's per-layer bytes over all its layers, and its head.
    full_layers = EngineConfig(model=args.target, device="cpu").hf_config.num_hidden_layers if args.target else 30
    target_bytes = None
    for size in [None] + args.sizes:
        config = EngineConfig(model=path, device="cpu", load_format="dummy", dtype=args.dtype, max_model_len=1024,
                              max_num_seqs=1, kv_cache_tokens=1024)
        vocab = int(config.hf_config.vocab_size)
        rows = None if size is None else torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[:size]
        runner = ModelRunner(config, lm_head_rows=rows)
        seq = Sequence(list(range(3, 3 + args.context)), SamplingParams(max_tokens=1))
        seq.block_table = list(range(-(-args.context // runner.block_size)))
        runner.decode_inputs.prepare([seq], 1)
        with torch.inference_mode():
            with FlopCounterMode(display=False) as fc:
                runner.decode_forward(1)
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                runner.decode_forward(1)
                times.append(time.perf_counter() - t)
        b = _step_bytes(runner.model, config.torch_dtype)
        if target_bytes is None:
            target_bytes = b["layers"] * full_layers // args.layers + b["head"] + b["embedding_row"]
        emit({"bench": "cost", "layers": args.layers, "draft_vocab_size": size or vocab, "dtype": args.dtype,
              "weight_bytes": b, "over_target_bytes": round(b["total"] / target_bytes, 4),
              "target_layers": full_layers, "flops": fc.get_total_flops(),
              "cpu_ms_median": 1e3 * statistics.median(times), "threads": torch.get_num_threads()}, args.json)
        del runner


# -- speed (GPU) -------------------------------------------------------------------------------------------
def _median_ms(run, n: int = 200) -> float:
    """Median ms of one call of ``run`` after 10 warm-up calls: CUDA events on a GPU, else the clock."""
    for _ in range(10):
        run()
    times = []
    for _ in range(n):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            run()
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def _step_times(llm: Any) -> dict[str, float]:
    """A draft step at batch 1 (its decode graph, or eager without graphs; the multi-step greedy
    step graph) and a target decode step, in ms. The decode buffers hold a padding row (slot -1:
    it stores nothing), so these calls change nothing."""
    draft, target = llm.engine.draft_runner, llm.engine.runner
    with torch.inference_mode():
        out = {"target_decode_ms": _median_ms(lambda: target.decode_forward(1))}
        if draft is not None:
            out["draft_decode_ms"] = _median_ms(lambda: draft.decode_forward(1))
            if draft.graphs is not None and 1 in draft.graphs.step_graphs:
                out["draft_greedy_step_ms"] = _median_ms(lambda: draft.graphs.step(1))
            out["draft_over_target"] = out["draft_decode_ms"] / out["target_decode_ms"]
    out["graphed"] = target.graphs is not None
    return out


def speed(args) -> None:
    from engine import LLM
    from engine.config import EngineConfig
    from engine.spec_decode.metrics import SpecDecodeMetrics

    start = time.perf_counter()
    data_dir = _data_dir(args.data_dir)
    engine_kwargs = json.loads(args.engine) if args.engine else {}
    target_config = EngineConfig(model=args.target, **engine_kwargs)
    target_dir = target_config.model
    tok = _tokenizer(target_dir)
    work = Path(tempfile.mkdtemp(prefix="draft_vocab_speed_"))
    draft = truncated_draft(target_dir, args.layers, work)
    shutil.copy(args.frequencies, Path(draft) / FREQUENCY_FILE)
    variants: list[tuple[str, dict | None]] = [("none", None), (f"truncated{args.layers}", {})]
    variants += [(f"truncated{args.layers}_vocab{n}", {"draft_vocab_size": n}) for n in args.sizes]
    for workload in args.workloads:
        prompts = fitting_prompts(load_prompts(workload, data_dir, tok, args.prompts, args.prompt_tokens),
                                  args.new_tokens, target_config.max_model_len, workload, args.json, "draft_vocab_speed")
        base = None
        for name, extra in variants:
            if time.perf_counter() - start > args.budget_s:
                emit({"bench": "draft_vocab_speed", "workload": workload, "spec": name, "skipped": "time budget"},
                     args.json)
                continue
            try:
                spec = None if extra is None else {"model": draft, "num_speculative_tokens": max(args.ks),
                                                   "max_batch_size": 1, **extra}
                llm = LLM(args.target, **engine_kwargs, **({"speculative_config": spec} if spec else {}))
                steps = _step_times(llm)
                for k in [0] if spec is None else args.ks:
                    if spec is not None:
                        llm.engine.scheduler.spec_k = lambda n, k=k: k
                        llm.engine.spec_worker.metrics = SpecDecodeMetrics()
                    # Batch 1: the prompts one after another; tokens over time is the harmonic mean.
                    runs = [_median_tok_s(llm, [[p]], args.new_tokens, args.repeats)[0] for p in prompts]
                    tok_s = statistics.harmonic_mean(runs)
                    base = tok_s if spec is None else base
                    m = llm.engine.spec_metrics
                    emit({"bench": "draft_vocab_speed", "workload": workload, "spec": name, "k": k, "batch": 1,
                          "tok_s": tok_s, "runs_tok_s": runs, "speedup": tok_s / base if base else None, **steps,
                          "metrics": m.as_dict() if m is not None else None}, args.json)
                del llm
            except Exception as e:  # one variant failing must not lose the others
                emit({"bench": "draft_vocab_speed", "workload": workload, "spec": name,
                      "error": f"{type(e).__name__}: {e}"}, args.json)
            free_device_memory()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="experiments/draft_vocab.py")
    ap.add_argument("--json", help="append every result line to this file")
    ap.add_argument("--data-dir", help="shared data (default: SHRINK_DATA_DIR or ../shared/data)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("counts")
    c.add_argument("--tokenizer", required=True, help="a model directory with the tokenizer")
    c.add_argument("--out", required=True, help=f"the frequency file to write (a drafter's {FREQUENCY_FILE})")
    c.add_argument("--corpus", nargs="+", help=f".jsonl(.gz) files (default: DATA/{CORPUS})")
    c.add_argument("--fields", nargs="+", default=["text", "question", "answer"],
                   help="the record fields counted, where present")
    c.add_argument("--vocab-size", type=int, help="default: the tokenizer's length")
    v = sub.add_parser("coverage")
    v.add_argument("--target", required=True)
    v.add_argument("--frequencies", required=True, nargs="+", help="frequency files, each compared")
    v.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    v.add_argument("--text-tokens", type=int, default=16384, help="teacher-forced tokens per text")
    v.add_argument("--window", type=int, default=1024)
    v.add_argument("--prompts", type=int, default=8)
    v.add_argument("--prompt-tokens", type=int, default=128)
    v.add_argument("--new-tokens", type=int, default=128)
    v.add_argument("--engine", help='EngineConfig overrides as JSON, e.g. \'{"device": "cpu"}\'')
    o = sub.add_parser("cost")
    o.add_argument("--target", help="a model directory whose shape to take (default: SmolLM2-135M's)")
    o.add_argument("--layers", type=int, default=4)
    o.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384])
    o.add_argument("--dtype", default="bfloat16")
    o.add_argument("--context", type=int, default=128)
    o.add_argument("--repeat", type=int, default=20)
    s = sub.add_parser("speed")
    s.add_argument("--target", required=True)
    s.add_argument("--frequencies", required=True, help="copied beside the truncated drafter")
    s.add_argument("--layers", type=int, default=4)
    s.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384])
    s.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6])
    s.add_argument("--workloads", nargs="+", default=["wikitext", "gsm8k"])
    s.add_argument("--prompts", type=int, default=4, help="per workload, each run alone (batch 1)")
    s.add_argument("--prompt-tokens", type=int, default=128)
    s.add_argument("--new-tokens", type=int, default=256)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--budget-s", type=float, default=500.0)
    s.add_argument("--engine", help="EngineConfig overrides as JSON")
    args = ap.parse_args(argv)
    {"counts": counts, "coverage": coverage, "cost": cost, "speed": speed}[args.cmd](args)


if __name__ == "__main__":
    main()

"""Issue 14 item 7: a drafter trained for acceptance (`distill=drafter`: a few teacher layers, the
teacher's own samples, TVD) against the CE baseline of the same size, data and tokens
(`distill=drafter_ce`), by greedy acceptance with our engine.

    python experiments/drafter_bench.py --teacher TEACHER.gguf|HF_DIR|ARTIFACT --data-dir ../shared/data \
        --out outputs/drafter_bench --device cuda [--tokens 4000000] [--keep first:4] [--json results.jsonl]
    python experiments/drafter_bench.py --teacher TINY --data-dir ../shared/data --out DIR --smoke

1. the teacher is imported once (`stage=import`) unless it is already an artifact;
2. for each `--keep` (student.keep_layers) and each loss (`--losses tvd,ce`), `python -m shrink
   stage=distill distill=drafter|drafter_ce` trains a drafter for `--tokens` tokens on the teacher's
   samples (generated once with the engine at temperature 1, cached by lineage, so both losses train on
   the same text); half of the samples continue corpus prefixes, half answer GSM8K *train* questions
   through the chat template (the evaluation uses test prompts);
3. greedy acceptance per k in `--ks` (1..8): the teacher's greedy continuations of WikiText-2, CQA and
   GSM8K test prompts, replayed as greedy verification would go (experiments/spec_bench.py's replay)
   against each drafter's greedy proposals at every position, computed with the engine; the untrained
   students (the same kept layers) are measured too, and one real speculative run at `--check-k` with
   the trained TVD drafter cross-checks the replay against the engine's own acceptance counters.

Every result is one JSON line (stdout, and appended to --json); `drafter_tvd_vs_ce` compares the two.

Default GPU budget (one H200, not yet run): 2,048 teacher samples of 256 tokens (~0.5M tokens through
the engine at batch 256), 4M training tokens per drafter (batch 32 x 512, bf16 autocast, fused and
compiled loss), 8 prompts x 256 tokens per workload. Estimated from BENCHMARKS.md's H100 figures
(KD step 141k tok/s with a 15-layer student; a 4-layer student costs ~0.7 of that step, CE no teacher
forward): ~30 s KD and ~15 s CE training plus ~30 s compile and start-up each, ~20 s of samples, and
~1 min of acceptance (3 drafter engines, 6,144 draft contexts each): about 3-4 minutes in all.

Which layers (`--keep`): measured on the 2-core CPU (shared, so slow) with the real SmolLM2 teacher,
TVD, 16,384 tokens each (16 steps of 8 x 128), 32 teacher samples of 64 tokens, 3 prompts per workload x
48 tokens, greedy acceptance over all three workloads (432 target tokens):

    --device cpu --tokens 16384 --batch-size 8 --block-size 128 --num-samples 32 --sample-tokens 64
    --prompts 3 --new-tokens 48 --losses tvd --keep first:4 "[0,10,20,29]" importance:4 --check-k 0
    distill.warmup_steps=2 distill.val_batches=2 data.teacher_generated.instruction_fraction=0

    keep                            k=1 acceptance  k=4   mean accepted length k=4   untrained k=1
    first:4       [0,1,2,3]         0.165           0.058  1.22                      0.029
    evenly spaced [0,10,20,29]      0.101           0.028  1.11                      0.000
    importance:4  [0,1,11,29]       0.154           0.053  1.20                      0.000
                  (drop-one loss)

First-N is chosen (the preset's default): it leads (its gap to drop-one is within one standard
error of the difference at this size, its gap to evenly spaced is 2.6), it needs no calibration pass, and
untrained it already drafts some tokens. CPU timings (contended): 242 training tok/s (evenly spaced),
teacher samples 2,031 tokens in ~80 s, acceptance ~30-45 s per drafter; the GPU budget was set from
the H100 figures in BENCHMARKS.md (KD step ~140k tok/s for a 15-layer student), not from these.

TVD against CE at that CPU size (first:4, the same samples and 16,384 tokens, greedy acceptance at
k=1 / mean accepted length at k=4): lr 1e-3 (the preset's) TVD 0.165 / 1.22, CE 0.119 / 1.12; lr 3e-4
TVD 0.068 / 1.09, CE 0.093 / 1.09. Sixteen steps leave both far from trained (CE's train loss 7.2 and
10.8), so this says nothing yet about which loss wins; the GPU run at the default budget decides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

from spec_bench import (divergence_report, emit, free_device_memory, greedy_with_margins, load_prompts,  # noqa: E402
                        replay_greedy)

LOSS_PRESETS = {"tvd": "drafter", "ce": "drafter_ce"}
T0 = time.time()
T = TypeVar("T")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="a .gguf file, an HF model directory or a shrink artifact")
    p.add_argument("--data-dir", required=True, help="shared data laid out as ../shared/data")
    p.add_argument("--out", required=True, help="run directories of the drafters (created)")
    p.add_argument("--cache-dir", default=None, help="teacher samples and tokenized data (default ~/.cache/shrink)")
    p.add_argument("--device", default="cuda", help="cuda | cpu")
    p.add_argument("--tokens", type=int, default=None, help="training tokens of each drafter (default 4M; smoke 2048)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 32; smoke 2)")
    p.add_argument("--block-size", type=int, default=None, help="default 512 (smoke 64)")
    p.add_argument("--num-samples", type=int, default=None, help="teacher samples (default 2048; smoke 8)")
    p.add_argument("--sample-tokens", type=int, default=None, help="tokens per teacher sample (default 256; smoke 24)")
    p.add_argument("--keep", nargs="+", default=None, help="student.keep_layers values (default: the preset's)")
    p.add_argument("--importance", default="drop_loss", help="student.importance for importance:n")
    p.add_argument("--losses", default="tvd,ce", help=f"comma-separated, of {sorted(LOSS_PRESETS)}")
    p.add_argument("--workloads", nargs="+", default=["wikitext", "cqa", "gsm8k"])
    p.add_argument("--prompts", type=int, default=None, help="prompts per workload (default 8; smoke 2)")
    p.add_argument("--new-tokens", type=int, default=None, help="teacher tokens per prompt (default 256; smoke 12)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="wikitext prompts: their first N tokens")
    p.add_argument("--ks", type=int, nargs="+", default=None, help="default 1..8 (smoke 1 2 4)")
    p.add_argument("--check-k", type=int, default=4, help="a real speculative run at this k (0: none)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="the engine check's two engines in batch-invariant mode (EngineConfig.batch_invariant)")
    p.add_argument("--no-init", action="store_true", help="skip the untrained students' acceptance")
    p.add_argument("--smoke", action="store_true", help="tiny settings: a CPU run in a minute or two")
    p.add_argument("--json", default=None, help="append every result line to this file")
    p.add_argument("overrides", nargs="*", help="more Hydra overrides for every distill run (key=value)")
    args = p.parse_args(argv)
    defaults = {"tokens": (4_000_000, 2048), "batch_size": (32, 2), "block_size": (512, 64),
                "num_samples": (2048, 8), "sample_tokens": (256, 24), "prompts": (8, 2), "new_tokens": (256, 12),
                "ks": (list(range(1, 9)), [1, 2, 4])}
    for key, (full, small) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if args.smoke else full)
    args.losses = [x for x in args.losses.split(",") if x]
    unknown = [x for x in args.losses if x not in LOSS_PRESETS]
    if unknown:
        p.error(f"--losses: {unknown} not in {sorted(LOSS_PRESETS)}")
    if args.check_k and args.check_k > max(args.ks):
        p.error(f"--check-k {args.check_k} exceeds the largest of --ks")
    return args


def safe_name(label: str) -> str:
    """A directory name for a drafter label such as tvd[first:4] (no glob or shell characters)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label.replace(",", "-")).strip("_")


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def shrink_cli(*overrides: str) -> None:
    """`python -m shrink ...` in a subprocess (each training run frees its GPU memory on exit)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)  # keep the caller's
    env = {**os.environ, "PYTHONPATH": path, "WANDB_SILENT": "true"}
    result = subprocess.run([sys.executable, "-m", "shrink", *overrides], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"python -m shrink {' '.join(overrides)} failed:\n{result.stdout[-4000:]}")
    for line in result.stdout.splitlines():
        if line.startswith(("teacher data", "distill:", "note")):
            log(line)


def teacher_artifact(args) -> Path:
    """The teacher as an artifact: itself when it is one, else imported into OUT/teacher_run."""
    src = Path(args.teacher)
    if (src / "shrink.json").is_file():
        return src
    run = Path(args.out) / "teacher_run"
    if not (run / "teacher" / "shrink.json").is_file():
        shrink_cli("stage=import", "teacher=custom", f"teacher.source={src.resolve()}", f"run={run}",
                   "logging=none", f"device={args.device}")
    return run / "teacher"


def distill_overrides(args, teacher: Path, run: Path, loss: str, keep: str | None) -> list[str]:
    over = teacher_data_overrides(args, teacher, run, LOSS_PRESETS[loss])
    if keep is not None:
        over.append(f"student.keep_layers={keep}")
        if keep.startswith("importance:"):
            over += [f"student.importance={args.importance}", "student.calib_blocks=4"]
    return over + list(args.overrides)


def teacher_data_overrides(args, teacher: Path, run: Path, preset: str) -> list[str]:
    """`stage=distill distill=<preset>` at the bench's budget on the teacher's samples (half corpus
    continuations, half GSM8K train answers), shared with experiments/medusa_bench.py."""
    gsm8k_train = Path(args.data_dir) / "reasoning" / "gsm8k" / "train.jsonl"
    over = [
        "stage=distill", f"distill={preset}", f"input={teacher}", f"run={run}", "logging=none",
        f"device={args.device}", f"data_dir={args.data_dir}", f"distill.tokens={args.tokens}",
        f"distill.batch_size={args.batch_size}", f"data.block_size={args.block_size}",
        "data.max_docs=2000",  # the corpus only gives the prompts' prefixes and the block count here
        f"data.teacher_generated.num_samples={args.num_samples}",
        f"data.teacher_generated.max_tokens={args.sample_tokens}",
        "distill.checkpoint_every=0", "gates.max_ppl_ratio.distill=null",
    ]
    if gsm8k_train.is_file() and not args.smoke:  # (tiny test models have short contexts)
        over += [f"data.teacher_generated.instructions={gsm8k_train}",
                 "data.teacher_generated.instruction_fraction=0.5"]
    if args.cache_dir:
        over.append(f"cache_dir={args.cache_dir}")
    if args.smoke:
        over += ["data.max_docs=30", "data.teacher_generated.prefix_tokens=8", "distill.warmup_steps=1",
                 "distill.val_batches=1", "distill.chunk_size=64", "gates.context=32", "gates.windows=1"]
    return over


def train_drafters(args, teacher: Path) -> dict[str, dict[str, Any]]:
    """{name: {path, loss, keep, kept_layers, stage_wall_s, process_s, ...}} of every trained drafter."""
    drafters = {}
    for keep in args.keep or [None]:
        for loss in args.losses:
            name = f"{loss}[{keep or 'preset'}]"
            run = Path(args.out) / safe_name(name)
            log(f"training {name} in {run}")
            started = time.time()
            shrink_cli(*distill_overrides(args, teacher, run, loss, keep))
            process_s = time.time() - started
            info = json.loads((run / "distill" / "shrink.json").read_text())
            m = info["metrics"]
            row = {"bench": "drafter_train", "drafter": name, "loss": loss, "keep": keep, "path": str(run / "distill"),
                   "kept_layers": m.get("kept_layers"), "params": m.get("params"),
                   "train_tokens": m.get("train_tokens"), "train_tok_s": m.get("tokens_per_s"),
                   "final_loss": m.get("final_loss"),
                   "stage_wall_s": info.get("wall_time_s"), "process_s": process_s,
                   **{k: v for k, v in m.items() if k.startswith("val_")},
                   "data_source": m.get("data_source"), "teacher_data": m.get("teacher_data")}
            emit(row, args.json)
            drafters[name] = row
    return drafters


def init_student(teacher: Path, layers: list[int], out: Path) -> Path:
    """The untrained student: the teacher's `layers`, final norm and head, saved with its tokenizer."""
    import torch

    from shrink.modeling import load_model, load_tokenizer
    from train.student_init import student_from_teacher

    if (out / "config.json").is_file():
        return out
    teacher_model = load_model(teacher, dtype="fp32", device=torch.device("cpu"))
    student = student_from_teacher(teacher_model, layers)
    student.save_pretrained(out)
    load_tokenizer(teacher).save_pretrained(out)
    return out


def engine_settings(args, prompts: list[list[int]]) -> dict:
    """LLM(...) keywords: the device, and a context no longer than the runs need (the CPU attention
    reference works over the whole max_model_len)."""
    return {"device": args.device, "max_model_len": max(map(len, prompts)) + args.new_tokens + max(args.ks) + 1}


def greedy_outputs(llm: Any, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from engine import SamplingParams

    res = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    return [list(r.token_ids) for r in res]


def draft_table(llm: Any, prompts: list[list[int]], outputs: list[list[int]], k_max: int) -> list[list[list[int]]]:
    """The drafter's greedy k_max-token continuation at every position of every target output, in one
    batched engine call (prefix caching shares the prompts)."""
    from engine import SamplingParams

    ctxs = [p + o[:t] for p, o in zip(prompts, outputs) for t in range(len(o))]
    res = llm.generate(ctxs, SamplingParams(temperature=0, max_tokens=k_max, ignore_eos=True))
    flat = [list(r.token_ids) for r in res]
    table, at = [], 0
    for o in outputs:
        table.append(flat[at: at + len(o)])
        at += len(o)
    return table


def run_engine(path: str | Path, kwargs: dict, use: Callable[[Any], T], **extra: Any) -> T:
    """use(LLM(path, **kwargs, **extra)), the engine gone (and the GPU cache emptied) before this
    returns: the next engine sizes its KV pool from the free memory (with the teacher's engine
    still referenced, a drafter's pool came out at 0 blocks on the H200)."""
    from engine import LLM

    llm = LLM(str(path), **kwargs, **extra)
    try:
        return use(llm)
    finally:
        del llm
        free_device_memory()


def measure_acceptance(args, teacher: Path, drafters: dict[str, str]
                       ) -> tuple[dict[str, dict[int, dict]], dict[str, tuple[list, list]]]:
    """({drafter: {k: acceptance over every workload}}, {workload: (prompts, teacher outputs)}); one
    JSON line per (workload, drafter, k)."""
    from shrink.modeling import load_tokenizer

    t = time.time()
    tokenizer = load_tokenizer(teacher)
    prompts = {w: load_prompts(w, Path(args.data_dir), tokenizer, args.prompts, args.prompt_tokens)
               for w in args.workloads}
    engine_kwargs = engine_settings(args, [p for ps in prompts.values() for p in ps])
    outputs = run_engine(teacher, engine_kwargs,
                         lambda llm: {w: greedy_outputs(llm, ps, args.new_tokens) for w, ps in prompts.items()})
    log(f"teacher outputs in {time.time() - t:.1f}s")
    every_output = [o for w in args.workloads for o in outputs[w]]
    summary: dict[str, dict[int, dict]] = {}
    for name, path in drafters.items():
        t = time.time()
        tables = run_engine(path, engine_kwargs, lambda llm: {
            w: draft_table(llm, prompts[w], outputs[w], max(args.ks)) for w in args.workloads})
        for w in args.workloads:
            for k in args.ks:
                m = replay_greedy(outputs[w], lambda i, pos, n, w=w: tables[w][i][pos][:n], k)
                emit({"bench": "drafter_acceptance", "workload": w, "drafter": name, "k": k,
                      "prompts": len(prompts[w]), "new_tokens": args.new_tokens, **m.as_dict()}, args.json)
        every_table = [row for w in args.workloads for row in tables[w]]
        summary[name] = {}
        for k in args.ks:
            m = replay_greedy(every_output, lambda i, pos, n: every_table[i][pos][:n], k)
            summary[name][k] = {"acceptance_rate": m.acceptance_rate, "mean_accepted_length": m.mean_accepted_length}
        log(f"{name}: acceptance in {time.time() - t:.1f}s")
    return summary, {w: (prompts[w], outputs[w]) for w in args.workloads}


def check_with_engine(args, teacher: Path, name: str, path: str, prompts: list[list[int]],
                      plain: list[list[int]]) -> None:
    """One real speculative run (greedy, the first workload's prompts) at --check-k: the engine's own
    acceptance counters, and whether its output equals plain greedy decoding by an engine of the same
    settings (the acceptance run's `plain` had a context sized for every workload), with per sequence
    the first divergent position and the plain run's top-1/top-2 logit margin there
    (spec_bench.divergence_report); `plain_runs_equal`: that plain run against `plain`."""
    settings = {**engine_settings(args, prompts), **({"batch_invariant": True} if args.batch_invariant else {})}
    reference, margins = run_engine(teacher, settings, lambda llm: greedy_with_margins(llm, prompts, args.new_tokens))
    spec, m = run_engine(teacher, settings,
                         lambda llm: (greedy_outputs(llm, prompts, args.new_tokens), llm.engine.spec_metrics),
                         speculative_config={"model": path, "num_speculative_tokens": args.check_k})
    emit({"bench": "drafter_engine_check", "workload": args.workloads[0], "drafter": name, "k": args.check_k,
          "batch_invariant": args.batch_invariant, **divergence_report(reference, margins, spec),
          "plain_runs_equal": reference == plain, **(m.as_dict() if m is not None else {})}, args.json)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    teacher = teacher_artifact(args)
    log(f"teacher: {teacher}")
    trained = train_drafters(args, teacher)
    drafters = {name: row["path"] for name, row in trained.items()}
    if not args.no_init:
        for layers in dict.fromkeys(tuple(row["kept_layers"]) for row in trained.values() if row["kept_layers"]):
            label = "init[" + ",".join(map(str, layers)) + "]"
            drafters[label] = str(init_student(teacher, list(layers), Path(args.out) / safe_name(label)))
    summary, workloads = measure_acceptance(args, teacher, drafters)
    for name, per_k in summary.items():
        emit({"bench": "drafter_summary", "drafter": name, "workloads": args.workloads,
              "acceptance_rate": {k: v["acceptance_rate"] for k, v in per_k.items()},
              "mean_accepted_length": {k: v["mean_accepted_length"] for k, v in per_k.items()}}, args.json)
    for keep in args.keep or [None]:
        tvd, ce = f"tvd[{keep or 'preset'}]", f"ce[{keep or 'preset'}]"
        if tvd in summary and ce in summary:
            emit({"bench": "drafter_tvd_vs_ce", "keep": keep or "preset",
                  "mean_accepted_length_ratio": {k: summary[tvd][k]["mean_accepted_length"]
                                                 / max(summary[ce][k]["mean_accepted_length"], 1e-9)
                                                 for k in args.ks},
                  "acceptance_rate_gain": {k: summary[tvd][k]["acceptance_rate"] - summary[ce][k]["acceptance_rate"]
                                           for k in args.ks}}, args.json)
    if args.check_k:
        name = next(iter(trained))
        check_with_engine(args, teacher, name, trained[name]["path"], *workloads[args.workloads[0]])
    emit({"bench": "drafter_bench_total", "wall_s": time.time() - T0, "tokens": args.tokens,
          "device": args.device}, args.json)


if __name__ == "__main__":
    main()

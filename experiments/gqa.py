"""GQA uptraining experiment (issue #6): each model's K/V heads pooled to --kv-heads by each --inits
(mean, first, random, svd), each uptrained by distillation from the unconverted model with the same token
budget and data order; WikiText-2 raw test perplexity (non-overlapping 2048-token windows, full
windows only) before conversion, right after, and after uptraining. Several --tokens values: the budget
curve, each budget from the same conversion per init, in the order given.

With --teacher-samples ENTRY (a cache entry of teacher-generated samples that experiments/distill.py
--teacher-generated wrote, CACHE/teacher_data/<key>/, verified to come from --model by its content hash),
each budget's training blocks are the corpus mixed with the samples, --teacher-ratio of the blocks
(train.data.mix_to_budget, distill.py's mix); validation stays corpus-only (issue 16, item 5).

    python experiments/gqa.py --model RUN/teacher RUN/distill --data-dir ../shared/data \
        --out outputs/gqa_exp --tokens 2000000
    python experiments/gqa.py --model SMOL --data-dir ../shared/data --out outputs/gqa_curve \
        --tokens 1000000 10000000 50000000 --teacher-samples CACHE/teacher_data/KEY --teacher-ratio 0.5
    python experiments/gqa.py --model TINY_ARTIFACT --data-dir DIR --out DIR --tokens 4096 --quick

Writes OUT/results.json after every measurement (a killed run keeps what it measured; per model:
models.<model>.budgets.<tokens>.<init>) and OUT/results.md at the end (a row per model, budget and
init); training logs go to OUT/<model>-<init>.train_log.jsonl (several budgets: <model>-<init>-<tokens>).
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.results import ResultsFile  # noqa: E402
from eval.perplexity import encode, wikitext2_text  # noqa: E402
from shrink.gqa_surgery import (POOL_INITS, check_init, check_pool_target, kv_report, pool_kv_heads,  # noqa: E402
                                svd_calibration)
from shrink.artifacts import Artifact  # noqa: E402
from shrink.modeling import load_model, load_tokenizer  # noqa: E402
from shrink.stages.gqa import measure_ppl, uptrain  # noqa: E402
from shrink.teacher_data import check_entry, load_entry  # noqa: E402
from train.data import CORPUS_FILE, budget_blocks, mix_to_budget  # noqa: E402
from train.loop import TrainConfig  # noqa: E402

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", required=True, help="artifact / model directories (with tokenizer)")
    p.add_argument("--data-dir", required=True, help="shared data: wikitext-2-raw/ and corpus/")
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, nargs="+", required=True,
                   help="uptraining tokens per init (same for all); several: a budget curve, in this order")
    p.add_argument("--teacher-samples", default=None,
                   help="cache entry of the model's generated samples (distill.py --teacher-generated) to mix in")
    p.add_argument("--teacher-ratio", type=float, default=0.5,
                   help="with --teacher-samples: share of the training blocks they fill, in (0, 1]")
    p.add_argument("--quick", action="store_true", help="tiny settings: a CPU smoke run in seconds")
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--inits", default=",".join(POOL_INITS), help=f"comma-separated, of {', '.join(POOL_INITS)}")
    p.add_argument("--train-data", default=None, help=f"default: DATA_DIR/{CORPUS_FILE} (--quick: pydoc)")
    p.add_argument("--block-size", type=int, default=None, help="default 1024 (--quick: 64)")
    p.add_argument("--batch-size", type=int, default=None, help="default 16 (--quick: 4)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=None, help="default 20 (--quick: 1)")
    p.add_argument("--context", type=int, default=None, help="perplexity window; default 2048 (--quick: 64)")
    p.add_argument("--max-windows", type=int, default=None, help="default all (--quick: 4)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"block_size": (1024, 64), "batch_size": (16, 4), "warmup_steps": (20, 1), "context": (2048, 64),
                "max_windows": (None, 4)}
    for key, (full, small) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    if args.train_data is None:
        args.train_data = "pydoc" if quick else str(Path(args.data_dir) / CORPUS_FILE)
    args.inits = [s.strip() for s in args.inits.split(",") if s.strip()]
    unknown = [i for i in args.inits if i not in POOL_INITS]
    if unknown:
        p.error(f"--inits: unknown {unknown}; expected of {', '.join(POOL_INITS)}")
    if min(args.tokens) < 1 or len(set(args.tokens)) != len(args.tokens):
        p.error(f"--tokens: budgets must be >= 1 and distinct, got {args.tokens}")
    if not 0.0 < args.teacher_ratio <= 1.0:
        p.error(f"--teacher-ratio must be in (0, 1], got {args.teacher_ratio}")
    return args


def teacher_data(args: argparse.Namespace) -> tuple[list[list[int]], dict] | None:
    """The --teacher-samples entry, verified before anything trains: generated by every --model (each is
    uptrained from itself, so the samples must be its text: content hash), ids within its tokenizer."""
    if args.teacher_samples is None:
        return None
    arts = [Artifact.from_model_dir(m) for m in args.model]
    for art in arts[1:]:
        check_entry(Path(args.teacher_samples), art)
    samples, record = load_entry(args.teacher_samples, arts[0], vocab_size=len(load_tokenizer(Path(args.model[0]))))
    log(f"teacher data: {len(samples)} samples ({sum(map(len, samples))} tokens) from {args.teacher_samples}, "
        f"ratio {args.teacher_ratio}")
    return samples, {"entry": str(Path(args.teacher_samples).resolve()), "lineage": record,
                     "ratio": args.teacher_ratio, "samples": len(samples)}


def run_model(path: Path, args: argparse.Namespace, results: ResultsFile, out: Path,
              samples: list[list[int]] | None) -> None:
    name = path.name
    device = torch.device(args.device)
    teacher = load_model(path, dtype="fp32", device=device)
    check_pool_target(teacher.config, args.kv_heads, key="--kv-heads")
    for init in args.inits:
        check_init(teacher.config, init, key="--inits")
    tokenizer = load_tokenizer(path)
    wiki = encode(tokenizer, wikitext2_text(Path(args.data_dir)))
    log(f"{name}: loaded; WikiText-2 {wiki.numel()} tokens")
    ppl_args = (args.context, args.context, args.max_windows, "bf16")
    kv = {"before": kv_report(teacher.config, 8, 2048, 2)}
    t = time.time()
    results.put("models", name, "ppl_before", measure_ppl(teacher, {"w": wiki}, *ppl_args, full_windows_only=True)["w"])
    log(f"{name}: ppl before conversion {results.data['models'][name]['ppl_before']:.3f} ({time.time() - t:.1f}s)")
    for tokens in args.tokens:
        budget = str(tokens)
        train, val = budget_blocks(args.train_data, tokenizer, tokens, args.block_size, 16, args.seed,
                                   docs_per_batch=64)
        calibration = svd_calibration(train)  # the corpus, as without samples: the conversion is the same
        log(f"{name} {budget} tokens: {train.shape[0]} corpus train blocks of {args.block_size}")
        if samples is not None:
            train, stats = mix_to_budget(train, samples, args.teacher_ratio, tokens, tokenizer.eos_token_id,
                                         args.seed)
            results.put("models", name, "budgets", budget, "teacher_data", stats)
            log(f"{name} {budget} tokens: teacher samples fill {stats['generated_blocks']} of {stats['blocks']} "
                f"train blocks; {stats['distinct_tokens']} distinct tokens")
        tc = TrainConfig(batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, chunk_size=2048,
                         losses={"forward_kl": 1.0, "ce": 0.5}, temperature=1.0, checkpoint_every=0,
                         val_batches=4, seed=args.seed)
        tc.max_steps = max(1, -(-tokens // (tc.batch_size * args.block_size)))
        tc.validate()
        for init in args.inits:
            run = f"{name}-{init}" if len(args.tokens) == 1 else f"{name}-{init}-{budget}"
            t = time.time()
            student = pool_kv_heads(copy.deepcopy(teacher), args.kv_heads, init, seed=args.seed,
                                    calibration=calibration)
            kv["after"] = kv_report(student.config, 8, 2048, 2)
            row = {"converted": measure_ppl(student, {"w": wiki}, *ppl_args, full_windows_only=True)["w"]}
            results.put("models", name, "budgets", budget, init, row)
            log(f"{name} {init}: ppl right after conversion {row['converted']:.3f} ({time.time() - t:.1f}s)")
            t = time.time()
            result = uptrain(student, teacher, train, val, tc, out / run)
            row.update({k: result["metrics"][k] for k in ("train_tokens", "tokens_per_s", "final_loss")})
            row["uptrain_s"] = time.time() - t
            log(f"{name} {init}: uptrained {row['train_tokens']} tokens in {row['uptrain_s']:.1f}s "
                f"({row['tokens_per_s']:.0f} tok/s)")
            row["uptrained"] = measure_ppl(result["model"], {"w": wiki}, *ppl_args, full_windows_only=True)["w"]
            results.put("models", name, "budgets", budget, init, row)
            log(f"{name} {init} {budget} tokens: ppl after uptraining {row['uptrained']:.3f}")
            del student, result
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    results.put("models", name, "kv", kv)
    del teacher
    gc.collect()


def data_line(settings: dict) -> str:
    """What the models were uptrained on, for results.md and the log."""
    td = settings.get("teacher_data")
    if td is None:
        return f"uptraining data: {settings['train_data']} only (validation: the same corpus)"
    lin = td["lineage"]
    return (f"uptraining data: {settings['train_data']} mixed with {td['samples']} teacher samples of {td['entry']} "
            f"(teacher content hash {lin.get('teacher_content_hash')}, sampling {lin.get('sampling')}, seed "
            f"{lin.get('seed')}) filling {td['ratio']:.0%} of the training blocks; validation: the corpus only")


def write_markdown(results: ResultsFile, out: Path) -> None:
    lines = ["| model | init | budget | ppl before | right after | after uptraining | vs before | tokens | tok/s "
             "| generated blocks |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in results.data["models"].items():
        for budget, by_init in m.get("budgets", {}).items():
            mix = by_init.get("teacher_data")
            share = f"{mix['generated_blocks']} of {mix['blocks']}" if mix else "-"
            for init in results.data["settings"]["inits"]:
                r = by_init.get(init, {})
                if "uptrained" not in r:
                    continue
                delta = 100 * (r["uptrained"] / m["ppl_before"] - 1)
                lines.append(f"| {name} | {init} | {budget} | {m['ppl_before']:.3f} | {r['converted']:.3f} "
                             f"| {r['uptrained']:.3f} | {delta:+.1f}% | {r['train_tokens']} | {r['tokens_per_s']:.0f} "
                             f"| {share} |")
        if "kv" in m:
            b, a = m["kv"]["before"], m["kv"]["after"]
            lines.append(f"| {name} | KV bytes/token | | {b['kv_bytes_per_token']} | {a['kv_bytes_per_token']} | | "
                         f"{b['kv_cache_bytes'] / 2**20:.0f} -> {a['kv_cache_bytes'] / 2**20:.0f} MiB at 8 x 2048 "
                         f"| | | |")
    lines += ["", data_line(results.data["settings"])]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    mix = teacher_data(args)  # verified before anything is loaded or trained
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    settings = {**{k: v for k, v in vars(args).items() if k != "model"}, "models": args.model,
                "device_name": device_name, "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "ppl_protocol": f"WikiText-2 raw test, non-overlapping {args.context}-token windows, full windows only"}
    if mix is not None:
        settings["teacher_data"] = mix[1]
    import transformers

    settings["transformers"] = transformers.__version__
    log(f"gqa experiment on {device_name}: {len(args.model)} model(s), inits {args.inits}, budgets {args.tokens} "
        f"tokens each")
    log(data_line(settings))
    results = ResultsFile(out / "results.json", {"settings": settings, "models": {}})
    for model in args.model:
        run_model(Path(model), args, results, out, mix[0] if mix else None)
    results.data["total_s"] = time.time() - T0
    results.save()
    write_markdown(results, out)
    log(f"done: {out / 'results.json'}")
    return results.data


if __name__ == "__main__":
    main()

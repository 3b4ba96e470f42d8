"""GQA uptraining experiment (issue #6): each model's K/V heads pooled to --kv-heads by each --inits
(mean, first, random, svd), each uptrained by distillation from the unconverted model with the same token
budget and data order; WikiText-2 raw test perplexity (non-overlapping 2048-token windows, full
windows only) before conversion, right after, and after uptraining.

    python experiments/gqa.py --model RUN/teacher RUN/distill --data-dir ../shared/data \
        --out outputs/gqa_exp --tokens 2000000
    python experiments/gqa.py --model TINY_ARTIFACT --data-dir DIR --out DIR --tokens 4096 --quick

Writes OUT/results.json after every measurement (a killed run keeps what it measured) and
OUT/results.md at the end; training logs go to OUT/<model>-<init>.train_log.jsonl.
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
from shrink.modeling import load_model, load_tokenizer  # noqa: E402
from shrink.stages.gqa import measure_ppl, uptrain  # noqa: E402
from train.data import CORPUS_FILE, budget_blocks  # noqa: E402
from train.loop import TrainConfig  # noqa: E402

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", required=True, help="artifact / model directories (with tokenizer)")
    p.add_argument("--data-dir", required=True, help="shared data: wikitext-2-raw/ and corpus/")
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, required=True, help="uptraining tokens per init (same for all)")
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
    return args


def run_model(path: Path, args: argparse.Namespace, results: ResultsFile, out: Path) -> None:
    name = path.name
    device = torch.device(args.device)
    teacher = load_model(path, dtype="fp32", device=device)
    check_pool_target(teacher.config, args.kv_heads, key="--kv-heads")
    for init in args.inits:
        check_init(teacher.config, init, key="--inits")
    tokenizer = load_tokenizer(path)
    wiki = encode(tokenizer, wikitext2_text(Path(args.data_dir)))
    train, val = budget_blocks(args.train_data, tokenizer, args.tokens, args.block_size, 16, args.seed, docs_per_batch=64)
    log(f"{name}: loaded; WikiText-2 {wiki.numel()} tokens, {train.shape[0]} train blocks of {args.block_size}")
    ppl_args = (args.context, args.context, args.max_windows, "bf16")
    kv = {"before": kv_report(teacher.config, 8, 2048, 2)}
    t = time.time()
    results.put("models", name, "ppl_before", measure_ppl(teacher, {"w": wiki}, *ppl_args, full_windows_only=True)["w"])
    log(f"{name}: ppl before conversion {results.data['models'][name]['ppl_before']:.3f} ({time.time() - t:.1f}s)")
    tc = TrainConfig(batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, chunk_size=2048,
                     losses={"forward_kl": 1.0, "ce": 0.5}, temperature=1.0, checkpoint_every=0,
                     val_batches=4, seed=args.seed)
    tc.max_steps = max(1, -(-args.tokens // (tc.batch_size * args.block_size)))
    tc.validate()
    for init in args.inits:
        t = time.time()
        student = pool_kv_heads(copy.deepcopy(teacher), args.kv_heads, init, seed=args.seed,
                                calibration=svd_calibration(train))
        kv["after"] = kv_report(student.config, 8, 2048, 2)
        row = {"converted": measure_ppl(student, {"w": wiki}, *ppl_args, full_windows_only=True)["w"]}
        results.put("models", name, init, row)
        log(f"{name} {init}: ppl right after conversion {row['converted']:.3f} ({time.time() - t:.1f}s)")
        t = time.time()
        result = uptrain(student, teacher, train, val, tc, out / f"{name}-{init}")
        row.update({k: result["metrics"][k] for k in ("train_tokens", "tokens_per_s", "final_loss")})
        row["uptrain_s"] = time.time() - t
        log(f"{name} {init}: uptrained {row['train_tokens']} tokens in {row['uptrain_s']:.1f}s "
            f"({row['tokens_per_s']:.0f} tok/s)")
        row["uptrained"] = measure_ppl(result["model"], {"w": wiki}, *ppl_args, full_windows_only=True)["w"]
        results.put("models", name, init, row)
        log(f"{name} {init}: ppl after uptraining {row['uptrained']:.3f}")
        del student, result
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results.put("models", name, "kv", kv)
    del teacher
    gc.collect()


def write_markdown(results: ResultsFile, out: Path) -> None:
    lines = ["| model | init | ppl before | right after | after uptraining | vs before | tokens | tok/s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in results.data["models"].items():
        for init in results.data["settings"]["inits"]:
            r = m.get(init, {})
            if "uptrained" not in r:
                continue
            delta = 100 * (r["uptrained"] / m["ppl_before"] - 1)
            lines.append(f"| {name} | {init} | {m['ppl_before']:.3f} | {r['converted']:.3f} | {r['uptrained']:.3f} "
                         f"| {delta:+.1f}% | {r['train_tokens']} | {r['tokens_per_s']:.0f} |")
        if "kv" in m:
            b, a = m["kv"]["before"], m["kv"]["after"]
            lines.append(f"| {name} | KV bytes/token | {b['kv_bytes_per_token']} | {a['kv_bytes_per_token']} | | "
                         f"{b['kv_cache_bytes'] / 2**20:.0f} -> {a['kv_cache_bytes'] / 2**20:.0f} MiB at 8 x 2048 | | |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    settings = {**{k: v for k, v in vars(args).items() if k != "model"}, "models": args.model,
                "device_name": device_name, "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "ppl_protocol": f"WikiText-2 raw test, non-overlapping {args.context}-token windows, full windows only"}
    import transformers

    settings["transformers"] = transformers.__version__
    log(f"gqa experiment on {device_name}: {len(args.model)} model(s), inits {args.inits}, {args.tokens} tokens each")
    results = ResultsFile(out / "results.json", {"settings": settings, "models": {}})
    for model in args.model:
        run_model(Path(model), args, results, out)
    results.data["total_s"] = time.time() - T0
    results.save()
    write_markdown(results, out)
    log(f"done: {out / 'results.json'}")
    return results.data


if __name__ == "__main__":
    main()

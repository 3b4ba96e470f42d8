"""Depth against width at equal parameters (issue 16 item 2, after Minitron): students of one
parameter budget (--fraction of the teacher's) by depth only, width only and both
(student.budget_by=depth|width|both, shrink/student_budget.py), each distilled by the distill stage
for the same tokens; WikiText-2 raw test perplexity (non-overlapping --context windows, full windows
only, no BOS) and held-out perplexity (the run's held-out split, as the quality gates cut it) of the
teacher, of each student at init and after distillation; and each model's batch-1 decode ms per token
in our engine (random weights of its shape, as the latency budget measures; --no-latency skips it).

    PYTHONUNBUFFERED=1 python experiments/depth_vs_width.py --teacher RUN/teacher \
        --data-dir ../shared/data --out outputs/depth_vs_width --tokens 20000000
    python experiments/depth_vs_width.py --teacher TINY --data-dir DIR --out DIR --smoke   # CPU, seconds

One JSON line per model in OUT/results.jsonl (appended as each finishes, so a killed run keeps what
it measured); students are saved as artifacts OUT/<kind>. Distillation settings are the distill
stage's (`conf/distill`), changed with --set key=value (Hydra overrides, e.g. --set distill.lr=3e-4).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.errors import config_section  # noqa: E402
from eval.perplexity import encode, wikitext2_text  # noqa: E402
from experiments.distill import cleanup  # noqa: E402
from shrink.__main__ import compose  # noqa: E402
from shrink.artifacts import Artifact  # noqa: E402
from shrink.modeling import load_model, load_tokenizer, num_parameters  # noqa: E402
from shrink.quality_gate import GateSettings, gate_ids  # noqa: E402
from shrink.stages.distill import StudentSpec, build_student, distill  # noqa: E402
from shrink.stages.gqa import measure_ppl  # noqa: E402
from shrink.student_budget import AXES, engine_decode_ms  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.data import load_packed  # noqa: E402

T0 = time.time()
SMOKE = ["data=pydoc", "data.max_docs=40", "data.block_size=64", "distill.batch_size=2", "distill.val_batches=1",
         "distill.checkpoint_every=0", "distill.save_dtype=fp32", "student.calib_blocks=2", "logging=none"]


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher artifact (e.g. RUN/teacher from stage=import)")
    p.add_argument("--data-dir", required=True, help="shared data: wikitext-2-raw/ and the corpus")
    p.add_argument("--out", required=True)
    p.add_argument("--fraction", type=float, default=0.6, help="student parameters / teacher parameters")
    p.add_argument("--tokens", type=int, default=None, help="training tokens of each student (default 20M; smoke 2048)")
    p.add_argument("--kinds", default=",".join(AXES), help="budget_by values to compare")
    p.add_argument("--context", type=int, default=None, help="WikiText-2 window (default 2048; smoke 64)")
    p.add_argument("--max-windows", type=int, default=None, help="WikiText-2 windows (default all; smoke 2)")
    p.add_argument("--heldout-windows", type=int, default=None, help="held-out windows (default 32; smoke 2)")
    p.add_argument("--heldout-context", type=int, default=None, help="held-out window (default 512; smoke 32)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Hydra override of the run")
    p.add_argument("--no-latency", action="store_true", help="skip the engine decode timing of each shape")
    p.add_argument("--smoke", action="store_true", help="tiny settings: a CPU run in seconds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    defaults = {"tokens": (20_000_000, 2048), "context": (2048, 64), "max_windows": (None, 2),
                "heldout_windows": (32, 2), "heldout_context": (512, 32)}
    for key, (full, small) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if args.smoke else full)
    args.kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(args.kinds) - set(AXES))
    if unknown:
        raise SystemExit(f"--kinds: unknown {unknown}; expected some of {', '.join(AXES)}")
    if not 0 < args.fraction < 1:
        raise SystemExit(f"--fraction={args.fraction}: must be in (0, 1)")
    return args


def perplexities(model: torch.nn.Module, texts: dict[str, torch.Tensor], args: argparse.Namespace) -> dict:
    wiki = measure_ppl(model, {"w": texts["wikitext2"]}, args.context, args.context, args.max_windows, "bf16",
                       full_windows_only=True)["w"]
    held = measure_ppl(model, {"h": texts["heldout"]}, args.heldout_context, args.heldout_context, None, "bf16",
                       full_windows_only=True)["h"]
    return {"wikitext2_ppl": wiki, "heldout_ppl": held}


def decode_ms(config, args: argparse.Namespace) -> dict:
    return {} if args.no_latency else {"decode_ms_per_token": engine_decode_ms(config, args.device)}


def write(out: Path, row: dict) -> None:
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    log(json.dumps(row))


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    teacher_art = Artifact.load(Path(args.teacher))
    overrides = [f"input={teacher_art.path}", f"data_dir={args.data_dir}", f"device={args.device}",
                 f"run={out}", "student=full", *(SMOKE if args.smoke else []), *args.set]
    cfg = compose(overrides)
    tokenizer = load_tokenizer(teacher_art)
    teacher = load_model(teacher_art, dtype="fp32", device=device).requires_grad_(False)
    target = int(args.fraction * num_parameters(teacher))
    gate = GateSettings(True, "warn", args.heldout_windows, args.heldout_context, {})
    texts = {"wikitext2": encode(tokenizer, wikitext2_text(Path(args.data_dir))),
             "heldout": gate_ids(cfg, tokenizer, gate)}
    cache_dir = Path(cfg.cache_dir) if cfg.get("cache_dir") else None
    block_size = int(cfg.data.block_size)
    with config_section("distill"):
        tc = TrainConfig.from_cfg({**cfg.distill, "tokens": args.tokens}, seed=int(cfg.seed), block_size=block_size)
    train_tokens = tc.max_steps * tc.batch_size * tc.grad_accum * block_size
    rows = [{"model": "teacher", "params": num_parameters(teacher), **perplexities(teacher, texts, args),
             **decode_ms(teacher.config, args),
             "device": str(device), "settings": {k: v for k, v in vars(args).items()}}]
    write(out, rows[0])

    def calibration(n: int) -> torch.Tensor:
        return load_packed(cfg.data, tokenizer, Path(args.data_dir), cache_dir).train[:n]

    for kind in args.kinds:
        started = time.time()
        spec = StudentSpec.from_cfg(cfg.student)
        spec = dataclasses.replace(spec, target_params=target, budget_by=kind)
        spec = spec.resolve(teacher.config, str(cfg.distill.save_dtype), device.type)
        built = build_student(spec, teacher, tokenizer, device, calibration)
        log(f"{kind}: student built in {time.time() - started:.1f} s")  # where a slow row's time goes
        student, _, info = built
        init = perplexities(student, texts, args)
        del student
        log(f"{kind}: init perplexities measured; distilling")
        # The student measured here is the one distilled: built (and its importance measured) once.
        art = distill(teacher_art, spec, cfg.data, tc, dest=out / kind, ckpt_dir=out / f".{kind}.ckpt",
                      device=device, data_dir=Path(args.data_dir), cache_dir=cache_dir,
                      save_dtype=str(cfg.distill.save_dtype), student=built)
        del built
        cleanup(device)
        log(f"{kind}: distilled")
        trained = load_model(art, dtype="fp32", device=device)
        shape = {k: spec.budget[k] for k in ("layers", "hidden_size", "intermediate_size", "num_attention_heads")}
        row = {"model": kind, "target_params": target, "params": num_parameters(trained), **shape,
               "kept_layers": info.get("kept_layers"), "train_tokens": train_tokens,
               **{f"{k}_init": v for k, v in init.items()}, **perplexities(trained, texts, args),
               **decode_ms(trained.config, args),
               "wall_s": round(time.time() - started, 1)}
        del trained
        cleanup(device)
        write(out, row)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()

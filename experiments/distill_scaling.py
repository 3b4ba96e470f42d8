"""Distillation step throughput and peak memory per GPU at 1 and 2 GPUs, DDP and FSDP2.

One JSON line per configuration (appended to --out and printed): tokens/s of the distill step
(global tokens per optimizer step / median step time, after warm-up steps), the median step time,
and each rank's peak allocated memory during the timed steps. The loop is the product's
(train.loop.train_distill) launched the way users launch it:

    accelerate launch --config_file conf/accelerate/{ddp,fsdp}.yaml --num_processes N ...

The driver (this script without --worker) runs every requested configuration as its own launch:

    python experiments/distill_scaling.py --teacher ~/.cache/shrink/.../smollm2.gguf --out scaling.jsonl
    python experiments/distill_scaling.py --random 7b --batch-per-gpu 1 --block 2048 --out scaling.jsonl
    python experiments/distill_scaling.py --random tiny --gpus 2 --steps 6 --out /tmp/s.jsonl   # CPU smoke

--teacher: an artifact / HF directory, a .gguf file or embedded:smollm2-135m-instruct (shrink's loader);
--random: a random Llama-shaped teacher (tiny | 135m | 1b | 7b, or hidden,intermediate,layers,heads,
kv_heads,vocab). The student keeps every other teacher layer (`--keep every:2`). Batches are random
token ids: the step's cost does not depend on their values. 1 GPU runs one plain process (no
launcher); DDP and FSDP2 run at every count in --gpus above 1. Each record holds the loss of every
step; --equal-global-batch adds a one-process run at the largest count's global batch
(batch-per-gpu x N), whose curve the N-process runs must follow (same blocks, same order).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

CONFIGS = {"ddp": REPO / "conf" / "accelerate" / "ddp.yaml", "fsdp2": REPO / "conf" / "accelerate" / "fsdp.yaml"}
SHAPES = {  # hidden, intermediate, layers, heads, kv_heads, vocab
    "tiny": (64, 128, 4, 4, 2, 320),
    "135m": (576, 1536, 30, 9, 3, 49152),     # SmolLM2-135M
    "1b": (2048, 5632, 22, 32, 4, 32000),     # TinyLlama-1.1B
    "7b": (4096, 11008, 32, 32, 32, 32000),   # Llama-2-7B
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--teacher", help="artifact / HF dir, .gguf file or embedded:<name>")
    src.add_argument("--random", help="random Llama-shaped teacher: " + " | ".join(SHAPES)
                     + " | hidden,intermediate,layers,heads,kv_heads,vocab")
    p.add_argument("--out", required=True, help="JSON lines are appended here")
    p.add_argument("--gpus", default="1,2", help="process counts (1 = one plain process)")
    p.add_argument("--kinds", default="ddp,fsdp2", help="what runs at more than one process")
    p.add_argument("--batch-per-gpu", type=int, default=8)
    p.add_argument("--block", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps, warm-up included")
    p.add_argument("--warmup", type=int, default=3, help="steps not timed (compile, allocator, first all-gathers)")
    p.add_argument("--keep", default="every:2", help="student layers (train.student_init syntax)")
    p.add_argument("--teacher-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="the frozen teacher's stored dtype (the stage uses fp32; compute is bf16 autocast)")
    p.add_argument("--losses", default="forward_kl:1.0,ce:0.5", help="name:weight,...")
    p.add_argument("--equal-global-batch", action="store_true",
                   help="also run one process at the largest count's global batch (the loss curves' reference)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per launch before it is killed")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # kind, set by the driver
    args = p.parse_args(argv)
    if args.steps <= args.warmup:  # no timed step would be left (statistics.median of nothing)
        p.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    return args


def shape_of(spec: str) -> tuple[int, ...]:
    if spec in SHAPES:
        return SHAPES[spec]
    values = tuple(int(v) for v in spec.split(","))
    if len(values) != 6:
        raise SystemExit(f"--random {spec}: expected one of {', '.join(SHAPES)} or six comma-separated integers")
    return values


def build_teacher(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    dtype = torch.float32 if args.teacher_dtype == "fp32" else torch.bfloat16
    if args.teacher:
        from common.paths import default_cache_dir
        from shrink.sources import load_source
        from train.distributed import main_process_first

        with main_process_first():  # one rank converts a GGUF into the cache
            model, _ = load_source(args.teacher, default_cache_dir(), dtype)
        return model.to(device)
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab = shape_of(args.random)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=max(4096, args.block), tie_word_embeddings=False)
    torch.manual_seed(0)
    with device:  # initialised where it runs: a 7B shape initialises in seconds on a GPU
        return LlamaForCausalLM(config).to(dtype)


def worker(args: argparse.Namespace) -> None:
    from shrink.modeling import num_parameters
    from train.config import TrainConfig
    from train.distributed import make_accelerator
    from train.loop import train_distill
    from train.student_init import parse_keep_layers, student_from_teacher

    accelerator = make_accelerator(1)
    device = accelerator.device
    teacher = build_teacher(args, device)
    keep = parse_keep_layers(args.keep, teacher.config.num_hidden_layers)
    student = student_from_teacher(teacher, keep).float()  # fp32 master weights, as the stage trains
    vocab = teacher.config.vocab_size
    world = accelerator.num_processes
    n_blocks = max(64, args.batch_per_gpu * world * 4)
    data = torch.randint(3, vocab, (n_blocks, args.block), generator=torch.Generator().manual_seed(0))
    losses = dict((k, float(w)) for k, w in (item.split(":") for item in args.losses.split(",")))
    tc = TrainConfig(max_steps=args.steps, batch_size=args.batch_per_gpu, warmup_steps=1, lr=1e-4,
                     checkpoint_every=0, eval_every=0, val_batches=1, losses=losses, chunk_size=4096)
    cuda = device.type == "cuda"
    stamps: dict[int, float] = {}
    curve: list[float] = []

    def on_step(step: int, logs: dict) -> None:
        if cuda:
            torch.cuda.synchronize()
        stamps[step] = time.perf_counter()
        curve.append(float(logs["loss"]))
        if step == args.warmup and cuda:
            torch.cuda.reset_peak_memory_stats()  # the timed steps' peak, not the loading's

    ckpt = Path(os.environ["DISTILL_SCALING_DIR"]) / "ckpt"  # no checkpoints are written; the step log goes here
    result = train_distill(student, teacher, data[:n_blocks - 4], data[n_blocks - 4:], tc, ckpt,
                           on_step=on_step, accelerator=accelerator, name="scaling")
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    peaks = accelerator.gather_for_metrics([peak]) if world > 1 else [peak]
    timed = [stamps[s] - stamps[s - 1] for s in range(args.warmup + 1, args.steps + 1)]
    if not accelerator.is_main_process:
        return
    step_s = statistics.median(timed)
    tokens_per_step = args.batch_per_gpu * args.block * world
    config = teacher.config
    record = {
        "kind": args.worker, "gpus": world, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "teacher": args.teacher or f"random:{args.random}",
        "teacher_shape": {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                          "num_attention_heads", "num_key_value_heads", "vocab_size")},
        "teacher_dtype": args.teacher_dtype, "student_layers": len(keep),
        "teacher_params": num_parameters(teacher),
        "student_params": num_parameters(result["model"]),
        "batch_per_gpu": args.batch_per_gpu, "block": args.block, "global_batch": args.batch_per_gpu * world,
        "tokens_per_step": tokens_per_step, "steps_timed": len(timed), "step_s_median": step_s,
        "step_s_min": min(timed), "step_s_max": max(timed), "tokens_per_s": tokens_per_step / step_s,
        "peak_mem_gib_per_gpu": peaks, "final_loss": result["metrics"]["final_loss"],
        "loss_curve": curve,
        "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    line = json.dumps(record)
    print(line, flush=True)
    with open(args.out, "a") as f:
        f.write(line + "\n")


def driver(args: argparse.Namespace, argv: list[str]) -> int:
    """Each configuration as its own launch (a fresh process group and a fresh GPU memory peak)."""
    counts = [int(n) for n in args.gpus.split(",")]
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in CONFIGS]
    if unknown:
        raise SystemExit(f"--kinds: unknown {unknown} (expected {', '.join(CONFIGS)})")
    jobs = [("single", 1, args.batch_per_gpu)] if 1 in counts else []
    if args.equal_global_batch and max(counts) > 1:
        jobs.append(("single", 1, args.batch_per_gpu * max(counts)))
    jobs += [(kind, n, args.batch_per_gpu) for n in counts if n > 1 for kind in kinds]
    failed = 0
    for port, (kind, n, batch) in enumerate(jobs, start=29650):
        me = [str(Path(__file__).resolve()), *argv, "--worker", kind, "--batch-per-gpu", str(batch)]
        if kind == "single":
            cmd = [sys.executable, *me]
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS[kind]),
                   "--num_processes", str(n), "--main_process_port", str(port), *me]
        print(f"# {kind} x{n}: {' '.join(cmd)}", flush=True)
        with tempfile.TemporaryDirectory() as scratch:
            proc = subprocess.Popen(cmd, env={**os.environ, "DISTILL_SCALING_DIR": scratch},
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank
                proc.wait()
                code = "timeout"
        if code != 0:
            failed += 1
            print(f"# {kind} x{n} failed: {code}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    parsed = parse_args(argv)
    if parsed.worker:
        worker(parsed)
    else:
        sys.exit(driver(parsed, argv))

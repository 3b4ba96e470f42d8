"""Where the distill stage's step time goes (issue 16): the product's loop (train.loop.train_distill)
at the shape `experiment=balanced` trains, one JSON line per variant (printed and appended to --out).

The stage's defaults: a SmolLM2-135M-shaped teacher (random weights, tied embeddings) and a 22-layer
student of it, batch 16 x block 512, loss chunks of 1024 tokens, forward KL 1.0 + CE 0.5, fp32 master
weights under bf16 autocast, the loss compiled on CUDA. Variants (--variants, comma-separated):

    now          the loop as it is
    old_syncs    the same loop with a device sync wherever the loop read the device before issue 16's
                 fix (after the batch's copy, at the start of each model's forward, before and after
                 the loss): the step time these reads cost
    chunk4096    loss chunks of 4096 tokens (what experiments/distill_scaling.py runs)

Each record: the median step time after --warmup steps, the first step's seconds (torch.compile),
the device reads per step the loop makes (train.host_reads), and one checkpoint of the trained state
(seconds, bytes: what `distill.checkpoint_every` writes each time), plus the stage's tokens/s over
`--stage-steps` steps with a checkpoint every `--checkpoint-every` as these numbers predict it.

    python experiments/distill_step_cost.py --out step_cost.jsonl                    # H200: ~2 minutes
    python experiments/distill_step_cost.py --shape 64,128,30,4,2,2048 --block 64 --steps 6 --warmup 2 \\
        --out /tmp/c.jsonl                                                           # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

VARIANTS = ("now", "old_syncs", "chunk4096")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON lines are appended here")
    p.add_argument("--shape", default="576,1536,30,9,3,49152",
                   help="teacher hidden,intermediate,layers,heads,kv_heads,vocab (default SmolLM2-135M)")
    p.add_argument("--student-layers", type=int, default=22)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per variant, warm-up included")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--stage-steps", type=int, default=2442, help="steps of the run the estimate is for")
    p.add_argument("--checkpoint-every", type=int, default=100)
    args = p.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)} (expected {', '.join(VARIANTS)})")
    if args.steps <= args.warmup + 1:
        p.error(f"--steps {args.steps} must exceed --warmup {args.warmup} + 1")
    return args


def models(args: argparse.Namespace, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    from train.student_init import student_from_teacher

    hidden, inter, layers, heads, kv, vocab = (int(v) for v in args.shape.split(","))
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=max(2048, args.block), tie_word_embeddings=True)
    torch.manual_seed(0)
    with device:
        teacher = LlamaForCausalLM(config)
    return teacher, student_from_teacher(teacher, list(range(args.student_layers))).float()


def old_syncs(device: torch.device) -> ExitStack:
    """A sync at each place the loop read the device before the fix (see the module doc)."""
    import train.loop as loop
    from train.batches import Batch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def wrap(fn, before: bool, after: bool):
        def wrapped(*a, **k):
            if before:
                sync()
            out = fn(*a, **k)
            if after:
                sync()
            return out
        return wrapped

    stack = ExitStack()
    stack.enter_context(mock.patch.object(Batch, "to", wrap(Batch.to, False, True)))
    stack.enter_context(mock.patch.object(loop, "forward_hidden", wrap(loop.forward_hidden, True, False)))
    stack.enter_context(mock.patch.object(loop, "chunked_distill_terms", wrap(loop.chunked_distill_terms, True, True)))
    return stack


def measure(args: argparse.Namespace, variant: str, device: torch.device, scratch: Path) -> dict:
    from train.checkpoint import save_checkpoint
    from train.config import TrainConfig
    from train.host_reads import HostReads
    from train.loop import train_distill

    teacher, student = models(args, device)
    n_blocks = max(64, args.batch * 4)
    vocab = teacher.config.vocab_size
    data = torch.randint(3, vocab, (n_blocks, args.block), generator=torch.Generator().manual_seed(0))
    tc = TrainConfig(max_steps=args.steps, batch_size=args.batch, warmup_steps=1,
                     chunk_size=4096 if variant == "chunk4096" else args.chunk_size, checkpoint_every=0,
                     val_batches=1, losses={"forward_kl": 1.0, "ce": 0.5})
    cuda = device.type == "cuda"
    stamps: list[float] = []
    reads, marks = HostReads(), []

    def on_step(step: int, logs: dict) -> None:
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        marks.append(len(reads.where))

    with ExitStack() as stack:
        if variant == "old_syncs":
            stack.enter_context(old_syncs(device))
        stack.enter_context(reads)
        t0 = time.perf_counter()
        result = train_distill(student, teacher, data[:-4], data[-4:], tc, scratch / variant / "ckpt",
                               on_step=on_step, name=variant)
    steps = [b - a for a, b in zip(stamps[args.warmup:], stamps[args.warmup + 1:])]
    t_save = time.perf_counter()
    save_checkpoint(result["accelerator"], scratch / variant / "ckpt", args.steps)
    save_s = time.perf_counter() - t_save
    saved = sum(f.stat().st_size for f in (scratch / variant / "ckpt").rglob("*") if f.is_file())
    step_s = statistics.median(steps)
    tokens = args.batch * args.block
    stage_s = (stamps[0] - t0) + args.stage_steps * step_s + args.stage_steps // args.checkpoint_every * save_s
    return {"variant": variant, "device": torch.cuda.get_device_name() if cuda else "cpu", "shape": args.shape,
            "student_layers": args.student_layers, "batch": args.batch, "block": args.block,
            "chunk_size": tc.chunk_size, "steps_timed": len(steps), "step_ms_median": 1e3 * step_s,
            "step_ms_min": 1e3 * min(steps), "step_ms_max": 1e3 * max(steps), "tokens_per_s": tokens / step_s,
            "first_step_s": stamps[0] - t0, "host_reads_per_step": (marks[-1] - marks[args.warmup]) / len(steps),
            "host_reads_of_a_step": reads.where[marks[-2]:marks[-1]],
            "checkpoint_s": save_s, "checkpoint_bytes": saved,
            "stage_tokens_per_s_estimate": args.stage_steps * tokens / stage_s,
            "stage_checkpoint_share": args.stage_steps // args.checkpoint_every * save_s / stage_s,
            "torch": torch.__version__}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as scratch:
        for variant in args.variants.split(","):
            record = measure(args, variant, device, Path(scratch))
            line = json.dumps(record)
            print(line, flush=True)
            with open(args.out, "a") as f:
                f.write(line + "\n")
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""Where the distill stage's step time goes (issue 16): the product's loop (train.loop.train_distill)
at the default pipeline's shape, one JSON line per variant (printed and appended to --out), the old step
and the new ones side by side in one process. The count behind the variants: docs/distill_step_cost.md.

The defaults: a SmolLM2-135M-shaped teacher (random weights, tied embeddings) and a 15-layer student of
it, batch 8 x block 512, loss chunks of 1024 tokens, forward KL 1.0 + CE 0.5, fp32 master weights under
bf16 autocast, the loss compiled on CUDA (`--student-layers 22 --batch 16` is `experiment=balanced`, the
tenth session's table). Variants (--variants, comma-separated):

    old              the step before this session's changes: the frozen teacher's weights cast by autocast in
                     every forward and its head once per loss chunk (train/frozen_casts.py and
                     fused_head_loss.teacher_head_fn switched off)
    now              the loop at its defaults (compile_model false)
    compiled         compile_model true: the decoder layers of student and teacher torch.compile'd
    batch4x          4 x --batch sequences per step (the step's fixed host cost spread over 4x the tokens)
    compiled_batch4x both
    old_syncs        `now` with a device sync wherever the loop read the device before issue 16's first fix
    chunk4096        `now` with loss chunks of 4096 tokens

Each record: the median step time after --warmup steps, tokens/s, model FLOPs per token (matmuls and
attention, `step_flops_per_token`) and the TFLOP/s they make against a bf16 matmul ceiling measured in
this process, peak GPU memory, the first step's seconds (torch.compile), the device reads per step
(train.host_reads), one extra profiled step (CUDA kernels launched and the GPU's busy milliseconds: a
step whose busy time is far below its wall time is paid on the host), and one checkpoint of the trained
state (seconds, bytes), plus the stage's tokens/s over `--stage-tokens` tokens with a checkpoint every
`--checkpoint-every` as these numbers predict it.

    python experiments/distill_step_cost.py --out step_cost.jsonl                    # H200: ~4 minutes
    python experiments/distill_step_cost.py --shape 64,128,30,4,2,2048 --block 64 --steps 6 --warmup 2 \\
        --variants now,batch4x --out /tmp/c.jsonl                                    # CPU smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

VARIANTS = ("old", "now", "compiled", "batch4x", "compiled_batch4x", "old_syncs", "chunk4096")
DEFAULT_VARIANTS = ("old", "now", "compiled", "batch4x", "compiled_batch4x")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON lines are appended here")
    p.add_argument("--shape", default="576,1536,30,9,3,49152",
                   help="teacher hidden,intermediate,layers,heads,kv_heads,vocab (default SmolLM2-135M)")
    p.add_argument("--student-layers", type=int, default=15)
    p.add_argument("--batch", type=int, default=8, help="sequences per step (batch4x: 4 x this)")
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per variant, warm-up included")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--stage-tokens", type=int, default=100_000_000, help="tokens of the run the estimate is for")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--ceiling-n", type=int, default=None, help="matmul ceiling size (default 8192 on CUDA, 256 on CPU)")
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


def uncached_teacher_casts() -> ExitStack:
    """The teacher's weights cast by autocast at every use, as before train/frozen_casts.py."""
    import train.fused_head_loss as fused_head_loss
    import train.loop as loop
    from train.frozen_casts import FrozenCasts

    stack = ExitStack()
    stack.enter_context(mock.patch.object(loop, "FrozenCasts", lambda model, dtype: FrozenCasts(model, None)))
    stack.enter_context(mock.patch.object(fused_head_loss, "teacher_head_fn", lambda head, device_type: head))
    return stack


def step_flops_per_token(teacher_config, student_config, block: int) -> dict[str, float]:
    """Model FLOPs per trained token: every matmul (2 per multiply-add) and causal attention's two
    products at the mean context (block + 1) / 2; a backward is twice its forward. Norms, softmax and
    the optimizer are left out (bytes, not FLOPs: docs/distill_step_cost.md)."""
    def body(c) -> int:
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
        return c.num_hidden_layers * (c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size)

    def attention(c) -> float:
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return c.num_hidden_layers * 2 * 2 * (block + 1) / 2 * c.num_attention_heads * head_dim

    def head(c) -> int:
        return 2 * c.hidden_size * c.vocab_size

    parts = {"teacher_forward": 2 * body(teacher_config) + attention(teacher_config) + head(teacher_config),
             "student_forward": 2 * body(student_config) + attention(student_config) + head(student_config),
             "student_backward": 2 * (2 * body(student_config) + attention(student_config) + head(student_config))}
    return {**parts, "total": sum(parts.values())}


def matmul_ceiling_tflops(device: torch.device, n: int) -> float:
    """The best of a few n^3 matmuls (bf16 on CUDA, fp32 on the CPU) in TFLOP/s."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(8):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def variant_config(args: argparse.Namespace, variant: str):
    """The TrainConfig of a variant (one profiled step past --steps)."""
    from train.config import TrainConfig

    return TrainConfig(max_steps=args.steps + 1, batch_size=args.batch * (4 if "batch4x" in variant else 1),
                       warmup_steps=1, chunk_size=4096 if variant == "chunk4096" else args.chunk_size,
                       checkpoint_every=0, val_batches=1, losses={"forward_kl": 1.0, "ce": 0.5},
                       compile_model=variant.startswith("compiled"))


class StepProfile:
    """A torch.profiler window over one step: CUDA kernels launched and their summed milliseconds. A
    profiler that fails (CUPTI unavailable) costs the record these two numbers, not its timings."""

    def __init__(self, device: torch.device) -> None:
        self.cuda, self.error, self._prof = device.type == "cuda", None, None

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        try:
            self._prof = profile(activities=[ProfilerActivity.CUDA] if self.cuda else [ProfilerActivity.CPU])
            self._prof.__enter__()
        except Exception as e:
            self.error, self._prof = f"{type(e).__name__}: {e}", None

    def stop(self) -> dict:
        result: dict = {"kernels_per_step": None, "gpu_busy_ms_per_step": None}
        if self._prof is None:
            return {**result, "profile_error": self.error}
        try:
            self._prof.__exit__(None, None, None)
            if self.cuda:
                from torch.autograd import DeviceType

                kernels = [e for e in self._prof.events() if e.device_type == DeviceType.CUDA]
                result = {"kernels_per_step": len(kernels),
                          "gpu_busy_ms_per_step": sum(e.time_range.elapsed_us() for e in kernels) / 1e3}
        except Exception as e:
            return {**result, "profile_error": f"{type(e).__name__}: {e}"}
        return result


def measure(args: argparse.Namespace, variant: str, device: torch.device, scratch: Path,
            ceiling_tflops: float) -> dict:
    from train.checkpoint import save_checkpoint
    from train.host_reads import HostReads
    from train.loop import train_distill

    # Every variant compiles from nothing: its first step is its own compile time, and a shape seen by an
    # earlier variant does not turn this one's graphs dynamic (dynamo's automatic dynamic shapes).
    torch._dynamo.reset()
    teacher, student = models(args, device)
    flops = step_flops_per_token(teacher.config, student.config, args.block)
    tc = variant_config(args, variant)
    n_blocks = max(64, tc.batch_size * 4)
    vocab = teacher.config.vocab_size
    data = torch.randint(3, vocab, (n_blocks, args.block), generator=torch.Generator().manual_seed(0))
    cuda = device.type == "cuda"
    if cuda:
        gc.collect()  # the previous variant's models, before this one's peak is measured
        torch.cuda.reset_peak_memory_stats(device)
    stamps: list[float] = []
    reads, marks = HostReads(), []
    profiler, profiled = StepProfile(device), {}

    def on_step(step: int, logs: dict) -> None:
        _sync(device)
        stamps.append(time.perf_counter())
        marks.append(len(reads.where))
        if step == args.steps:  # the extra step, after the timed ones
            profiler.start()
        elif step == args.steps + 1:
            profiled.update(profiler.stop())

    with ExitStack() as stack:
        if variant == "old_syncs":
            stack.enter_context(old_syncs(device))
        if variant == "old":
            stack.enter_context(uncached_teacher_casts())
        stack.enter_context(reads)
        t0 = time.perf_counter()
        result = train_distill(student, teacher, data[:-4], data[-4:], tc, scratch / variant / "ckpt",
                               on_step=on_step, name=variant)
    timed, timed_marks = stamps[:args.steps], marks[:args.steps]
    steps = [b - a for a, b in zip(timed[args.warmup:], timed[args.warmup + 1:])]
    t_save = time.perf_counter()
    save_checkpoint(result["accelerator"], scratch / variant / "ckpt", args.steps)
    save_s = time.perf_counter() - t_save
    saved = sum(f.stat().st_size for f in (scratch / variant / "ckpt").rglob("*") if f.is_file())
    step_s = statistics.median(steps)
    tokens = tc.batch_size * args.block
    tok_s = tokens / step_s
    stage_steps = math.ceil(args.stage_tokens / tokens)
    stage_saves = stage_steps // args.checkpoint_every
    stage_s = (stamps[0] - t0) + stage_steps * step_s + stage_saves * save_s
    tflops = flops["total"] * tok_s / 1e12
    return {"variant": variant, "device": torch.cuda.get_device_name() if cuda else "cpu", "shape": args.shape,
            "student_layers": args.student_layers, "batch": tc.batch_size, "block": args.block,
            "chunk_size": tc.chunk_size, "compile_model": tc.compile_model, "steps_timed": len(steps),
            "step_ms_median": 1e3 * step_s, "step_ms_min": 1e3 * min(steps), "step_ms_max": 1e3 * max(steps),
            "tokens_per_s": tok_s, "gflop_per_token": flops["total"] / 1e9,
            "gflop_per_token_parts": {k: v / 1e9 for k, v in flops.items() if k != "total"},
            "model_tflops_per_s": tflops, "matmul_ceiling_tflops": ceiling_tflops,
            "ceiling_share": tflops / ceiling_tflops,
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
            **profiled, "step_ms_profiled": 1e3 * (stamps[-1] - stamps[-2]),
            "first_step_s": stamps[0] - t0,
            "host_reads_per_step": (timed_marks[-1] - timed_marks[args.warmup]) / len(steps),
            "host_reads_of_a_step": reads.where[timed_marks[-2]:timed_marks[-1]],
            "checkpoint_s": save_s, "checkpoint_bytes": saved,
            "stage_tokens": args.stage_tokens, "stage_tokens_per_s_estimate": stage_steps * tokens / stage_s,
            "stage_minutes_estimate": stage_s / 60, "stage_checkpoint_share": stage_saves * save_s / stage_s,
            "torch": torch.__version__}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ceiling = matmul_ceiling_tflops(device, args.ceiling_n or (8192 if device.type == "cuda" else 256))
    failed = []
    with tempfile.TemporaryDirectory() as scratch:
        for variant in args.variants.split(","):
            try:
                record = measure(args, variant, device, Path(scratch), ceiling)
            except Exception as e:  # one GPU session: a failing variant must not cost the others their numbers
                failed.append(variant)
                record = {"variant": variant, "error": f"{type(e).__name__}: {e}"[:2000],
                          "traceback": traceback.format_exc()[-4000:]}
            line = json.dumps(record)
            print(line, flush=True)
            with open(args.out, "a") as f:
                f.write(line + "\n")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if failed:
        raise SystemExit(f"variants failed: {', '.join(failed)} (their records in {args.out} hold the errors)")

if __name__ == "__main__":
    main()

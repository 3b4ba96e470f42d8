"""Host microseconds per row-step of a decode step: the engine's Python around the model (scheduling,
staging the inputs, the sampler's per-row lists, appending tokens, stop checks, block bookkeeping).

On the H200 a sampled teacher-data run cost ~16 us per sequence-token at 256 and at 1,024 rows: a cost
per row, not per step, so the host, not the forward of a 135M model, set the pace. Here, on the CPU
with a tiny model (1 layer, hidden 32, vocab 320), each decode step's wall time is taken minus the
time inside the model's forward (``ModelRunner.decode_forward``, and a multi-step decode's on-device
advance), divided by the step's row-steps (rows x tokens per row). What remains also holds the
sampler's tensor math, which runs on the CPU here (on a GPU it is a fixed number of launches per
step): its floor is the ``math`` column, the same ops on prebuilt tensors of the batch's shape.

    PYTHONPATH=$PWD python experiments/host_step_cost.py [--rows 64 256 1024] [--tokens 24] [--repeat 3]

This CPU (2 cores shared with CI and another job, OMP_NUM_THREADS=1), 40 tokens after 16, best of 3, two
back-to-back before/after pairs; host us per row-step minus the sampler's tensor math (its floor, the
``math`` column, is subtracted for sampled rows; unseeded's floor is ~7 us of exponential noise, so its
cells are the noisiest):
    rows  mode       before (e352fad)   after
    1024  seeded     5.11 / 5.45        2.24 / 2.15
     256  seeded     5.27 / 6.59        2.47 / 3.00
      64  seeded     7.20 / 7.13        3.50 / 3.63
    1024  unseeded   4.11 / 4.44        1.90 / 1.35
     256  unseeded   4.72 / 5.40        2.49 / 2.21
    1024  greedy1    2.43 / 2.42        1.81 / 1.79   (greedy, num_decode_steps=1)
     256  greedy1    2.67 / 3.30        2.10 / 1.86
    1024  greedy     0.89 / 0.73        0.72 / 0.62   (multi-step greedy: 8 forwards per host step)
Sampler.sample_step alone at 1024 rows (us per row; aten ops per step, ~ launches on a GPU): seeded
3.67 / 3.40 (55 ops) -> 0.94 / 1.00 (36 ops); unseeded 15 -> 8 ops; greedy 1 op either way.
GPU time is not measured here: the counts (ops, host microseconds) are what changed.

Times are this thread's CPU time (time.thread_time), not wall: on shared cores, time spent waiting for
a core is not the engine's. Run it from two checkouts back to back: caches and clocks still move with
the load.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support import save_tiny_artifact  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.layers.sampler import SeededRows, draw, filter_logits  # noqa: E402

MODES = ("greedy", "greedy1", "seeded", "unseeded")  # greedy1: num_decode_steps=1 (no multi-step)


def params_for(mode: str, i: int, tokens: int) -> SamplingParams:
    if mode.startswith("greedy"):
        return SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    return SamplingParams(temperature=1.0, top_p=1.0, max_tokens=tokens, seed=i if mode == "seeded" else None,
                          ignore_eos=True)


class StepTimer:
    """Wraps one engine's step, scheduler and forward: per decode step, (wall, forward, row-steps)."""

    def __init__(self, engine) -> None:
        self.steps: list[tuple[float, float, int]] = []
        self.device = 0.0
        self.batch = None
        runner, scheduler = engine.runner, engine.scheduler
        for obj, name in ((runner, "decode_forward"), (runner.decode_inputs, "advance")):
            setattr(obj, name, self._timed(getattr(obj, name)))
        schedule, step = scheduler.schedule, engine.step

        def timed_schedule():
            self.batch = schedule()
            return self.batch

        def timed_step():
            self.device, self.batch = 0.0, None
            t0 = time.thread_time()
            out = step()
            wall = time.thread_time() - t0
            b = self.batch
            if b is not None and not b.is_prefill:
                self.steps.append((wall, self.device, len(b.seqs) * b.num_steps))
            return out

        scheduler.schedule, engine.step = timed_schedule, timed_step

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            t0 = time.thread_time()
            out = fn(*args, **kwargs)
            self.device += time.thread_time() - t0
            return out
        return wrapper


def sampling_math_us(rows: int, vocab: int, seeded: bool, repeat: int = 20) -> float:
    """The sampler's tensor math alone (temperature, softmax, draw) on prebuilt tensors, us per row."""
    logits = torch.randn(rows, vocab)
    temps = torch.ones(rows)
    seeds = SeededRows(list(range(rows)), list(range(rows)), [0] * rows, rows, logits.device) if seeded else None
    best = float("inf")
    for _ in range(repeat):
        t0 = time.thread_time()
        scaled = filter_logits(logits / temps[:, None], None, None, None, False, False)
        draw(scaled.softmax(dim=-1), seeds).tolist()
        best = min(best, time.thread_time() - t0)
    return 1e6 * best / rows


def sampler_step(rows: int, mode: str, vocab: int = 320, repeat: int = 20) -> tuple[float, int]:
    """Sampler.sample_step alone on one composition, step after step: (us per row, best of ``repeat``;
    aten ops of one step, each about one launch on a GPU: seeded_sample_cost.OpCount)."""
    from seeded_sample_cost import OpCount

    from engine.layers.sampler import Sampler
    from engine.sequence import Sequence

    seqs = [Sequence([3] * 16, params_for(mode, i, 1 << 20)) for i in range(rows)]
    logits = torch.randn(rows, vocab)
    sampler = Sampler(logits.device, {2})
    best = float("inf")
    for _ in range(repeat):
        t0 = time.thread_time()
        result = sampler.sample_step(seqs, logits)
        best = min(best, time.thread_time() - t0)
        for seq, tokens in zip(seqs, result.tokens):
            seq.token_ids.extend(tokens)
    with OpCount() as count:
        sampler.sample_step(seqs, logits)
    return 1e6 * best / rows, count.ops


def measure(path: str, rows: int, mode: str, tokens: int, repeat: int) -> float:
    llm = LLM(path, device="cpu", max_num_seqs=rows, kv_cache_tokens=rows * 64, max_model_len=64,
              num_decode_steps=1 if mode == "greedy1" else 8)
    prompts = [{"prompt_token_ids": [3 + (i * 7 + j) % 300 for j in range(16)]} for i in range(rows)]
    params = [params_for(mode, i, tokens) for i in range(rows)]
    llm.generate(prompts[:8], params[:8])  # warm-up
    timer = StepTimer(llm.engine)
    best = float("inf")
    for _ in range(repeat):
        timer.steps.clear()
        llm.generate(prompts, params)
        host = sum(wall - dev for wall, dev, _ in timer.steps)
        best = min(best, 1e6 * host / sum(n for _, _, n in timer.steps))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = str(Path(tempfile.mkdtemp()) / "tiny")
    save_tiny_artifact(Path(path), num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                       num_key_value_heads=1)
    print(f"host us per row-step (best of {args.repeat}; {args.tokens} tokens after 16; math: sampler ops alone)")
    print("each cell: host (host minus math); math: the sampler's tensor ops alone, seeded or unseeded")
    print(f"{'rows':>6} " + " ".join(f"{m:>16}" for m in args.modes))
    for rows in args.rows:
        math = {"seeded": sampling_math_us(rows, 320, True), "unseeded": sampling_math_us(rows, 320, False)}
        cells = []
        for m in args.modes:
            host = measure(path, rows, m, args.tokens, args.repeat)
            cells.append(f"{host:.2f} ({host - math.get(m, 0.0):.2f})")
        print(f"{rows:>6} " + " ".join(f"{c:>16}" for c in cells), flush=True)
    print("Sampler.sample_step alone, same composition each step: us per row (aten ops per step)")
    for rows in args.rows:
        cells = [sampler_step(rows, m) for m in args.modes]
        print(f"{rows:>6} " + " ".join(f"{f'{us:.2f} ({ops})':>16}" for us, ops in cells), flush=True)


if __name__ == "__main__":
    main()

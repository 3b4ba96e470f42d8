"""Time of one sampling step (Sampler.sample_step) for a batch of sampled rows, seeded or not: the
distill stage's teacher data gives every request its own seed (shrink/teacher_data.py), so a
per-row cost there is paid on every generated token.

    python experiments/seeded_sample_cost.py --rows 256 --vocab 49152 --device cpu

On the CPU the numbers are host time plus the CPU's own math; on a GPU (--device cuda) they are wall
time of the step including its one sync (the token transfer), so launches and device work both count.

CPU (2 shared cores, OMP_NUM_THREADS=1), 256 rows, temperature 1, medians of 9 (41 at vocab 64) calls:
                          vocab 49,152        vocab 64       aten ops
    unseeded              ~375 ms             0.73 ms        14 -> 15 (the noise clamp)
    seeded, before        621-636 ms          2.2 ms         1038 (a generator, 4 ops per row)
    seeded, after         168-182 ms          0.65 ms        55 (counter hash, fp64 cumsum, searchsorted)
GPU time needs the device: the op count is the launch count, independent of the rows.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from torch.utils._python_dispatch import TorchDispatchMode

from engine.layers.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def step_times(sampler: Sampler, seqs: list[Sequence], logits: torch.Tensor, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        if logits.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sampler.sample_step(seqs, logits)  # ends with the tokens' transfer to the host
        out.append(time.perf_counter() - t0)
    return out


class OpCount(TorchDispatchMode):
    """Counts the aten ops a call dispatches: on a GPU each is about one kernel launch (a copy to the
    host one more), so the count is the device-independent part of a step's host cost."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    logits = (3.0 * torch.randn(args.rows, args.vocab)).to(device)
    sampler = Sampler(device, set())
    for name, seed_of in (("unseeded", lambda i: None), ("seeded", lambda i: 1_000_003 + i)):
        seqs = [Sequence([1, 2, 3], SamplingParams(temperature=1.0, seed=seed_of(i), max_tokens=256))
                for i in range(args.rows)]
        step_times(sampler, seqs, logits, 2)  # warm-up (and a seeded row's first-use state)
        times = step_times(sampler, seqs, logits, args.repeat)
        with OpCount() as count:
            sampler.sample_step(seqs, logits)
        print(f"{name:9s} rows={args.rows} vocab={args.vocab} device={device}: {count.ops} aten ops, "
              f"median {1e3 * statistics.median(times):.2f} ms, min {1e3 * min(times):.2f} ms ({args.repeat} calls)")


if __name__ == "__main__":
    main()

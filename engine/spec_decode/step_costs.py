"""The step costs the ``auto`` policy (policy.py) weighs, measured by the engine at startup, after
CUDA graph capture and through the paths real steps take (on the CPU the same code times eager
steps).

Per batch size n in ``cost_batch_sizes`` (the target's decode graph buckets, else powers of two,
up to the largest speculative batch; a batch between two takes the next one's cost, as a graph
bucket pads it):

- decode: the target's decode forward of n rows (decode pseudo-rows of one token each: the decode
  graphs a plain step replays);
- verify[k], k = 1..k_max: VerifyPaths.all_logits of n sequences of k + 1 tokens, the path a real
  verify of that shape takes (so also the multi-query graphs, or the prefill path);
- draft: a draft model's decode forward of n rows (its own decode graphs), or, for n-gram, the host
  lookup of n sequences (``ngram_proposal`` over an NGRAM_CONTEXT-token context, times n).

Each figure is the best of REPEATS after a warm-up call; forwards run after ``context`` tokens of
K/V in blocks no sequence holds yet (at startup none does), as VerifyPaths.time does. Under tensor
parallelism every target forward is a VerifyStep sent to the workers, as the verify's are. Cost:
(2 + k_max) * len(sizes) * (REPEATS + 1) forwards; StepCosts.measure_s says what it took."""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import torch

from engine.cuda_graphs import decode_buckets, gpu_seconds
from engine.parallel.group import group_for
from engine.spec_decode.ngram import NgramProposer, ngram_proposal
from engine.spec_decode.policy import StepCosts
from engine.spec_decode.verify_paths import Chunks, VerifyStep

REPEATS = 3
CONTEXT = 256  # tokens of K/V each timed sequence attends to
NGRAM_CONTEXT = 1024


def cost_batch_sizes(runner: Any, max_batch_size: int) -> list[int]:
    """The batch sizes to measure: the decode graph buckets up to the largest speculative batch,
    and powers of two (and that largest batch) past them."""
    top = max(1, min(max_batch_size, runner.config.max_num_seqs))
    sizes = {b for b in (runner.graphs.buckets if runner.graphs is not None else decode_buckets(1)) if b <= top}
    sizes |= {2 ** i for i in range(int(math.log2(top)) + 1)} | {top}
    return sorted(sizes)


def _seconds(run: Callable[[], object], device: torch.device) -> float:
    run()  # warm-up
    if device.type == "cuda":
        return min(gpu_seconds(run) for _ in range(REPEATS))
    best = math.inf
    for _ in range(REPEATS):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def _target_decode(runner: Any, chunks: Chunks) -> torch.Tensor:
    """The target's decode forward over one-token chunks (the decode graphs), on every rank."""
    step = VerifyStep("pseudo_rows", chunks, False)
    if runner.tp_workers is None:
        return step.run(runner)
    return runner.tp_workers.run(step, lambda s: s.run(runner))


def _draft_decode(runner: Any, chunks: Chunks) -> torch.Tensor:
    """A draft model's decode forward over one-token chunks (its decode graphs), on rank 0 alone."""
    with group_for(runner.config.tensor_parallel_size):
        return runner.verify_paths.pseudo_row_logits(chunks)


def measure_step_costs(target: Any, proposer: Any, k_max: int, max_batch_size: int,
                       context: int = CONTEXT) -> StepCosts:
    """StepCosts of this engine's target and drafter (a DraftModelProposer's ``runner``, or an
    NgramProposer) at ``cost_batch_sizes``, for k = 1..k_max."""
    began = time.perf_counter()
    sizes = cost_batch_sizes(target, max_batch_size)
    context = max(0, min(context, target.config.max_model_len - k_max - 1))
    blocks = list(range(math.ceil((context + k_max + 1) / target.block_size)))
    if len(blocks) > target.num_blocks:  # a pool too small for one timed sequence: no context
        context, blocks = 0, list(range(math.ceil((k_max + 1) / target.block_size)))
    device = target.device
    decode, draft, verify = [], [], {k: [] for k in range(1, k_max + 1)}
    ngram = isinstance(proposer, NgramProposer)
    lookup = _ngram_seconds(proposer) if ngram else 0.0
    with torch.inference_mode():
        for n in sizes:
            one_token = [([0], context, blocks)] * n
            decode.append(_seconds(lambda: _target_decode(target, one_token), device))
            if ngram:
                draft.append(lookup * n)
            else:
                draft.append(_seconds(lambda: _draft_decode(proposer.runner, one_token), device))
            for k in verify:
                chunks = [([0] * (k + 1), context, blocks)] * n
                verify[k].append(_seconds(lambda: target.verify_paths.all_logits(chunks), device))
    return StepCosts(sizes, decode, draft, verify, draft_per_token=not ngram, measure_s=time.perf_counter() - began)


def _ngram_seconds(proposer: NgramProposer) -> float:
    """Host seconds of one sequence's n-gram lookup over NGRAM_CONTEXT tokens of a small alphabet
    (many candidate matches: the expensive case)."""
    context = np.random.default_rng(0).integers(0, 64, NGRAM_CONTEXT)
    k = 8
    return _seconds(lambda: ngram_proposal(context, proposer.min_n, proposer.max_n, k), torch.device("cpu"))

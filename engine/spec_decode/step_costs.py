"""The step costs the ``auto`` policy (policy.py) weighs, measured by the engine at startup, after
CUDA graph capture, through the code real steps run (on the CPU the same code times eager steps).

Per batch size n in ``cost_batch_sizes`` (the target's decode graph buckets, else powers of two,
up to the largest speculative batch; a batch between two takes the next one's cost, as a graph
bucket pads it), on n stand-in greedy sequences of ``context`` tokens:

- decode: the target runner's plain decode step (ModelRunner.run: forward, sampling, the sync),
  per token of a multi-step decode of num_decode_steps tokens where the engine has one: what the
  scheduler runs for a greedy batch when speculation is off;
- decode_one: the same step of one token (the decode figure where num_decode_steps is 1): what a
  speculative round runs when no sequence has a proposal (an n-gram lookup without a match);
- draft[k], k = 1..k_max: a model drafter's propose() of k tokens (its decode graphs, the
  multi-step greedy ones where it has them; Medusa's heads and the LM head on stand-in features),
  or n-gram's host lookup of n sequences
  (``ngram_proposal`` over an NGRAM_CONTEXT-token context of a small alphabet: many candidates);
- verify[k]: VerifyPaths.all_logits of n sequences of k + 1 tokens (the path a real verify of that
  shape takes; with the hidden rows and their gather for Medusa) and the greedy verify's argmax
  brought to the host;
- rounds (num_rounds R > 1, at the batch sizes the rounds runner takes): GreedyRounds.step of R
  rounds at k_max (rounds.py: its graphs where captured, the upload, the one sync), per round.
  The stand-ins' tokens are all one token, so an n-gram lookup always matches; a round's work does
  not depend on it (every row verifies k + 1 tokens).

Each figure is the best of REPEATS after a warm-up call. The stand-ins' K/V lives in blocks no
sequence holds yet (at startup none does), as in VerifyPaths.time. Under tensor parallelism every
target step goes to the workers as the engine's do (ModelRunner.run, VerifyPaths.all_logits); the
draft runs on rank 0 alone. Cost: about (2 + 2 k_max) * len(sizes) * (REPEATS + 1) steps (on an
H200 with SmolLM2-135M, k_max 4 and 5 sizes, well under a second); StepCosts.measure_s says. The
engine measures once, when it is built (SpecDecodeWorker's constructor), never inside a request."""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import torch

from engine.cuda_graphs import decode_buckets, gpu_seconds
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from engine.spec_decode.draft_model import DraftModelProposer
from engine.spec_decode.medusa import MedusaProposer
from engine.spec_decode.metrics import SpecDecodeMetrics
from engine.spec_decode.ngram import NgramProposer, ngram_proposal
from engine.spec_decode.policy import StepCosts

REPEATS = 3
CONTEXT = 256  # tokens of K/V each stand-in sequence attends to
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


def _stand_ins(n: int, context: int, blocks: list[int]) -> list[Sequence]:
    """n greedy sequences of ``context`` + 1 tokens past their prefill, their K/V (and a draft's)
    computed up to the last token, in ``blocks``."""
    seqs = []
    for _ in range(n):
        seq = Sequence([0] * (context + 1), SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True))
        seq.block_table, seq.in_prefill = list(blocks), False
        seq.num_computed_tokens = seq.draft_computed = context
        seqs.append(seq)
    return seqs


def measure_step_costs(target: Any, proposer: Any, k_max: int, max_batch_size: int,
                       context: int = CONTEXT, rounds: Any = None) -> StepCosts:
    """StepCosts of this engine's target runner and proposer (a DraftModelProposer, an
    NgramProposer or a MedusaProposer) at ``cost_batch_sizes``, for k = 1..k_max; with ``rounds``
    (a GreedyRounds at k_max) also its steps, at the sizes up to its largest batch (measured too)."""
    began = time.perf_counter()
    sizes = cost_batch_sizes(target, max_batch_size)
    if rounds is not None and rounds.k == k_max and rounds.max_bs:
        sizes = sorted(set(sizes) | {rounds.max_bs})
    else:
        rounds = None
    steps = target.config.num_decode_steps
    # positions a step writes past the context
    ahead = max(steps, k_max + 1, rounds.max_rounds * (k_max + 1) if rounds is not None else 0)
    context = max(0, min(context, target.config.max_model_len - ahead - 1))
    if math.ceil((context + ahead + 1) / target.block_size) > target.num_blocks:  # a tiny pool
        context = 0
    blocks = list(range(math.ceil((context + ahead + 1) / target.block_size)))
    device = target.device
    ngram = isinstance(proposer, NgramProposer)
    lookup = _ngram_seconds(proposer) if ngram else 0.0
    decode: list[float] = []
    decode_one: list[float] = []
    draft: dict[int, list[float]] = {k: [] for k in range(1, k_max + 1)}
    verify: dict[int, list[float]] = {k: [] for k in range(1, k_max + 1)}
    per_round: list[float] = []
    for n in sizes:
        seqs = _stand_ins(n, context, blocks)
        plain = ScheduledBatch(seqs, False, [1] * n, steps)
        decode.append(_seconds(lambda: target.run(plain), device) / steps)
        one = ScheduledBatch(seqs, False, [1] * n, 1)
        decode_one.append(_seconds(lambda: target.run(one), device) if steps > 1 else decode[-1])
        for k in draft:
            draft[k].append(lookup * n if ngram else _seconds(lambda: _propose(proposer, seqs, k, context), device))
            chunks = [([0] * (k + 1), context, blocks)] * n
            verify[k].append(_seconds(lambda: _verify(target, chunks, proposer, seqs), device))
        if rounds is not None and n <= rounds.max_bs:
            per_round.append(_seconds(lambda: _rounds_step(rounds, seqs, k_max, context), device) / rounds.max_rounds)
    if rounds is not None:  # the measurement's steps are not the engine's
        rounds.num_steps, rounds.last_rounds = 0, []
    # Only a draft model catches up one token after a fully accepted round.
    return StepCosts(sizes, decode, draft, verify, catch_up=isinstance(proposer, DraftModelProposer),
                     measure_s=time.perf_counter() - began, decode_one=decode_one, rounds=per_round)


def _propose(proposer: Any, seqs: list[Sequence], k: int, context: int) -> None:
    for seq in seqs:  # as after a round that rejected a token: no catch-up
        seq.draft_computed = context
    if isinstance(proposer, MedusaProposer):  # as after a verify: every sequence has its feature
        proposer.stand_in_features(seqs)
    proposer.propose(seqs, k).ids.cpu()  # the draft's tokens, waited for


def _rounds_step(rounds: Any, seqs: list[Sequence], k: int, context: int) -> None:
    """A step of R rounds at k (its sync included), a draft model's K/V as after a rejection."""
    for seq in seqs:
        seq.draft_computed = context
    n = len(seqs)
    rounds.step(ScheduledBatch(seqs, False, [1] * n, 1, [k] * n, rounds.max_rounds), SpecDecodeMetrics())


def _verify(target: Any, chunks: list, proposer: Any, seqs: list[Sequence]) -> list[int]:
    with torch.inference_mode():
        if not isinstance(proposer, MedusaProposer):
            return target.verify_paths.all_logits(chunks).argmax(dim=-1).tolist()
        logits, hidden = target.verify_paths.all_logits(chunks, hidden=True)
        tokens = logits.argmax(dim=-1).tolist()
        proposer.keep_features(seqs, hidden, [len(c[0]) - 1 for c in chunks], [[0]] * len(chunks))
        return tokens


def _ngram_seconds(proposer: NgramProposer) -> float:
    """Host seconds of one sequence's n-gram lookup over NGRAM_CONTEXT tokens of a small alphabet
    (many candidate matches: the expensive case)."""
    context = np.random.default_rng(0).integers(0, 64, NGRAM_CONTEXT)
    return _seconds(lambda: ngram_proposal(context, proposer.min_n, proposer.max_n, 8), torch.device("cpu"))

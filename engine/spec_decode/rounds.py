"""Greedy speculation for R rounds per host step, on the device (speculative_config ``num_rounds``).

A one-round speculative step (worker.py) costs a host round trip per round: staging, a sync for
the verify's tokens, the append. For a batch whose sequences are all plain greedy with a model
drafter at a fixed k, the scheduler reserves blocks for R (k + 1) positions per sequence
(Scheduler._reserve_rounds) and this runs R rounds back to back, like the multi-step plain decode
runs its steps, with one sync at the end. A round, on the device:

- the drafter's k greedy steps over its decode inputs: the first over 2b rows, rows [0, b) each
  sequence's newest token and rows [b, 2b) the token before it (DecodeInputs.prepare_lagged), the
  other k - 1 over rows [0, b), each followed by kernels/greedy_advance.py (tokens into a
  [k + 1, b] buffer, d_j in row j + 1: the step a token belongs to is its position minus the rows'
  start, len - 2);
- the drafts copied into the target's verify pseudo-rows ([last token, d_0 .. d_{k-1}] at len - 1..,
  DecodeInputs.prepare_chunks' layout) and the target's verify forward over the b (k + 1) rows;
- kernels/spec_advance.py: the verify argmax, the leading matches n, the n + 1 emitted tokens into
  a [b, R (k + 1)] device buffer, and both models' inputs for the next round from the new length.

The drafter's catch-up without a branch: its first forward of every round feeds the sequence's
last two tokens. After a round that accepted all k drafts the drafter's K/V lacks d_{k-1} (drafted,
never fed); after any other round it holds the position before the newest token already, and
writing that K/V again stores the same values. One extra row in the first of k forwards (a forward
of a small drafter costs about the same for 2b rows as for b: it reads the weights once) instead of
a data-dependent forward count or a (k + 1)-th forward per round. Before the first round, a
sequence whose draft K/V lags further (after its prefill, a preemption, or steps without
speculation) catches up as in the one-round path (DraftModelProposer.catch_up).

With CUDA graphs one round per batch bucket (drafter steps + copy + verify + advance) is captured
and replayed R times; eager (CPU, or enforce_eager) runs the same body with the torch references.
The host then reads the emitted tokens and per-round counts at once; the engine appends them through
its one append path (stop tokens, stop strings and max_tokens cut a run; the tokens after are
dropped) and Scheduler.finish_step rolls both caches back (num_computed_tokens, draft_computed,
unused tail blocks). A sequence that finished inside the step keeps running to the end of it on
blocks it reserved: its tokens are dropped.

An n-gram drafter (``method: "ngram"``) rounds the same way without a drafter model: the step uploads
each sequence's tokens into a device history [b, max_model_len + k + 1] once, a round's drafts are
kernels/ngram_match.py's lookup in it (the same proposal as ngram.py's, for every row at once; filler where
nothing matches, which a greedy verify accepts only where the target chose it anyway), and after the
verify its argmax rows go into the history at the rows' next positions (the n + 1 emitted ones are
then the history's newest; the others lie past the new length and are overwritten before anything
reads them). spec_advance's drafter rows are dummies there. On a launch-bound target this is what
a one-round step cannot do: a round costs the GPU its verify and the lookup, not a host round trip
(BENCHMARKS.md, fourteenth session: ~1.2 ms a round against ~0.6 ms of GPU work on SmolLM2-135M).

Metrics: the kernel's match count per row and round goes into a [b, R] buffer (at the round's column,
spec_advance's round counter) and comes back with the tokens. A round proposes what its match
proposed, as a one-round step's lookup would at that context: nothing where nothing matched (the
row's verify then counts as one plain token), fewer than k where the context ended; accepted is the
leading agreement within the proposal, and filler the verify accepted past it (a token the target
chose anyway) is emitted, not accepted. So acceptance_rate and the per-position rates mean what they
mean for one round. Under the ``auto`` k policy (policy.py) each round is observed as a one-round
step would be (``last_rounds``, SpecDecodeWorker.step), and the policy chooses between a plain
decode step and a step of R rounds at k = num_speculative_tokens, costed per round at startup
(step_costs.py; StepOverheads calibrates it by the steps' wall time).

Not here: tensor parallelism, a k other than num_speculative_tokens (a per-batch-size table's or the
auto policy's smaller k takes the one-round path), Medusa heads, sampling, logprobs: those steps
take worker.py's one-round path unchanged.
"""

from __future__ import annotations

import torch

from engine.context import reset_context, set_context
from engine.cuda_graphs import decode_buckets
from engine.layers.sampler import StepResult
from engine.model_runner import ModelRunner
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from engine.spec_decode.config import SpeculativeConfig
from engine.spec_decode.draft_model import DraftModelProposer
from engine.spec_decode.metrics import PhaseClock, SpecDecodeMetrics
from engine.spec_decode.ngram import NgramProposer
from engine.spec_decode.proposer import Proposer
from engine.staging import device_index
from kernels.ngram_match import ngram_match, ngram_match_ref
from kernels.spec_advance import spec_advance, spec_advance_ref


def greedy_rounds(target: ModelRunner, proposer: Proposer, spec: SpeculativeConfig | None) -> GreedyRounds | None:
    """The rounds runner of a speculative config with num_rounds > 1 and a model or n-gram drafter,
    on one rank; None otherwise (every step speculates one round)."""
    if spec is None or spec.num_rounds <= 1 or target.tp_workers is not None:
        return None
    rows, k = min(spec.max_batch_size, target.config.max_num_seqs), spec.num_speculative_tokens
    if isinstance(proposer, DraftModelProposer):
        return GreedyRounds(target, ModelDrafter(proposer, rows, k), spec)
    if isinstance(proposer, NgramProposer):
        return GreedyRounds(target, NgramDrafter(target, proposer, rows, k), spec)
    return None


class ModelDrafter:
    """A draft model's part of a round: its k greedy steps (the first over the lagged 2b rows)."""

    counts = False  # every round proposes all k drafts

    def __init__(self, proposer: DraftModelProposer, rows: int, k: int) -> None:
        self.proposer, self.runner = proposer, proposer.runner
        self.inputs = self.runner.decode_inputs
        self.tokens = torch.zeros((k + 1) * rows, dtype=torch.int64, device=self.runner.device)  # [k + 1, b]

    def fits(self, b: int) -> bool:
        return 2 * b <= self.inputs.d.ids.shape[0]

    def graphable(self) -> bool:
        return self.runner.graphs is not None and self.inputs.use_triton

    def begin(self, seqs: list[Sequence], b: int) -> None:
        self.proposer.catch_up(seqs, lag=2)  # the rounds feed the last two tokens themselves
        self.inputs.prepare_lagged(seqs, b)

    def draft(self, b: int, k: int) -> tuple[torch.Tensor, None]:
        """[b, k] drafts of a round, on the device (all k proposed)."""
        tokens = self.tokens[: (k + 1) * b].view(k + 1, b)
        self.inputs.advance(_forward(self.runner, 2 * b), b, tokens)  # the newest rows' logits come first
        for _ in range(k - 1):
            self.inputs.advance(_forward(self.runner, b), b, tokens)
        return tokens[1:].t(), None

    def verified(self, logits: torch.Tensor, b: int, k: int) -> None:
        pass

    def advance_inputs(self, b: int) -> tuple[torch.Tensor, ...]:
        d = self.inputs.d
        return d.ids[: 2 * b], d.pos[: 2 * b], d.lens[: 2 * b], d.slots[: 2 * b], d.start[: 2 * b], d.tables[: 2 * b]

    def pad(self, b: int) -> None:
        d = self.inputs.d
        d.slots[: 2 * b].fill_(-1)
        d.lens[: 2 * b].fill_(1)

    def finish(self, seqs: list[Sequence], emitted: list[list[int]], k: int) -> None:
        for seq, emitted_i in zip(seqs, emitted):
            # The drafter's K/V after the last round: through the newest token's position, less d_{k-1}
            # when all k were accepted (finish_step cuts it to the tokens the sequence keeps).
            seq.draft_computed = len(seq) + sum(emitted_i) - 1 - (emitted_i[-1] == k + 1)


class NgramDrafter:
    """Prompt lookup on the device (kernels/ngram_match.py) over a history of each row's tokens."""

    counts = True  # a round's drafts past its match's count are filler, not proposals

    def __init__(self, target: ModelRunner, proposer: NgramProposer, rows: int, k: int) -> None:
        self.target, self.min_n, self.max_n = target, proposer.min_n, proposer.max_n
        self.max_len = target.config.max_model_len
        # Room for a round's k + 1 argmax tokens past the longest context: no write is ever clamped.
        width = self.max_len + k + 1
        device = target.device
        self.hist = torch.zeros(rows, width, dtype=torch.int64, device=device)
        self.h_hist = torch.zeros(rows, width, dtype=torch.int64, pin_memory=True) if device.type == "cuda" else None
        # spec_advance's drafter rows (ids, pos, lens, slots, start, tables): written, never read.
        self.dummy = tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in (
            (2 * rows, torch.int64), (2 * rows, torch.int64), (2 * rows, torch.int32), (2 * rows, torch.int64),
            (2 * rows, torch.int64), ((2 * rows, 1), torch.int32)))

    def fits(self, b: int) -> bool:
        return b <= self.hist.shape[0]

    def graphable(self) -> bool:
        return True

    def begin(self, seqs: list[Sequence], b: int) -> None:
        """Each sequence's tokens into its history row (one copy; the step's rounds then append)."""
        host = self.h_hist if self.h_hist is not None else self.hist
        view = host.numpy()
        for i, seq in enumerate(seqs):
            view[i, : len(seq.token_ids)] = seq.token_ids
        if self.h_hist is not None:
            self.hist[: len(seqs)].copy_(self.h_hist[: len(seqs)], non_blocking=True)

    def _lens(self, b: int, k: int) -> torch.Tensor:
        """Each row's context length: its verify chunk starts at len - 1 (padding rows: clamped)."""
        pos = self.target.decode_inputs.d.pos[: b * (k + 1)].view(b, k + 1)[:, 0]
        return (pos + 1).clamp(1, self.max_len)

    def draft(self, b: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[b, k] drafts and [b] the tokens of them a match proposed (the rest is filler)."""
        fn = ngram_match if self.target.decode_inputs.use_triton else ngram_match_ref
        return fn(self.hist[:b], self._lens(b, k), self.min_n, self.max_n, k)

    def verified(self, logits: torch.Tensor, b: int, k: int) -> None:
        """The verify's argmax at the rows' next k + 1 positions (before spec_advance moves them)."""
        argmax = logits[: b * (k + 1)].argmax(dim=-1).view(b, k + 1)
        cols = self._lens(b, k)[:, None] + torch.arange(k + 1, device=argmax.device)[None, :]
        self.hist[:b].scatter_(1, cols, argmax)

    def advance_inputs(self, b: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[: 2 * b] for t in self.dummy)

    def pad(self, b: int) -> None:
        pass

    def finish(self, seqs: list[Sequence], emitted: list[list[int]], k: int) -> None:
        pass


def _forward(runner: ModelRunner, rows: int) -> torch.Tensor:
    """Logits of the first ``rows`` decode rows of ``runner`` (the model's dtype: argmax only)."""
    ids, pos, ctx = runner.decode_inputs.views(rows)
    set_context(ctx)
    hidden = runner.model(ids, pos)
    reset_context()
    return runner.model.compute_logits(hidden)


class GreedyRounds:
    def __init__(self, target: ModelRunner, drafter: ModelDrafter | NgramDrafter, spec: SpeculativeConfig) -> None:
        """``drafter``: a round's drafting part, for at least min(max_batch_size, max_num_seqs) rows."""
        self.target, self.drafter = target, drafter
        self.k, self.max_rounds = spec.num_speculative_tokens, spec.num_rounds
        k = self.k
        target_rows = target.decode_inputs.d.ids.shape[0]
        max_bs = min(spec.max_batch_size, target.config.max_num_seqs)
        # Batch buckets whose round fits the runners' decode rows: b (k + 1) verify rows (and a drafter's).
        self.buckets = [b for b in decode_buckets(max_bs) if b * (k + 1) <= target_rows and drafter.fits(b)]
        self.max_bs = self.buckets[-1] if self.buckets else 0
        self.bucket_of = [next(b for b in self.buckets if b >= n) for n in range(self.max_bs + 1)] if self.buckets else []
        device = target.device
        b, width = self.max_bs, self.max_rounds * (k + 1)
        self.out = torch.zeros(b * width, dtype=torch.int64, device=device)  # [b, R (k + 1)] emitted tokens
        self.stats = torch.zeros(b * (2 + self.max_rounds), dtype=torch.int32, device=device)  # spec_advance's
        # [b, R]: per round, the drafts a match proposed (an n-gram drafter's count; the rest of its k is filler).
        self.proposed = torch.zeros(b * self.max_rounds, dtype=torch.int32, device=device)
        on_cuda = device.type == "cuda"
        # Pinned host copies on a GPU: the step's one transfer back (on the CPU the buffers are read as they are).
        self.h_out = torch.zeros(self.out.numel(), dtype=torch.int64, pin_memory=True) if on_cuda else None
        self.h_stats = torch.zeros(self.stats.numel(), dtype=torch.int32, pin_memory=True) if on_cuda else None
        self.h_proposed = torch.zeros(self.proposed.numel(), dtype=torch.int32, pin_memory=True) if on_cuda else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._clock = PhaseClock(device)
        self._index = device_index(device)
        self.num_steps = 0  # steps that ran here
        # The latest step's rounds, as the auto policy observes them: per round, the sequences (indices
        # into the batch) that ran it before reaching max_tokens, their proposed and accepted drafts
        # and the tokens they emitted.
        self.last_rounds: list[tuple[list[int], list[int], list[int], list[int]]] = []
        # Graphs need the Triton advances (the torch references index by masks: a sync).
        if on_cuda and target.graphs is not None and drafter.graphable() and self.buckets and target.decode_inputs.use_triton:
            self._capture()

    def rounds_for_step(self, batch_size: int, k: int) -> int:
        """The scheduler's spec_rounds: rounds of a decode step of ``batch_size`` plain greedy
        sequences drafting ``k`` tokens each; 1 where this runner does not take the batch (more
        sequences than its buckets, or a k its rounds were not built for: the one-round path)."""
        if batch_size > self.max_bs or k != self.k:
            return 1
        return self.max_rounds

    # -- a step ----------------------------------------------------------------------------------
    def step(self, batch: ScheduledBatch, metrics: SpecDecodeMetrics) -> StepResult:
        """batch.num_rounds rounds on the device; per sequence, every token they emitted (the one sync).
        Each round's acceptance and the step's time go to ``metrics``."""
        seqs, rounds, k = batch.seqs, batch.num_rounds, self.k
        n = len(seqs)
        assert 1 < rounds <= self.max_rounds and n <= self.max_bs and batch.num_draft == [k] * n
        graphed = bool(self.graphs)
        b = self.bucket_of[n] if graphed else n
        clock = self._clock.start()
        with torch.inference_mode():
            self.drafter.begin(seqs, b)
            self.target.decode_inputs.prepare_chunks(
                [([s.token_ids[-1]] + [0] * k, len(s) - 1, s.block_table) for s in seqs], b * (k + 1))
            self._buffers(b)[1].zero_()
            for _ in range(rounds):
                if graphed:
                    self.graphs[b].replay()
                else:
                    self._round(b)
            tokens, emitted, proposed = self._fetch(b, n, rounds)
        clock.mark()
        metrics.add_time("verify", clock.seconds(0, 1))  # drafting and verifying interleave: all of it here
        self.drafter.finish(seqs, emitted, k)
        self._record(seqs, emitted, proposed, metrics)
        self.num_steps += 1
        return StepResult(tokens)

    def _record(self, seqs: list[Sequence], emitted: list[list[int]], proposed: list[list[int]] | None,
                metrics: SpecDecodeMetrics) -> None:
        """The acceptance metrics of each round that began before its sequence reached max_tokens,
        and ``last_rounds``. ``proposed`` (n-gram: per sequence and round, the drafts of a match;
        None: all k): as in a one-round step, a row without a match proposed nothing, and a verify
        that accepted filler (a token the target chose anyway) emitted it without accepting a draft."""
        k = self.k
        self.last_rounds = []
        for r in range(len(emitted[0]) if emitted else 0):
            rows, props, accepted, made = [], [], [], []
            for i, (seq, e) in enumerate(zip(seqs, emitted)):
                if sum(e[:r]) < seq.params.max_tokens - seq.num_output_tokens:
                    p = proposed[i][r] if proposed is not None else k
                    rows.append(i)
                    props.append(p)
                    accepted.append(min(e[r] - 1, p))
                    made.append(e[r])
            metrics.record(props, accepted, made)
            self.last_rounds.append((rows, props, accepted, made))

    def _buffers(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(out [b, R (k + 1)], stats [b, 2 + R]) views of the step's device buffers."""
        width = self.max_rounds * (self.k + 1)
        return self.out[: b * width].view(b, width), self.stats[: b * (2 + self.max_rounds)].view(b, -1)

    def _fetch(self, b: int, n: int, rounds: int) -> tuple[list[list[int]], list[list[int]], list[list[int]] | None]:
        """Per sequence its emitted tokens, per-round emitted counts and (n-gram) per-round proposed
        counts: one copy each, one sync."""
        out, stats = self._buffers(b)
        proposed = self._proposed(b) if self.drafter.counts else None
        if self.h_out is not None:
            h_out = self.h_out[: out.numel()].view(out.shape)
            h_stats = self.h_stats[: stats.numel()].view(stats.shape)
            h_out.copy_(out, non_blocking=True)
            h_stats.copy_(stats, non_blocking=True)
            if proposed is not None:
                h_proposed = self.h_proposed[: proposed.numel()].view(proposed.shape)
                h_proposed.copy_(proposed, non_blocking=True)
                proposed = h_proposed
            torch.cuda.current_stream(self._index).synchronize()
            out, stats = h_out, h_stats
        counts = stats[:n].tolist()
        rows = out[:n].tolist()
        props = [p[:rounds] for p in proposed[:n].tolist()] if proposed is not None else None
        return [row[: c[0]] for row, c in zip(rows, counts)], [c[2 : 2 + rounds] for c in counts], props

    def _proposed(self, b: int) -> torch.Tensor:
        """[b, R] view of the per-round proposed counts."""
        return self.proposed[: b * self.max_rounds].view(b, self.max_rounds)

    # -- a round ---------------------------------------------------------------------------------
    def _round(self, b: int) -> None:
        """Drafts, drafts into the verify rows, verify forward, spec_advance: nothing waits."""
        k = self.k
        t = self.target.decode_inputs.d
        drafts, count = self.drafter.draft(b, k)
        t.ids[: b * (k + 1)].view(b, k + 1)[:, 1:].copy_(drafts)
        if count is not None:  # at this round's column, stats[:, 1] (rounds so far; spec_advance counts this one)
            column = self._buffers(b)[1][:, 1:2].to(torch.int64).clamp(max=self.max_rounds - 1)
            self._proposed(b).scatter_(1, column, count[:, None].to(torch.int32))
        logits = _forward(self.target, b * (k + 1))
        self.drafter.verified(logits, b, k)
        self._advance(logits, b)

    def _advance(self, logits: torch.Tensor, b: int) -> None:
        t, q = self.target.decode_inputs.d, b * (self.k + 1)
        fn = spec_advance if self.target.decode_inputs.use_triton else spec_advance_ref
        out, stats = self._buffers(b)
        fn(logits, t.ids[:q], t.pos[:q], t.lens[:q], t.slots[:q], t.start[:q], t.tables[:q],
           *self.drafter.advance_inputs(b), out, stats, self.k, self.target.block_size)

    # -- graphs ----------------------------------------------------------------------------------
    def _capture(self) -> None:
        """One graph per bucket, a round each, largest first, in a pool of their own. Warm-up and
        capture run on inputs that store nothing (every row padding): the warm-up round launches each
        kernel once before the capture records it, and changes nothing a step reads."""
        pool = None
        t = self.target.decode_inputs.d
        with torch.inference_mode():
            for b in reversed(self.buckets):
                q = b * (self.k + 1)
                t.slots[:q].fill_(-1)
                t.lens[:q].fill_(1)
                self.drafter.pad(b)
                self._round(b)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    self._round(b)
                pool = pool or graph.pool()
                self.graphs[b] = graph
        torch.cuda.synchronize()

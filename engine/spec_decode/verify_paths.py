"""The chunk forwards of speculative decoding, and which one a verify takes, chosen by timing at
startup.

A speculative verify forward (``all_logits``: k + 1 tokens per sequence, logits at every one) has
four paths that compute the same logits: ``pseudo_rows`` (``pseudo_row_logits``: every token one
decode row sharing its sequence's block table, DecodeInputs.prepare_chunks; the fused small-batch
decode matmuls read the weights once for all rows, the decode graphs replay it), ``prefill``
(``prefill_all_logits``: the varlen prefill path and its verify graphs), and each of them with
multi-query decode attention (``pseudo_rows_mq``, ``prefill_mq``: ``verify_query_len`` = k + 1,
Context.verify_query_len, kernels/verify_attention.py: each sequence's K/V read once for all its
tokens, not once per token (pseudo-rows) nor once per query head (varlen prefill); pseudo_rows_mq
takes only whole sequences of k + 1 tokens, a ragged batch takes the runner-up). ``time`` runs each
path that has CUDA graphs as it will run (its graphs) on n tokens laid out as a verify lays them
out, sequences of k + 1, and keeps the fastest per n; past the pseudo-rows (path[0]) the faster
prefill path at the largest verify. A draft model's catch-up (``last_logits``: the logits at each
chunk's last token) takes the same pseudo-rows where they fit, else the prefill path. Every path
also gives the final hidden states of its logit rows when asked (``hidden``: a Medusa drafter's
features, spec_decode/medusa.py): eagerly the model's output, in the graphs a second static output
captured with the logits; nothing is computed or copied for it otherwise.

In batch-invariant mode (EngineConfig.batch_invariant) a verify takes ``pseudo_rows`` only, nothing
timed: its rows run the decode step's kernels (the GEMVs' one config at every row count, the decode
attention with batch 1's split count), so a token is scored bit for bit as a decode step would score
it. The multi-query kernel and the prefill path compute a query's attention and matmuls with other
reductions. A verify of more tokens than the decode rows runs in several forwards, and so do a
draft's catch-up and the runner's prefill in the mode (ModelRunner._prefill_as_pseudo_rows).

Under tensor parallelism a verify is a ``VerifyStep`` (a parallel/workers.py RunnerStep): rank 0
chooses the path (by its own timings: the ranks' may differ, and every rank must replay the same
graph, whose collectives pair with the others'), and sends it with the chunks (tokens, start
positions, block tables) to the workers; a model drafter's tokens, on rank 0's device, reach the
other ranks by a broadcast. Every rank then runs the same forward on its shard, and the logits are
gathered on every rank (rank 0 verifies them).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from engine.cuda_graphs import EngineGraphs, gpu_seconds
from engine.layers.sampler import device_tensor
from engine.parallel.group import broadcast_from_first, tp_size
from engine.parallel.workers import RunnerStep
from kernels.gemv import SMALL_M

Chunks = list[tuple[list[int], int, list[int]]]
# fp32 logits [tokens, vocab], or with ``hidden`` (logits, the final hidden states [tokens, hidden] of
# the same rows: the LM head's input, in the model's dtype).
Logits = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass
class VerifyStep(RunnerStep):
    """One verify forward as every rank runs it: the path rank 0 chose, the chunks, and whether
    the tokens are on rank 0's device (a model drafter's: broadcast, the chunks' lists then give
    only the lengths)."""

    path: str
    chunks: Chunks
    device_ids: bool
    hidden: bool = False  # also the hidden rows (one rank only: config.py refuses Medusa under TP)

    def run(self, runner: Any, ids: torch.Tensor | None = None) -> Logits:
        """fp32 logits [tokens, vocab] (``hidden``: and the hidden rows); ``ids``: rank 0's device
        tokens (None on the workers)."""
        with torch.inference_mode():
            if self.device_ids and tp_size() > 1:  # the workers take rank 0's tokens
                if ids is None:
                    ids = torch.empty(sum(len(c[0]) for c in self.chunks), dtype=torch.int64, device=runner.device)
                ids = broadcast_from_first(ids.to(torch.int64).contiguous())
            forward = runner.verify_paths.forwards()[self.path]
            return forward(self.chunks, ids, hidden=True) if self.hidden else forward(self.chunks, ids)


class VerifyPaths:
    def __init__(self, runner: Any, graphs: EngineGraphs, decode_rows: int) -> None:
        """``runner``: the ModelRunner whose decode and prefill paths these run (it hands itself in:
        this module never imports it, which imports this one); ``graphs``: its graph sets (this
        keeps the verify-only ones); ``decode_rows``: the rows of its decode inputs."""
        self.runner = runner
        self.mq_graphs, self.verify_graphs, self.mq_verify_graphs = graphs.mq, graphs.verify, graphs.mq_verify
        # The most tokens a chunk forward takes as decode pseudo-rows (graphed where graphs exist).
        self.batch_invariant = runner.config.batch_invariant
        self.max_pseudo_rows = (decode_rows if self.batch_invariant else
                                min(graphs.decode.max_bs if graphs.decode is not None else decode_rows, SMALL_M))
        self.path: dict[int, str] = {}  # by token count; 0: past the pseudo-rows
        self.ragged: dict[int, str] = {}  # where pseudo_rows_mq won: the runner-up

    def forwards(self) -> dict[str, Callable[..., torch.Tensor]]:
        """The paths by name (the _mq variants with the runner's verify_query_len)."""
        r = self.runner
        paths = {"pseudo_rows": self.pseudo_row_logits, "prefill": self.prefill_all_logits}
        if r.verify_query_len:
            paths["pseudo_rows_mq"] = functools.partial(self.pseudo_row_logits, multi_query=True)
            paths["prefill_mq"] = functools.partial(self.prefill_all_logits, multi_query=True)
        return paths

    def graph_sets(self) -> dict[str, object | None]:
        """Each path's CUDA graphs (None: it runs eagerly)."""
        return {"pseudo_rows": self.runner.graphs, "prefill": self.verify_graphs, "pseudo_rows_mq": self.mq_graphs,
                "prefill_mq": self.mq_verify_graphs}

    def all_logits(self, chunks: Chunks, ids: torch.Tensor | None = None, hidden: bool = False) -> Logits:
        """fp32 logits [tokens, vocab] at every token of the chunks (the speculative verify forward),
        valid until the next forward, through the path timed fastest at startup (untimed:
        pseudo-rows where they fit, else prefill). ``ids`` [tokens]: the chunks' tokens on the
        device (a model drafter's, never brought to the host), in place of the chunks' token lists,
        which then give only their lengths. ``hidden``: (logits, hidden rows), the final hidden
        state of every logit row (a Medusa drafter's features), from the same forward on every path:
        a second output of the graphs (captured with the logits), the model's output eagerly."""
        step = VerifyStep(self.choose(chunks), chunks, ids is not None, hidden)
        workers = self.runner.tp_workers  # tensor parallelism: every rank runs the step
        if workers is None:
            return step.run(self.runner, ids)
        return workers.run(step, lambda s: s.run(self.runner, ids))

    def choose(self, chunks: Chunks) -> str:
        """The path of a verify of ``chunks``: the one timed fastest at their token count."""
        if self.batch_invariant:
            return "pseudo_rows"
        n = sum(len(c[0]) for c in chunks)
        fits = n <= self.max_pseudo_rows
        path = self.path.get(n, "pseudo_rows") if fits else self.path.get(0, "prefill")
        if path == "pseudo_rows_mq" and any(len(c[0]) != self.runner.verify_query_len for c in chunks):
            path = self.ragged.get(n, "pseudo_rows")
        return path

    def pseudo_row_logits(self, chunks: Chunks, ids: torch.Tensor | None = None,
                          multi_query: bool = False, hidden: bool = False) -> Logits:
        """all_logits through the decode path: every token one decode row (decode_inputs.py's
        prepare_chunks), in a decode graph where one holds them. ``multi_query``: chunks of exactly
        verify_query_len tokens, attention per sequence (its graphs: mq_graphs)."""
        r = self.runner
        n = sum(len(c[0]) for c in chunks)
        if self.batch_invariant and n > self.max_pseudo_rows:  # more than the decode rows: in groups
            return self._in_groups(chunks, ids, hidden)
        q = r.verify_query_len if multi_query else 0
        assert not multi_query or all(len(c[0]) == q for c in chunks), f"multi-query pseudo-rows need chunks of {q}"
        graphs = self.mq_graphs if multi_query else r.graphs
        graphed = graphs is not None and n <= graphs.max_bs
        r.decode_inputs.prepare_chunks(chunks, graphs.bucket_of[n] if graphed else n, ids)
        return graphs.forward(n, hidden) if graphed else r.eager_decode_forward(n, q, hidden)

    def _in_groups(self, chunks: Chunks, ids: torch.Tensor | None, hidden: bool = False) -> Logits:
        """pseudo_row_logits of more tokens than the decode rows (batch-invariant mode), in forwards
        of at most that many, chunks cut into pieces where needed, in order: a row attends to the K/V
        its sequence's earlier rows stored in this forward or an earlier one. Each forward's logits
        are copied out before the next reuses their buffer."""
        rows = self.max_pseudo_rows
        groups: list[Chunks] = [[]]
        size = 0
        for tokens, start, table in chunks:
            for i in range(0, len(tokens), rows):
                piece = (tokens[i : i + rows], start + i, table)
                if size + len(piece[0]) > rows:
                    groups.append([])
                    size = 0
                groups[-1].append(piece)
                size += len(piece[0])
        parts, first = [], 0
        for group in groups:
            n = sum(len(c[0]) for c in group)
            out = self.pseudo_row_logits(group, None if ids is None else ids[first : first + n], hidden=hidden)
            parts.append(tuple(t.clone() for t in out) if hidden else (out.clone(),))
            first += n
        logits, *states = (torch.cat(p) for p in zip(*parts))
        return (logits, states[0]) if hidden else logits

    def prefill_all_logits(self, chunks: Chunks, ids: torch.Tensor | None = None,
                           multi_query: bool = False, hidden: bool = False) -> Logits:
        """all_logits through the prefill path (a verify graph where one holds it); ``multi_query``:
        with multi-query decode attention (mq_verify_graphs)."""
        r = self.runner
        graphs = self.mq_verify_graphs if multi_query else self.verify_graphs
        n = sum(len(c[0]) for c in chunks)
        if graphs is not None:
            out = graphs.run(chunks, ids, hidden)
            if out is not None:  # the bucket's padding rows cut off
                return (out[0][:n], out[1][:n]) if hidden else out[:n]
        q = r.verify_query_len if multi_query else 0
        states = r.varlen_forward(chunks, ids, q)
        logits = r.model.compute_logits(states).float()
        return (logits, states) if hidden else logits

    def last_logits(self, chunks: Chunks) -> torch.Tensor:
        """fp32 logits [chunks, vocab] at each chunk's last token (decode pseudo-rows or a prefill
        graph where one holds the step; valid until the next forward): a draft's catch-up."""
        r = self.runner
        tokens = sum(len(c[0]) for c in chunks)
        if tokens <= self.max_pseudo_rows or self.batch_invariant:  # the mode: in groups past the rows
            logits = self.pseudo_row_logits(chunks)
            if tokens == len(chunks):
                return logits
            last = list(itertools.accumulate(len(c[0]) for c in chunks))
            return logits.index_select(0, device_tensor(last, r.device) - 1)
        if r.prefill_graphs is not None:
            logits = r.prefill_graphs.run(chunks)
            if logits is not None:
                return logits[: len(chunks)]
        hidden = r.varlen_forward(chunks)
        last = device_tensor(list(itertools.accumulate(len(c[0]) for c in chunks)), r.device) - 1
        return r.model.compute_logits(hidden.index_select(0, last)).float()

    def time(self, max_tokens: int, context: int = 512, wide_tokens: int = 0) -> None:
        """path[n] for n = 2..max_tokens (as many sequences as the engine schedules), timed after
        ``context`` tokens of blocks that no sequence holds yet (every path writes the same K/V);
        path[0] at ``wide_tokens`` (the largest verify) where that is past the pseudo-rows. Without
        both the decode and the verify graphs nothing is timed: pseudo-rows (an eager prefill loses)."""
        r = self.runner
        if r.graphs is None or self.verify_graphs is None or self.batch_invariant:
            return
        q = r.verify_query_len
        context = max(0, min(context, r.config.max_model_len - (q or max_tokens)))
        blocks = list(range(math.ceil((context + (q or max_tokens)) / r.block_size)))
        if len(blocks) > r.num_blocks:
            return
        graphs = self.graph_sets()
        paths = {name: run for name, run in self.forwards().items() if graphs[name] is not None}

        def ranked(n: int, names: list[str]) -> list[str]:
            chunks = [([0] * min(q or n, n - i), context, blocks) for i in range(0, n, q or n)]
            names = [name for name in names if name != "pseudo_rows_mq" or n % q == 0]
            seconds = {name: min(gpu_seconds(lambda: paths[name](chunks)) for _ in range(3)) for name in names}
            return sorted(seconds, key=seconds.get)

        for n in range(2, max_tokens + 1):
            if q and -(-n // q) > r.config.max_num_seqs:  # no verify has that many sequences
                break
            self.path[n], *rest = ranked(n, list(paths))
            if self.path[n] == "pseudo_rows_mq":
                self.ragged[n] = rest[0]
        wide = min(wide_tokens, q * min(r.config.max_num_seqs, 16))
        if wide > self.max_pseudo_rows:
            self.path[0] = ranked(wide, [name for name in paths if name.startswith("prefill")])[0]

"""Which forward a speculative verify takes (ModelRunner.all_logits), chosen by timing at startup.

Four paths compute the same logits at every token of the verify chunks (k + 1 tokens a sequence):
``pseudo_rows`` (every token a decode row: the fused small-batch decode matmuls and the decode
graphs), ``prefill`` (the varlen prefill path and its verify graphs), and each of them with
multi-query decode attention (``pseudo_rows_mq``, ``prefill_mq``: kernels/verify_attention.py,
each sequence's K/V read once for all its tokens; pseudo_rows_mq takes only whole sequences of
k + 1 tokens, a ragged batch takes the runner-up). ``time`` runs each path that has CUDA graphs as
it will run (its graphs) on n tokens laid out as a verify lays them out, sequences of k + 1, and
keeps the fastest per n; past the pseudo-rows (path[0]) the faster prefill path at the largest verify.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Callable

import torch

from engine.cuda_graphs import gpu_seconds

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner

Chunks = list[tuple[list[int], int, list[int]]]


class VerifyPaths:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.path: dict[int, str] = {}  # by token count; 0: past the pseudo-rows
        self.ragged: dict[int, str] = {}  # where pseudo_rows_mq won: the runner-up

    def forwards(self) -> dict[str, Callable[..., torch.Tensor]]:
        """The paths by name (the _mq variants with the runner's verify_query_len)."""
        r = self.runner
        paths = {"pseudo_rows": r.pseudo_row_logits, "prefill": r.prefill_all_logits}
        if r.verify_query_len:
            paths["pseudo_rows_mq"] = functools.partial(r.pseudo_row_logits, multi_query=True)
            paths["prefill_mq"] = functools.partial(r.prefill_all_logits, multi_query=True)
        return paths

    def graph_sets(self) -> dict[str, object | None]:
        """Each path's CUDA graphs (None: it runs eagerly)."""
        r = self.runner
        return {"pseudo_rows": r.graphs, "prefill": r.verify_graphs, "pseudo_rows_mq": r.mq_graphs,
                "prefill_mq": r.mq_verify_graphs}

    def logits(self, chunks: Chunks, ids: torch.Tensor | None = None) -> torch.Tensor:
        """all_logits through the chosen path (untimed: pseudo-rows where they fit, else prefill)."""
        n = sum(len(c[0]) for c in chunks)
        fits = n <= self.runner.max_pseudo_rows
        path = self.path.get(n, "pseudo_rows") if fits else self.path.get(0, "prefill")
        if path == "pseudo_rows_mq" and any(len(c[0]) != self.runner.verify_query_len for c in chunks):
            path = self.ragged.get(n, "pseudo_rows")
        return self.forwards()[path](chunks, ids)

    def time(self, max_tokens: int, context: int = 512, wide_tokens: int = 0) -> None:
        """path[n] for n = 2..max_tokens (as many sequences as the engine schedules), timed after
        ``context`` tokens of blocks that no sequence holds yet (every path writes the same K/V);
        path[0] at ``wide_tokens`` (the largest verify) where that is past the pseudo-rows. Without
        both the decode and the verify graphs nothing is timed: pseudo-rows (an eager prefill loses)."""
        r = self.runner
        if r.graphs is None or r.verify_graphs is None:
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
        if wide > r.max_pseudo_rows:
            self.path[0] = ranked(wide, [name for name in paths if name.startswith("prefill")])[0]

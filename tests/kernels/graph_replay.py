"""Eager stand-ins for captured prefill/verify and decode graphs (engine/cuda_graphs.py), so the
graphs' host side (staging, padding, slots, tables, which rows give logits) is testable on the CPU."""

from __future__ import annotations

import torch

from engine.context import reset_context, set_context
from engine.cuda_graphs import DecodeGraphs, PrefillGraphs


class EagerReplay:
    """What the graph of bucket ``key`` computes, run eagerly from the staging buffer: logits at each
    sequence's last token, or at every row for a set built with ``all_rows`` (verify)."""

    def __init__(self, graphs: PrefillGraphs, key: tuple[int, int]) -> None:
        self.graphs, self.key = graphs, key

    def replay(self) -> None:
        g, (tokens, seqs) = self.graphs, self.key
        set_context(g._context(tokens, seqs))
        with torch.inference_mode():
            hidden = g.model(g.d.ids[:tokens], g.d.pos[:tokens])
            rows = hidden if g.all_rows else hidden.index_select(0, g.d.last[:seqs])
            g.logits[self.key] = g.model.compute_logits(rows).float()
        reset_context()


class EagerDecodeReplay:
    """What the decode graph of bucket ``rows`` computes (engine/cuda_graphs.DecodeGraphs), run
    eagerly from the decode staging buffer: the forward over all the bucket's rows, padding included."""

    def __init__(self, graphs: DecodeGraphs, rows: int) -> None:
        self.graphs, self.rows = graphs, rows

    def replay(self) -> None:
        g = self.graphs
        ids, pos, ctx = g.inputs.views(self.rows, g.verify_query_len)
        set_context(ctx)
        with torch.inference_mode():
            g.logits[self.rows] = g.model.compute_logits(g.model(ids, pos)).float()
        reset_context()


def eager_decode_graphs(runner, max_bs: int, verify_query_len: int = 0) -> DecodeGraphs:
    """The runner's decode graphs up to ``max_bs`` rows, each bucket an EagerDecodeReplay."""
    graphs = DecodeGraphs(runner.model, runner.decode_inputs, max_bs, num_steps=1, verify_query_len=verify_query_len)
    for rows in graphs.buckets:
        graphs.graphs[rows] = EagerDecodeReplay(graphs, rows)
    return graphs

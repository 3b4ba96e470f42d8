"""An eager stand-in for a captured prefill/verify graph (engine/cuda_graphs.PrefillGraphs), so the
graphs' host side (staging, padding, slots, tables, which rows give logits) is testable on the CPU."""

from __future__ import annotations

import torch

from engine.context import reset_context, set_context
from engine.cuda_graphs import PrefillGraphs


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

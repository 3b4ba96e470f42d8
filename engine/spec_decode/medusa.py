"""The Medusa Proposer: heads on the target's own final hidden state draft k tokens at once
(common/medusa.py: the heads, their artifact and its checks; ``speculative_config`` method "medusa").

Head i of f, the target's final hidden state (the LM head's input) at the row whose logits gave a
sequence's last emitted token, predicts the token i + 1 after that last token, through the
target's own LM head. So a round needs f, which only a target forward gives: the verify forward
returns its hidden rows with its logits (VerifyPaths.all_logits(hidden=True): a second output of
every path, the graphs' included), and after acceptance each sequence keeps the row of its bonus
token, start_i + accepted_i (``keep_features``: one index_select for the batch), as
``Sequence.spec_feature`` together with the length it belongs to. A sequence without a current
feature (just prefilled, after a plain decode step, after a preemption's recompute: the length
differs) proposes 0 tokens that round, and the verify of its last token alone gives it one; so
prefill and plain decode run unchanged, and the worker verifies (rather than decodes plainly) when
nobody has a feature (worker.py).

A draft (``propose``): the batch's features gathered in one index_select (none when they are the
previous verify's rows in order), the k heads as stacked batched matmuls (one baddbmm, SiLU and
add per head block for all k heads), the target's compute_logits on the [B k, hidden] rows, then
draft_sampler.sample_draft on every row: greedy rows take the argmax, sampled rows draw with the
request's parameters and keep q for rejection sampling; min_tokens bans stop tokens as for a draft
model. With the target's CUDA graphs, a batch of greedy rows past min_tokens (nothing to ban, the
argmax alone) replays a graph of heads, LM head and argmax per (batch bucket, k) instead
(MedusaGraphs: the features copied into its input, one replay; the same tokens as eagerly). Medusa's drafts are independent per position (d_j does not see d_{j-1}); rejection sampling
needs only that q_j is the distribution d_j was drawn from, so the output stays the target's. The
tokens stay on the device (Proposal.ids): nothing here waits for it.

No draft model, no draft KV cache, no catch-up. One rank only (config.py: the LM head is whole on
rank 0 only without tensor parallelism). Measured by step_costs.py like any drafter (draft[k]: this
propose on stand-in features).
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any, Sequence as Seq

import torch
import torch.nn.functional as F

from common.medusa import MedusaError, MedusaHeads, load_heads
from engine.layers.sampler import device_tensor, seeded_rows
from engine.sequence import Sequence
from engine.spec_decode.config import SpeculativeConfig, SpeculativeConfigError, check_same_vocabulary
from engine.spec_decode.draft_sampler import sample_draft
from engine.spec_decode.min_tokens import ban_stop_tokens
from engine.spec_decode.proposer import Proposal, per_sequence_k
from engine.tokenizer import load_tokenizer


def load_medusa_heads(target: Any, target_tokenizer: Any, spec: SpeculativeConfig) -> MedusaHeads:
    """The heads of ``spec.model`` (fp32, CPU) after checking that they serve the target (an
    EngineConfig), before any model is built: every tensor, hidden and vocab size equal to the
    target's (key ``model``), at least num_speculative_tokens heads, and the same vocabulary where
    the directory has tokenizer files (check_same_vocabulary)."""
    hf = target.hf_config
    try:
        heads = load_heads(spec.model, hidden_size=int(hf.hidden_size), vocab_size=int(hf.vocab_size))
    except MedusaError as e:
        raise SpeculativeConfigError("model", str(e)) from None
    if spec.num_speculative_tokens > heads.num_heads:
        raise SpeculativeConfigError(
            "num_speculative_tokens", f"{spec.num_speculative_tokens} exceeds the {heads.num_heads} Medusa heads of "
            f"{spec.model!r} (head i drafts the token i + 1 past the last)")
    tokenizer = load_tokenizer(spec.model)
    if tokenizer is not None:
        check_same_vocabulary(hf, target_tokenizer, SimpleNamespace(vocab_size=heads.vocab_size), tokenizer)
    return heads


class MedusaProposer:
    has_probs = True
    needs_hidden = True  # the verify forward hands its hidden rows back (keep_features)

    def __init__(self, runner: Any, heads: MedusaHeads, eos_token_ids: set[int] | frozenset[int],
                 spec: SpeculativeConfig | None = None) -> None:
        """``runner``: the target's ModelRunner (its LM head, device and dtype); ``heads``: checked
        by load_medusa_heads; ``spec``: the batch sizes and k that greedy drafts are graphed for,
        where the runner has CUDA graphs (None: eager only)."""
        self.runner = runner
        self.eos_token_ids = eos_token_ids
        self.num_heads, self.hidden_size = heads.num_heads, heads.hidden_size
        dev, dtype = runner.device, runner.dtype
        # Per block j: every head's W_j^T [num_heads, hidden, hidden] and b_j [num_heads, 1, hidden],
        # so that one baddbmm runs block j of all k heads (MedusaHeads.forward's math).
        self.weights = [torch.stack([h[j].weight.detach().t() for h in heads.heads]).to(dev, dtype).contiguous()
                        for j in range(heads.num_layers)]
        self.biases = [torch.stack([h[j].bias.detach()[None] for h in heads.heads]).to(dev, dtype).contiguous()
                       for j in range(heads.num_layers)]
        cfg = runner.config  # batches the engine speculates on and would replay a decode graph for
        self.graphs = (MedusaGraphs(self, min(spec.max_batch_size, cfg.max_num_seqs, cfg.cuda_graph_max_bs),
                                    spec.num_speculative_tokens)
                       if spec is not None and runner.graphs is not None else None)

    def head_states(self, features: torch.Tensor, k: int) -> torch.Tensor:
        """features [B, hidden] -> [k, B, hidden]: the first k heads' inputs to the LM head."""
        g = features.expand(k, *features.shape)
        for w, b in zip(self.weights, self.biases):
            g = g + F.silu(torch.baddbmm(b[:k], g, w[:k]))
        return g

    def propose(self, seqs: Seq[Sequence], k: int | Seq[int]) -> Proposal:
        ks = per_sequence_k(seqs, k)
        features, have = self.features(seqs)
        counts = [n if ok else 0 for n, ok in zip(ks, have)]
        steps = max(counts, default=0)
        if steps == 0:
            return Proposal([[] for _ in seqs])  # host lists: the verify of the last tokens gives features
        b = len(seqs)
        with torch.inference_mode():
            if self.graphs is not None and self.graphs.takes(seqs, steps):
                return Proposal(None, ids=self.graphs.run(features, steps), counts=counts)
            logits = self.logits(features, steps)
            logits = ban_stop_tokens(logits, seqs, self.eos_token_ids)  # row i, position j: output token n_i + j
            tokens, q = sample_draft(logits.view(b * steps, -1), [s.params for s in seqs for _ in range(steps)],
                                     seeded_rows(seqs, logits.device, steps))
        return Proposal(None, q.view(b, steps, -1) if q is not None else None, ids=tokens.view(b, steps),
                        counts=counts)

    def logits(self, features: torch.Tensor, k: int) -> torch.Tensor:
        """[B, k, vocab] logits of the first k heads, in the model's dtype (greedy rows' argmax is the
        same as in fp32; sampled rows' processed_probs casts to fp32)."""
        b = features.shape[0]
        states = self.head_states(features, k).transpose(0, 1).reshape(b * k, -1)  # row i * k + j
        return self.runner.model.compute_logits(states).view(b, k, -1)

    def features(self, seqs: Seq[Sequence]) -> tuple[torch.Tensor | None, list[bool]]:
        """([B, hidden] features, whether each sequence has a current one): the sequences' kept
        rows in one index_select (after a cat of their sources when they come from more than one
        verify; none when they are one verify's rows in order). A row without a feature holds any
        row (it proposes nothing); None when no sequence has one."""
        sources: list[torch.Tensor] = []
        index: dict[int, int] = {}
        refs: list[tuple[int, int] | None] = []
        for seq in seqs:
            kept = seq.spec_feature
            if kept is None or kept[2] != len(seq):
                refs.append(None)
                continue
            i = index.setdefault(id(kept[0]), len(sources))
            if i == len(sources):
                sources.append(kept[0])
            refs.append((i, kept[1]))
        have = [r is not None for r in refs]
        if not sources:
            return None, have
        offsets = list(itertools.accumulate((len(t) for t in sources), initial=0))
        rows = [offsets[r[0]] + r[1] if r is not None else 0 for r in refs]
        table = sources[0] if len(sources) == 1 else torch.cat(sources)
        if rows == list(range(len(table))):
            return table, have
        return table.index_select(0, device_tensor(rows, table.device, torch.int64)), have

    @staticmethod
    def keep_features(seqs: Seq[Sequence], hidden: torch.Tensor, counts: Seq[int], tokens: Seq[list[int]]) -> None:
        """After a verify of [last, d_0 .. d_{m_i - 1}] per sequence (``hidden``: its rows, valid
        until the next forward) emitted ``tokens`` (not yet appended): each sequence's feature is the
        row whose logits gave its last emitted token, start_i + accepted_i, copied out in one
        index_select, for the length it will have once they are appended."""
        rows, start = [], 0
        for m, emitted in zip(counts, tokens):
            rows.append(start + len(emitted) - 1)
            start += m + 1
        kept = hidden.index_select(0, device_tensor(rows, hidden.device, torch.int64))
        for i, (seq, emitted) in enumerate(zip(seqs, tokens)):
            seq.spec_feature = (kept, i, len(seq) + len(emitted))

    def stand_in_features(self, seqs: Seq[Sequence]) -> None:
        """Features for step_costs.py's stand-in sequences (timing only: their values do not matter)."""
        kept = torch.zeros(len(seqs), self.hidden_size, device=self.runner.device, dtype=self.runner.dtype)
        for i, seq in enumerate(seqs):
            seq.spec_feature = (kept, i, len(seq))


class MedusaGraphs:
    """Greedy drafts in CUDA graphs: per batch bucket b (the decode buckets up to the largest
    speculative batch) and k = 1..k_max, one graph of the heads, the LM head and the argmax, reading
    the features from a static input and writing [b, k] token ids. Eagerly those are a dozen
    launches, each a host cost comparable to its GPU time at batch 1 (the target's decode is launch
    bound, the reason its steps run in graphs). Padding rows compute on whatever features they hold;
    their tokens are never read. Captured in a pool of their own, after the target's graphs."""

    def __init__(self, proposer: MedusaProposer, max_bs: int, k_max: int) -> None:
        from engine.cuda_graphs import decode_buckets

        self.buckets = decode_buckets(max(1, max_bs))
        self.max_bs = self.buckets[-1]
        self.bucket_of = [next(b for b in self.buckets if b >= n) for n in range(self.max_bs + 1)]
        runner = proposer.runner
        self.features = torch.zeros(self.max_bs, proposer.hidden_size, device=runner.device, dtype=runner.dtype)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.ids: dict[tuple[int, int], torch.Tensor] = {}
        pool = None
        with torch.inference_mode():
            for b in reversed(self.buckets):
                for k in range(1, k_max + 1):
                    proposer.logits(self.features[:b], k).argmax(dim=-1)  # warm-up: every kernel launched once
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool):
                        self.ids[b, k] = proposer.logits(self.features[:b], k).argmax(dim=-1)
                    pool = pool or graph.pool()
                    self.graphs[b, k] = graph
        torch.cuda.synchronize()

    def takes(self, seqs: Seq[Sequence], k: int) -> bool:
        """Whether a draft of ``k`` tokens for ``seqs`` is the graphs' argmax alone: a bucket holds the
        batch, every row greedy, none below its min_tokens (ban_stop_tokens would change nothing)."""
        n = len(seqs)
        return (n <= self.max_bs and (self.bucket_of[n], k) in self.graphs
                and all(s.params.greedy and s.num_output_tokens >= s.params.min_tokens for s in seqs))

    def run(self, features: torch.Tensor, k: int) -> torch.Tensor:
        """[n, k] greedy draft ids of ``features`` [n, hidden], valid until the next replay."""
        n = features.shape[0]
        b = self.bucket_of[n]
        self.features[:n].copy_(features)
        self.graphs[b, k].replay()
        return self.ids[b, k][:n]

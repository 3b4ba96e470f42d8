"""A draft vocabulary: the drafter's LM head restricted to the N most frequent tokens (FR-Spec,
Zhao et al. 2025; EAGLE-3's draft vocabulary).

A small drafter of a large-vocabulary target spends most of a draft step in its LM head: SmolLM2's
is 49,152 x 576, two thirds of a 4-layer drafter's weights. With ``speculative_config``'s
``draft_vocab_size`` N the draft model's head keeps only the rows of N token ids (the N most
frequent, counted in a token-frequency file beside the drafter, plus every special token), so a
draft step reads N rows instead of the vocabulary's.

The head still returns logits over the whole vocabulary, fp32, -inf outside the subset: a gather
and a select after the N-row matmul (one launch more than the full head's matmul and fp32 cast;
the caller's cast is then a no-op). So every consumer of draft logits stays as it is and exact:
the greedy advance of the multi-step graphs and ``sample_draft``'s argmax give vocabulary ids (the
argmax over the subset), and the draft distribution q is the softmax over the subset, zero outside
it, the q the rejection sampler reads (residual max(0, p - q)). The target verifies every draft
token, so output is unchanged: greedy equals decoding without speculation, sampling follows the
target's distribution; only the acceptance rate depends on the subset, capped by how often the
target's token falls inside it.

The frequency file (FREQUENCY_FILE, tab-separated ``token_id count`` lines, any order) is written by
``write_token_frequencies`` from counts of a corpus in the drafter's tokenizer (e.g.
experiments/draft_vocab.py); it is read and checked at engine construction, before either model is
built. A tied input embedding stays whole: only the head is gathered.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.quantized import CompressedLinear
from engine.spec_decode.config import SPECIAL_TOKEN_ATTRS, SpeculativeConfig, SpeculativeConfigError

FREQUENCY_FILE = "token_frequencies.tsv"  # beside the draft model's config.json
KEY = "draft_vocab_size"


# -- the frequency file --------------------------------------------------------------------------------
def count_tokens(token_ids: Iterable[Iterable[int]], vocab_size: int) -> torch.Tensor:
    """[vocab_size] int64 occurrence counts of the ids in ``token_ids`` (e.g. tokenized documents)."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for ids in token_ids:
        t = torch.as_tensor(list(ids), dtype=torch.int64)
        if t.numel():
            if int(t.min()) < 0 or int(t.max()) >= vocab_size:
                raise ValueError(f"token ids must lie in [0, {vocab_size}), got {int(t.min())}..{int(t.max())}")
            counts += torch.bincount(t, minlength=vocab_size)
    return counts


def write_token_frequencies(path: str, counts: torch.Tensor) -> int:
    """Write the ids with a count > 0 as ``id<TAB>count`` lines, most frequent first; refuses to
    overwrite an existing file. Returns the number of ids written."""
    order = ranked_ids(counts)
    order = order[counts[order] > 0]
    with open(path, "x", encoding="utf-8") as f:
        f.writelines(f"{i}\t{c}\n" for i, c in zip(order.tolist(), counts[order].tolist()))
    return len(order)


def ranked_ids(counts: torch.Tensor) -> torch.Tensor:
    """Token ids by count, descending; equal counts by id (a stable order for any file order)."""
    return torch.argsort(-counts, stable=True)


def read_token_frequencies(path: str, vocab_size: int) -> torch.Tensor:
    """[vocab_size] int64 counts from a frequency file (ids absent from it count 0), or
    SpeculativeConfigError naming draft_vocab_size and the file's line for a malformed one."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    seen: set[int] = set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                token, count = int(parts[0]), int(parts[1]) if len(parts) == 2 else -1
            except ValueError:
                count = -1
            if count < 0:
                raise SpeculativeConfigError(KEY, f"{path}:{n}: expected 'token_id count' (two integers, count >= 0), "
                                                  f"got {line.strip()!r}")
            if not 0 <= token < vocab_size:
                raise SpeculativeConfigError(KEY, f"{path}:{n}: token id {token} is outside the vocabulary "
                                                  f"[0, {vocab_size})")
            if token in seen:
                raise SpeculativeConfigError(KEY, f"{path}:{n}: token id {token} is listed twice")
            seen.add(token)
            counts[token] = count
    return counts


# -- the subset --------------------------------------------------------------------------------------
def special_token_ids(hf_config: Any, tokenizer: Any, eos_token_ids: Iterable[int], vocab_size: int) -> list[int]:
    """Every id a draft must be able to propose whatever the corpus says: the engine's stop (EOS)
    ids, the config's bos/eos/pad/unk ids and the tokenizer's special tokens, below vocab_size."""
    ids: set[Any] = set(eos_token_ids)
    for attr in SPECIAL_TOKEN_ATTRS:
        value = getattr(hf_config, attr, None)
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    ids.update(getattr(tokenizer, "all_special_ids", None) or [])
    return sorted(i for i in ids if isinstance(i, int) and 0 <= i < vocab_size)


def select_subset(counts: torch.Tensor, size: int, special_ids: list[int]) -> torch.Tensor:
    """Sorted int64 ids: ``special_ids`` and the most frequent other ids, ``size`` in all; only ids
    with a count > 0 are taken (SpeculativeConfigError when too few have one)."""
    vocab = counts.shape[0]
    if size > vocab:
        raise SpeculativeConfigError(KEY, f"{size} exceeds the vocabulary's {vocab} tokens")
    if size <= len(special_ids):
        raise SpeculativeConfigError(KEY, f"{size} does not leave room past the {len(special_ids)} special tokens "
                                          f"every draft vocabulary holds ({special_ids[:8]}...)")
    is_special = torch.zeros(vocab, dtype=torch.bool)
    is_special[special_ids] = True
    order = ranked_ids(counts)
    order = order[~is_special[order] & (counts[order] > 0)]
    want = size - len(special_ids)
    if len(order) < want:
        raise SpeculativeConfigError(KEY, f"{size} needs {want} counted non-special tokens, but only {len(order)} "
                                          f"have a count > 0 in the frequency file")
    return torch.cat([torch.tensor(special_ids, dtype=torch.int64), order[:want]]).sort().values


def draft_vocab_ids(spec: SpeculativeConfig, hf_config: Any, tokenizer: Any,
                    eos_token_ids: Iterable[int]) -> torch.Tensor | None:
    """The draft model's head rows for ``spec.draft_vocab_size`` (None: the whole vocabulary, also
    for a size equal to it), from the drafter's FREQUENCY_FILE; every problem is a
    SpeculativeConfigError naming draft_vocab_size."""
    size = spec.draft_vocab_size
    if size is None or spec.model is None:
        return None
    vocab = int(hf_config.vocab_size)
    if size == vocab:
        return None
    path = os.path.join(spec.model, FREQUENCY_FILE)
    if not os.path.isfile(path):
        raise SpeculativeConfigError(KEY, f"{path} does not exist: the draft vocabulary is the most frequent tokens "
                                          f"counted there (write it with experiments/draft_vocab.py counts, or "
                                          f"engine.spec_decode.draft_vocab.write_token_frequencies)")
    counts = read_token_frequencies(path, vocab)
    return select_subset(counts, size, special_token_ids(hf_config, tokenizer, eos_token_ids, vocab))


# -- the head -----------------------------------------------------------------------------------------
class SubsetLMHead(nn.Module):
    """An LM head computing the logits of ``token_ids`` only: fp32 [n, vocab_size], -inf elsewhere."""

    def __init__(self, weight: torch.Tensor, token_ids: torch.Tensor, vocab_size: int) -> None:
        """``weight``: the full head's dense [vocab_size, hidden] weight (only its subset rows are kept)."""
        super().__init__()
        ids = token_ids.to(weight.device, torch.int64)
        self.vocab_size, self.num_tokens = vocab_size, len(ids)
        self.weight = nn.Parameter(weight.index_select(0, ids).contiguous(), requires_grad=False)
        self.register_buffer("token_ids", ids)
        column = torch.zeros(vocab_size, dtype=torch.int64, device=ids.device)
        column[ids] = torch.arange(len(ids), device=ids.device)
        self.register_buffer("column", column)  # vocabulary id -> its logit's column (0 outside: masked)
        inside = torch.zeros(vocab_size, dtype=torch.bool, device=ids.device)
        inside[ids] = True
        self.register_buffer("inside", inside)
        outside = torch.full((vocab_size,), float("-inf"), dtype=torch.float32, device=ids.device)
        self.register_buffer("outside", outside)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.weight)  # [n, N]
        # An fp32 "outside" promotes the select to fp32: the fp32 cast every caller makes costs nothing.
        return torch.where(self.inside, logits.index_select(-1, self.column), self.outside)

    def extra_repr(self) -> str:
        return f"tokens={self.num_tokens}, vocab_size={self.vocab_size}, hidden={self.weight.shape[1]}"


def restrict_lm_head(model: nn.Module, token_ids: torch.Tensor) -> SubsetLMHead:
    """Replace ``model.lm_head`` (one rank; dense or compressed) by its SubsetLMHead, before any
    graph is captured. A tied embedding keeps its full table."""
    head = model.lm_head
    if getattr(head, "tp_size", 1) != 1:
        raise ValueError("a draft vocabulary needs the whole LM head on one rank")
    embed = model.model.embed_tokens.weight
    weight = head.dequantized().to(embed.dtype) if isinstance(head, CompressedLinear) else head.weight
    vocab = int(model.config.vocab_size)
    if weight.shape[0] != vocab or token_ids.numel() == 0 or int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab:
        raise ValueError(f"draft vocabulary ids must lie in [0, {vocab}) of a head of {tuple(weight.shape)}")
    with torch.no_grad():
        model.lm_head = SubsetLMHead(weight.detach(), token_ids, vocab)
    return model.lm_head

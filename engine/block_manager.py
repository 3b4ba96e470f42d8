"""Paged KV cache bookkeeping: fixed-size blocks, per-sequence block tables, ref counts, and
prefix caching by hashing full blocks.

A block's hash covers its tokens and the hash of the block before it, so equal hashes mean equal
prefixes. A hash is registered only once the block's K/V has been computed (``mark_computed``):
with chunked prefill a block can be allocated steps before it is filled, and a second sequence
must never skip computing tokens that nobody wrote yet.

Prompt logprobs: a full block computed by a request with prompt logprobs also keeps that request's
entries for its positions (cached_logprobs.py), and the model runner keeps the final hidden state at
its last position (ModelRunner.block_hidden), from which a later request computes the entry of the
position after the block. A prompt-logprob request asking for top-n hits only leading blocks that
hold entries with at least that top-n (blocks cached by other requests hold none): it takes their
entries, and its first computed position's entry comes from the last hit's hidden state, so its
output is what recomputing the whole prompt gives (to the last bits that fp32 arithmetic changes with
a step's shapes, as any recompute does). A block whose content is overwritten drops them.
Cost: the entries take about block_size * (8 * top_n + 8) bytes of host memory per block that a
prompt-logprob request computed; the hidden states hidden_size * dtype bytes of device memory per
block of the pool (counted when the pool is sized; about 0.3% of a block's K/V for SmolLM2-135M).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict

from engine.cached_logprobs import CachedLogprobs
from engine.sequence import Sequence


def block_hash(prev: bytes, tokens: list[int]) -> bytes:
    h = hashlib.blake2b(prev, digest_size=16)
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return h.digest()


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "logprobs")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None
        self.logprobs: CachedLogprobs | None = None  # its prompt logprobs, with a hash only

    def forget(self) -> None:
        self.hash = None
        self.logprobs = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 keep_prompt_logprobs: bool = True) -> None:
        """keep_prompt_logprobs False: no block keeps prompt logprobs, so a prompt-logprob request
        hits only blocks whose entries it has (batch-invariant mode: its pseudo-row prefill keeps
        no hidden states for the position after a block)."""
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.keep_prompt_logprobs = keep_prompt_logprobs
        self.num_blocks = num_blocks
        # Blocks are made on first use: a small model's pool on a large GPU holds tens of millions of
        # blocks, and making them all up front took minutes of host time and gigabytes of host memory
        # (a 2-layer test model on an H200: ~30M blocks). The blocks not made yet are the free ones
        # that never held anything; they come first in the LRU order below, as they would in a list
        # made up front, so a block with cached content is reused only once none is left.
        self.blocks: list[Block] = []
        # Free blocks that were used, in LRU order: freed blocks go to the end, so cached content lives longest.
        self.free: OrderedDict[int, None] = OrderedDict()
        self.hash_to_block: dict[bytes, int] = {}
        # Per sequence: hash of each of its full, computed blocks (the chain for the next one).
        self.seq_hashes: dict[int, list[bytes]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free) + self.num_blocks - len(self.blocks)

    # -- prefix cache lookup -------------------------------------------------------------
    def _cache_hits(self, seq: Sequence) -> list[int]:
        """Block ids that hold this sequence's leading full blocks. The last token is never taken
        from the cache: the step that admits a sequence must compute at least one token. With
        prompt logprobs, a block whose positions (or the one after it) still lack an entry is a hit
        only if it holds entries of at least the top-n asked for."""
        if not self.enable_prefix_caching:
            return []
        top_n = seq.params.prompt_logprobs
        hits: list[int] = []
        prev = b""
        for i in range((seq.num_tokens - 1) // self.block_size):
            tokens = seq.block_tokens(i, self.block_size)
            h = block_hash(prev, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None:
                break
            if top_n is not None and self._needs_logprobs(seq, i):
                stored = self.blocks[block_id].logprobs
                if stored is None or stored.top_n < top_n:
                    break
            hits.append(block_id)
            prev = h
        return hits

    def _needs_logprobs(self, seq: Sequence, i: int) -> bool:
        """Whether ``seq`` still lacks the prompt-logprob entry of a position of block ``i`` or of the
        position after it (a recompute after preemption keeps those it has)."""
        return len(seq.prompt_logprobs) <= min((i + 1) * self.block_size, seq.num_prompt_tokens - 1)

    # -- allocation ------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._cache_hits(seq)
        # A hit on a free block still takes it out of the free list.
        need = seq.num_blocks(self.block_size) - sum(1 for b in hits if self.blocks[b].ref_count > 0)
        return need <= self.num_free_blocks

    def _take_free(self) -> int:
        if len(self.blocks) < self.num_blocks:  # one never used: nothing cached in it to lose
            block = Block(len(self.blocks))
            self.blocks.append(block)
            block.ref_count = 1
            return block.block_id
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # its old content is overwritten: forget it
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.forget()
        block.ref_count = 1
        return block_id

    def allocate(self, seq: Sequence) -> None:
        """Give ``seq`` blocks for all its tokens, reusing cached leading blocks."""
        assert not seq.block_table
        hits = self._cache_hits(seq)
        hashes: list[bytes] = []
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            assert block.hash is not None
            hashes.append(block.hash)
        for _ in range(seq.num_blocks(self.block_size) - len(hits)):
            seq.block_table.append(self._take_free())
        self.seq_hashes[seq.seq_id] = hashes
        if seq.params.prompt_logprobs is not None:
            self._take_logprobs(seq, hits)
        seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_computed_tokens = seq.num_cached_tokens
        # A hit is the target's K/V; whether a draft ever wrote those blocks is unknown: it recomputes.
        seq.draft_computed = 0

    def _take_logprobs(self, seq: Sequence, hits: list[int]) -> None:
        """The entries of the hit blocks' prompt positions that ``seq`` lacks, trimmed to its top-n.
        (The next position's comes from the last hit's hidden state, in the model runner.)"""
        bs, top_n = self.block_size, seq.params.prompt_logprobs
        for i, block_id in enumerate(hits):
            if not self._needs_logprobs(seq, i):
                continue
            stored = self.blocks[block_id].logprobs
            assert stored is not None and len(seq.prompt_logprobs) >= i * bs  # _cache_hits checked
            entries = stored.entries(seq.block_tokens(i, bs), top_n)
            # A recompute's hit may pass its prompt (its generated tokens were another one's prompt).
            seq.prompt_logprobs.extend(entries[len(seq.prompt_logprobs) - i * bs : seq.num_prompt_tokens - i * bs])

    def deallocate(self, seq: Sequence) -> None:
        # Reverse order: a sequence's last blocks are the least likely to be shared, so they are
        # reused first and the shared prefix survives longer.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table.clear()
        self.seq_hashes.pop(seq.seq_id, None)
        seq.num_computed_tokens = 0  # num_cached_tokens stays: the output reports it
        seq.draft_computed = 0

    def blocks_to_append(self, seq: Sequence, num_slots: int = 1) -> int:
        """New blocks ``seq`` needs for the K/V of its next ``num_slots`` decode inputs: its last
        token and the num_slots - 1 tokens a multi-step decode feeds back after it."""
        num_tokens = len(seq.token_ids) + num_slots - 1
        return max(0, (num_tokens + self.block_size - 1) // self.block_size - len(seq.block_table))

    def can_append(self, seq: Sequence, num_slots: int = 1) -> bool:
        """Room for the sequence's last token (the one the next decode step computes), and with
        num_slots > 1 for the tokens of the decode steps after it."""
        return self.blocks_to_append(seq, num_slots) <= self.num_free_blocks

    def reserve(self, seqs: list[Sequence], num_slots: list[int]) -> bool:
        """Blocks for each sequence's next ``num_slots[i]`` decode inputs (see blocks_to_append), for
        all of them or, when the pool cannot hold them all, for none: returns whether it did."""
        need = [self.blocks_to_append(seq, n) for seq, n in zip(seqs, num_slots)]
        if sum(need) > self.num_free_blocks:
            return False
        for seq, n in zip(seqs, need):
            self._grow(seq, n)
        return True

    def may_append(self, seq: Sequence, num_slots: int = 1) -> None:
        # A multi-step decode may leave a finished sequence with a block past its last token; it
        # is freed with the sequence, and hashes only ever cover computed tokens (mark_computed).
        self._grow(seq, self.blocks_to_append(seq, num_slots))

    def _grow(self, seq: Sequence, blocks: int) -> None:
        for _ in range(blocks):
            seq.block_table.append(self._take_free())

    def release_unused(self, seq: Sequence) -> None:
        """Give back blocks past those the sequence's tokens need: blocks reserved for a step's
        tokens that it did not keep. They hold no computed token it keeps, so no hash."""
        keep = seq.num_blocks(self.block_size)
        while len(seq.block_table) > keep:
            block = self.blocks[seq.block_table.pop()]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block.block_id] = None

    def reset_prefix_cache(self) -> None:
        """Forget every cached block's content (the model's weights changed: its K/V is stale)."""
        self.hash_to_block.clear()
        self.seq_hashes.clear()
        for block in self.blocks:
            block.forget()

    # -- prefix cache registration -----------------------------------------------------------
    def mark_computed(self, seq: Sequence) -> None:
        """Register hashes of blocks that became full and computed since the last call; a block of
        prompt tokens that a prompt-logprob request computed keeps their entries (the model
        runner kept the hidden state at its last position)."""
        if not self.enable_prefix_caching:
            return
        hashes = self.seq_hashes.setdefault(seq.seq_id, [])
        full = seq.num_computed_tokens // self.block_size
        while len(hashes) < full:
            i = len(hashes)
            h = block_hash(hashes[-1] if hashes else b"", seq.block_tokens(i, self.block_size))
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash = h
                block.logprobs = self._logprobs_to_keep(seq, i)
                # Keep an existing mapping: another block with the same content stays the canonical
                # one, unless this one holds prompt logprobs of a larger top-n.
                canonical = self.hash_to_block.setdefault(h, block.block_id)
                if block.logprobs is not None and _top_n(self.blocks[canonical]) < block.logprobs.top_n:
                    self.hash_to_block[h] = block.block_id
            hashes.append(h)

    def mark_computed_many(self, seqs: list[Sequence]) -> None:
        """``mark_computed`` of each sequence that has a newly full computed block: a decode step
        fills a block every block_size tokens, so most rows cost a lookup and a comparison."""
        if not self.enable_prefix_caching:
            return
        seq_hashes, bs = self.seq_hashes, self.block_size
        for seq in [s for s in seqs if (h := seq_hashes.get(s.seq_id)) is None or len(h) < s.num_computed_tokens // bs]:
            self.mark_computed(seq)

    def _logprobs_to_keep(self, seq: Sequence, i: int) -> CachedLogprobs | None:
        bs, end = self.block_size, (i + 1) * self.block_size
        if not self.keep_prompt_logprobs or seq.params.prompt_logprobs is None or end > seq.num_prompt_tokens or \
                len(seq.prompt_logprobs) < end:
            return None
        return CachedLogprobs(seq.prompt_logprobs[i * bs : end], seq.block_tokens(i, bs), seq.params.prompt_logprobs)


def _top_n(block: Block) -> int:
    return -1 if block.logprobs is None else block.logprobs.top_n

"""BlockManager: allocation, ref counts, prefix caching by block hash."""

from __future__ import annotations

import torch

from engine.block_manager import BlockManager
from engine.layers.sampler import token_logprobs
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def seq(tokens: list[int], **params) -> Sequence:
    return Sequence(tokens, SamplingParams(**params))


def compute_all(bm: BlockManager, s: Sequence) -> None:
    s.num_computed_tokens = s.num_tokens
    bm.mark_computed(s)


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(10, 4)
    a, b = seq(list(range(9))), seq(list(range(100, 104)))
    bm.allocate(a)
    bm.allocate(b)
    assert len(a.block_table) == 3 and len(b.block_table) == 1
    assert len(set(a.block_table) | set(b.block_table)) == 4
    assert bm.num_free_blocks == 6
    bm.deallocate(a)
    bm.deallocate(b)
    assert bm.num_free_blocks == 10 and a.block_table == []


def test_a_pool_of_a_billion_blocks_costs_only_the_blocks_used():
    # A 2-layer test model's pool on an H200 held ~30M blocks, and making a Block for each up front took
    # minutes (the twenty-sixth session's GPU tests spent 406 s on three engines). The pool makes them on use.
    bm = BlockManager(10**9, 4)
    a = seq(list(range(9)))
    bm.allocate(a)
    assert a.block_table == [0, 1, 2] and len(bm.blocks) == 3 and bm.num_free_blocks == 10**9 - 3
    bm.deallocate(a)
    assert bm.num_free_blocks == bm.num_blocks


def test_never_used_blocks_are_taken_before_cached_ones_in_lru_order():
    # The order a list of every block made up front gives: unused blocks first (0, 1, ...), then the
    # freed ones, least recently freed first, so cached content lives as long as it can.
    bm = BlockManager(4, 4)
    a, b = seq(list(range(5))), seq(list(range(50, 54)))
    bm.allocate(a)  # blocks 0, 1
    compute_all(bm, a)
    bm.deallocate(a)  # freed in reverse: 1 then 0
    bm.allocate(b)
    assert b.block_table == [2]  # a never-used block, not a's cached ones
    c = seq(list(range(100, 109)))
    bm.allocate(c)
    assert c.block_table == [3, 1, 0]
    assert bm.num_free_blocks == 0 and not bm.can_allocate(seq([7]))


def test_shared_prefix_reuses_blocks_and_counts_refs():
    bm = BlockManager(10, 4)
    a = seq(list(range(10)))  # blocks [0..3] [4..7] [8, 9]
    bm.allocate(a)
    compute_all(bm, a)
    b = seq(list(range(8)) + [50, 51, 52])
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]  # two full shared blocks
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 8
    assert b.block_table[2] not in a.block_table
    assert bm.blocks[a.block_table[0]].ref_count == 2
    bm.deallocate(a)
    assert bm.blocks[b.block_table[0]].ref_count == 1
    assert a.block_table == [] and bm.num_free_blocks == 10 - 3  # b holds 3 blocks


def test_uncomputed_blocks_are_never_hits():
    # A block allocated but not yet computed (chunked prefill) must not be reused.
    bm = BlockManager(10, 4)
    a = seq(list(range(12)))
    bm.allocate(a)
    a.num_computed_tokens = 4  # only the first block has been computed
    bm.mark_computed(a)
    b = seq(list(range(12)) + [1])
    bm.allocate(b)
    assert b.num_cached_tokens == 4 and b.block_table[0] == a.block_table[0]
    assert b.block_table[1] != a.block_table[1]


def test_prefix_is_matched_by_whole_chain_not_block_content():
    bm = BlockManager(10, 4)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(a)
    compute_all(bm, a)
    # Same second block, different first block: no hit at all.
    b = seq([9, 9, 9, 9, 5, 6, 7, 8, 1])
    bm.allocate(b)
    assert b.num_cached_tokens == 0


def test_last_token_is_always_computed():
    bm = BlockManager(10, 4)
    a = seq(list(range(8)))
    bm.allocate(a)
    compute_all(bm, a)
    same = seq(list(range(8)))  # fully cached prompt: its last block is recomputed
    bm.allocate(same)
    assert same.num_cached_tokens == 4
    assert same.num_computed_tokens < same.num_tokens


def test_freed_cached_blocks_are_hits_until_reused():
    bm = BlockManager(3, 4)
    a = seq(list(range(9)))
    bm.allocate(a)
    compute_all(bm, a)
    bm.deallocate(a)
    b = seq(list(range(8)) + [7])
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.num_cached_tokens == 8  # served from free-but-cached blocks
    bm.deallocate(b)
    c = seq([200 + i for i in range(12)])  # needs all 3 blocks: old contents are evicted
    bm.allocate(c)
    compute_all(bm, c)
    bm.deallocate(c)
    d = seq(list(range(8)) + [7])
    bm.allocate(d)
    assert d.num_cached_tokens == 0


def test_can_append_and_may_append_grow_the_table():
    bm = BlockManager(2, 4)
    a = seq(list(range(4)))
    bm.allocate(a)
    a.append_token(5)  # 5 tokens need 2 blocks
    assert bm.can_append(a)
    bm.may_append(a)
    assert len(a.block_table) == 2 and bm.num_free_blocks == 0
    a.token_ids += [1, 2, 3, 4]  # 9 tokens: a third block does not exist
    assert not bm.can_append(a)


def test_prompt_logprobs_requests_skip_blocks_cached_without_logprobs():
    bm = BlockManager(10, 4)
    a = seq(list(range(9)))
    bm.allocate(a)
    compute_all(bm, a)
    b = seq(list(range(9)), prompt_logprobs=1)
    bm.allocate(b)
    assert b.num_cached_tokens == 0


def test_release_unused_gives_back_blocks_past_the_tokens_but_not_shared_ones():
    bm = BlockManager(10, 4)
    a = seq(list(range(5)))  # 2 blocks
    bm.allocate(a)
    bm.may_append(a, 8)  # room for 8 decode inputs: tokens up to 12 -> 3 blocks
    assert len(a.block_table) == 3 and bm.num_free_blocks == 7
    a.append_token(9)  # one token kept of a step that reserved more
    bm.release_unused(a)
    assert len(a.block_table) == 2 and bm.num_free_blocks == 8
    bm.release_unused(a)  # nothing more to give back
    assert len(a.block_table) == 2 and bm.num_free_blocks == 8
    bm.deallocate(a)
    assert bm.num_free_blocks == 10


VOCAB = 16


def _rows(tokens: list[int]) -> torch.Tensor:
    """Log-softmax rows standing in for the model's at each position (a function of the prefix)."""
    g = torch.Generator().manual_seed(sum(t * 31 ** i for i, t in enumerate(tokens)) % (1 << 31))
    return torch.log_softmax(torch.randn(VOCAB, generator=g), -1)


def compute_with_logprobs(bm: BlockManager, s: Sequence) -> None:
    """What the sampler records for the prompt positions ``s`` computes, then mark_computed."""
    top_n = s.params.prompt_logprobs
    if not s.prompt_logprobs:
        s.prompt_logprobs.append(None)
    for p in range(len(s.prompt_logprobs), s.num_prompt_tokens):
        s.prompt_logprobs.append(token_logprobs(_rows(s.token_ids[:p]), s.token_ids[p], top_n))
    compute_all(bm, s)


def test_prompt_logprobs_blocks_keep_their_entries_and_hits_take_them_trimmed():
    bm = BlockManager(10, 4)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], prompt_logprobs=3)
    bm.allocate(a)
    compute_with_logprobs(bm, a)
    assert [bm.blocks[b].logprobs is not None for b in a.block_table] == [True, True, False]  # full prompt blocks
    for n in (3, 1, 0):
        b = seq([1, 2, 3, 4, 5, 6, 7, 8, 11, 11], prompt_logprobs=n)
        bm.allocate(b)
        assert b.num_cached_tokens == 8 and len(b.prompt_logprobs) == 8  # the 9th comes from the runner
        want = [None] + [token_logprobs(_rows(b.token_ids[:p]), b.token_ids[p], n) for p in range(1, 8)]
        assert b.prompt_logprobs == want and [list(e) for e in b.prompt_logprobs[1:]] == [list(e) for e in want[1:]]
        bm.deallocate(b)
    more = seq([1, 2, 3, 4, 5, 6, 7, 8, 11], prompt_logprobs=4)
    bm.allocate(more)
    assert more.num_cached_tokens == 0 and more.prompt_logprobs == []


def test_prompt_logprobs_hits_stop_at_the_first_block_without_entries():
    bm = BlockManager(10, 4)
    a = seq(list(range(6)), prompt_logprobs=1)  # one full prompt block: entries
    bm.allocate(a)
    compute_with_logprobs(bm, a)
    a.token_ids += [6, 7, 8]  # generated: its second block holds no prompt logprobs
    compute_all(bm, a)
    b = seq(list(range(9)) + [1], prompt_logprobs=1)
    bm.allocate(b)
    assert b.num_cached_tokens == 4
    plain = seq(list(range(9)) + [1])
    bm.allocate(plain)
    assert plain.num_cached_tokens == 8


def test_a_recompute_hits_blocks_whose_entries_it_already_has():
    bm = BlockManager(10, 4)
    a = seq(list(range(9)))  # cached without logprobs
    bm.allocate(a)
    compute_all(bm, a)
    b = seq(list(range(9)), prompt_logprobs=0)
    b.prompt_logprobs = [None] + [{t: None} for t in range(1, 9)]  # all recorded before a preemption
    bm.allocate(b)
    assert b.num_cached_tokens == 8 and len(b.prompt_logprobs) == 9


def test_overwritten_and_reset_blocks_drop_their_prompt_logprobs():
    bm = BlockManager(3, 4)
    a = seq(list(range(9)), prompt_logprobs=1)
    bm.allocate(a)
    compute_with_logprobs(bm, a)
    kept = [bm.blocks[b] for b in a.block_table[:2]]
    bm.deallocate(a)
    c = seq([100 + i for i in range(12)])  # takes every block
    bm.allocate(c)
    assert all(block.logprobs is None for block in kept)
    bm.deallocate(c)
    a2 = seq(list(range(9)), prompt_logprobs=1)
    bm.allocate(a2)
    compute_with_logprobs(bm, a2)
    bm.reset_prefix_cache()
    assert all(bm.blocks[b].logprobs is None for b in a2.block_table)


def test_a_block_with_entries_becomes_the_canonical_one_for_its_hash():
    bm = BlockManager(10, 4)
    plain = seq(list(range(9)))
    bm.allocate(plain)
    compute_all(bm, plain)
    a = seq(list(range(9)), prompt_logprobs=2)  # no hit: recomputes the same blocks with entries
    bm.allocate(a)
    assert a.num_cached_tokens == 0
    compute_with_logprobs(bm, a)
    b = seq(list(range(9)), prompt_logprobs=2)
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_cached_tokens == 8
    assert bm.hash_to_block[bm.blocks[a.block_table[0]].hash] == a.block_table[0]
    assert bm.blocks[plain.block_table[0]].logprobs is None  # the plain copy is still a plain request's hit
    d = seq(list(range(9)))
    bm.allocate(d)
    assert d.num_cached_tokens == 8


def test_a_recompute_takes_entries_of_its_prompt_positions_only():
    # A sequence preempted with prompt entries still missing, whose generated tokens are a longer
    # request's prompt: the hit blocks pass its prompt.
    bm = BlockManager(10, 4)
    long = seq(list(range(13)), prompt_logprobs=1)
    bm.allocate(long)
    compute_with_logprobs(bm, long)
    short = seq(list(range(6)), prompt_logprobs=1)
    short.token_ids += [6, 7, 8, 9, 10]  # generated before a preemption, before its entries of 3..5
    short.prompt_logprobs = long.prompt_logprobs[:3]
    bm.allocate(short)
    assert short.num_cached_tokens == 8
    assert short.prompt_logprobs == long.prompt_logprobs[:6]  # up to its prompt's end, no further


def test_mark_computed_many_registers_what_mark_computed_does_for_each():
    """A decode step marks its sequences at once: those with a newly full computed block register its
    hash (also one whose hashes were forgotten by reset_prefix_cache), the others register nothing."""
    def run(batched: bool) -> tuple[dict, list]:
        bm = BlockManager(40, 4)
        seqs = [seq(list(range(100 * k, 100 * k + n))) for k, n in enumerate((5, 8, 11, 3))]
        for s in seqs:
            bm.allocate(s)
            s.num_computed_tokens = s.num_tokens - 1
        mark = (lambda: bm.mark_computed_many(seqs)) if batched else (lambda: [bm.mark_computed(s) for s in seqs])
        mark()
        bm.reset_prefix_cache()
        for s in seqs:
            s.append_token(7)
            s.num_computed_tokens += 1
            bm.may_append(s)
        mark()
        return dict(bm.hash_to_block), [bm.seq_hashes.get(s.seq_id) for s in seqs]

    assert run(batched=True) == run(batched=False)
    hashes, per_seq = run(batched=True)
    assert [len(h) for h in per_seq] == [1, 2, 2, 0] and len(hashes) == 5

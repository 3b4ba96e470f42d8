"""BlockManager: allocation, ref counts, prefix caching by block hash."""

from __future__ import annotations

from engine.block_manager import BlockManager
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


def test_prompt_logprobs_requests_skip_the_cache():
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

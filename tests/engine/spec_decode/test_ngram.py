"""Prompt-lookup drafting: longest n first, the most recent occurrence, k and context limits."""

from __future__ import annotations

import time

import numpy as np
import pytest

from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.spec_decode.ngram import NgramProposer, ngram_proposal


def propose(tokens: list[int], lo: int, hi: int, k: int) -> list[int]:
    return ngram_proposal(np.array(tokens, dtype=np.int64), lo, hi, k).tolist()


def brute_force(tokens: list[int], lo: int, hi: int, k: int) -> list[int]:
    """The definition, spelled out: n from hi down to lo, latest earlier occurrence of the last n."""
    L = len(tokens)
    for n in range(hi, lo - 1, -1):
        if L < n + 1:
            continue
        suffix = tokens[L - n :]
        for start in range(L - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


def test_no_match_proposes_nothing():
    assert propose([1, 2, 3, 4, 5], 1, 3, 4) == []
    assert propose([7], 1, 3, 4) == []  # nothing before the last token
    assert propose([1, 2, 1, 2], 3, 3, 4) == []  # only a 2-gram repeats, and min is 3


def test_longest_n_wins_over_a_later_shorter_match():
    # last 3 = [1, 2, 3] occurs at 0; the 2-gram [2, 3] also occurs later at 6 (followed by 9).
    tokens = [1, 2, 3, 7, 8, 0, 2, 3, 9, 1, 2, 3]
    assert propose(tokens, 2, 3, 2) == [7, 8]
    assert propose(tokens, 2, 2, 2) == [9, 1]  # with max 2, the latest 2-gram wins


def test_the_latest_of_several_occurrences_wins():
    tokens = [5, 6, 1, 5, 6, 2, 5, 6, 3, 5, 6]
    assert propose(tokens, 2, 2, 1) == [3]


def test_k_limits_the_proposal_and_the_context_end_cuts_it():
    tokens = [1, 2, 10, 11, 12, 13, 14, 1, 2]
    assert propose(tokens, 2, 2, 3) == [10, 11, 12]
    assert propose(tokens, 2, 2, 10) == [10, 11, 12, 13, 14, 1, 2]  # everything up to the end
    assert propose(tokens, 2, 2, 0) == []


def test_an_occurrence_overlapping_the_suffix_proposes_what_is_left():
    # [4, 4] ending at index 2 (the latest earlier one) overlaps the suffix [4, 4] at 2-3.
    assert propose([9, 4, 4, 4], 2, 2, 5) == [4]
    # a b a b a b: the latest earlier "a b" is at 2-3, followed by the suffix itself.
    assert propose([1, 2, 1, 2, 1, 2], 2, 2, 5) == [1, 2]


@pytest.mark.parametrize("seed", range(20))
def test_matches_the_definition_on_random_small_alphabets(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 3 + seed % 4, size=int(rng.integers(1, 60))).tolist()
    lo = int(rng.integers(1, 4))
    hi = lo + int(rng.integers(0, 3))
    k = int(rng.integers(1, 6))
    assert propose(tokens, lo, hi, k) == brute_force(tokens, lo, hi, k)


def test_long_context_is_fast():
    """100k tokens, a frequent last token: one vectorised pass, well under the time of a decode step's
    host work budget on this shared CPU (a loose bound: 50 ms)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, size=100_000)
    tokens[-4:] = tokens[1000:1004]
    ngram_proposal(tokens, 1, 4, 8)
    start = time.perf_counter()
    out = ngram_proposal(tokens, 1, 4, 8)
    assert time.perf_counter() - start < 0.05
    assert len(out) == 8


def test_proposer_per_sequence_k_and_no_probs():
    seqs = [Sequence([1, 2, 3, 1, 2], SamplingParams()), Sequence([4, 5, 6], SamplingParams()),
            Sequence([7, 8, 9, 7, 8], SamplingParams())]
    proposer = NgramProposer(prompt_lookup_min=1, prompt_lookup_max=3)
    out = proposer.propose(seqs, [2, 2, 1])
    assert out.token_ids == [[3, 1], [], [9]]
    assert out.probs is None and not proposer.has_probs
    assert proposer.propose(seqs, 4).token_ids[0] == [3, 1, 2]
    with pytest.raises(ValueError, match="draft lengths"):
        proposer.propose(seqs, [1, 2])
    with pytest.raises(ValueError, match="prompt_lookup"):
        NgramProposer(3, 2)


def test_proposer_follows_growing_sequences_and_forgets_finished_ones():
    rng = np.random.default_rng(1)
    seqs = [Sequence(rng.integers(0, 4, 30).tolist(), SamplingParams()) for _ in range(3)]
    proposer = NgramProposer(1, 3)
    for step in range(40):
        for seq in seqs:
            seq.token_ids.extend(rng.integers(0, 4, int(rng.integers(1, 6))).tolist())  # accepted runs
        got = proposer.propose(seqs, 4).token_ids
        assert got == [brute_force(seq.token_ids, 1, 3, 4) for seq in seqs], step
    assert set(proposer._tokens) == {s.seq_id for s in seqs}
    proposer.propose(seqs[:1], 4)
    assert set(proposer._tokens) == {seqs[0].seq_id}
    seqs[0].token_ids[:] = seqs[0].token_ids[:10]  # shorter than cached: converted afresh
    assert proposer.propose(seqs[:1], 4).token_ids == [brute_force(seqs[0].token_ids, 1, 3, 4)]


def test_proposer_step_cost_on_long_contexts():
    """64 sequences of 8k tokens, one new token each per step: the incremental arrays make a step
    several times cheaper than converting every token list afresh (measured side by side, so a
    busy machine slows both)."""
    rng = np.random.default_rng(2)
    seqs = [Sequence(rng.integers(0, 1000, 8192).tolist(), SamplingParams()) for _ in range(64)]
    proposer = NgramProposer(2, 4)
    proposer.propose(seqs, 4)
    incremental = fresh = 0.0
    for _ in range(5):
        for seq in seqs:
            seq.token_ids.append(int(rng.integers(0, 1000)))
        start = time.perf_counter()
        got = proposer.propose(seqs, 4).token_ids
        incremental += time.perf_counter() - start
        start = time.perf_counter()
        want = [ngram_proposal(np.asarray(s.token_ids, dtype=np.int64), 2, 4, 4).tolist() for s in seqs]
        fresh += time.perf_counter() - start
        assert got == want
    assert incremental < fresh / 3, (incremental, fresh)

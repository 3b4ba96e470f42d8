"""Acceptance counters and the per-sequence draft limit."""

from __future__ import annotations

import pytest
import torch

from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.spec_decode.metrics import PhaseClock, SpecDecodeMetrics
from engine.spec_decode.proposer import Proposal, draft_limit


def test_counters_and_rates():
    m = SpecDecodeMetrics()
    m.record([4, 4, 0], [4, 1, 0])  # step 1: one row proposed nothing
    m.record([2], [0])
    assert (m.num_drafts, m.num_proposed, m.num_accepted, m.num_emitted) == (3, 10, 5, 9)
    assert m.proposed_per_position == [3, 3, 2, 2]
    assert m.accepted_per_position == [2, 1, 1, 1]
    assert m.acceptance_rate == pytest.approx(0.5)
    assert m.mean_accepted_length == pytest.approx(1 + 5 / 3)
    assert m.acceptance_per_position == pytest.approx([2 / 3, 1 / 3, 0.5, 0.5])
    m.add_time("draft", 0.25)
    clock = PhaseClock(torch.device("cpu")).start()
    clock.mark()
    clock.mark()
    m.add_phases(clock)
    d = m.as_dict()
    assert d["draft_time_s"] >= 0.25 and d["verify_time_s"] >= 0.0 and d["num_accepted_tokens"] == 5
    assert d["draft_time_s"] == pytest.approx(0.25 + clock.seconds(0, 1))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_phase_clock_restarts_each_step_and_reuses_its_events(device):
    """One clock per worker: start() forgets the last step's marks; on a GPU the same CUDA events are
    recorded again (made once), and the phases time the work between the marks."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    clock = PhaseClock(torch.device(device))
    for _ in range(3):
        assert clock.start() is clock and len(clock.marks) == 1
        if device == "cuda":
            torch.cuda._sleep(2_000_000)  # ~1 ms of GPU time between marks 0 and 1
        clock.mark()
        clock.mark()
        assert len(clock.marks) == 3 and clock.seconds(0, 1) >= 0.0 and clock.seconds(1, 2) >= 0.0
        if device == "cuda":
            assert len(clock.events) == 3 and clock.seconds(0, 1) > 1e-4
    events = list(clock.events)
    clock.start()
    clock.mark()
    assert clock.events[:2] == events[:2]  # the same event objects, no new ones


def test_empty_metrics_and_bad_records():
    m = SpecDecodeMetrics()
    assert (m.acceptance_rate, m.mean_accepted_length, m.acceptance_per_position) == (0.0, 0.0, [])
    with pytest.raises(ValueError, match="accepted 3 of 2"):
        m.record([2], [3])
    with pytest.raises(ValueError, match="2 proposal counts but 1"):
        m.record([2, 2], [1])
    with pytest.raises(ValueError, match="phase"):
        m.add_time("prefill", 1.0)
    with pytest.raises(ValueError, match="accepted 1 of 2 proposed tokens, emitting 1"):
        m.record([2], [1], [1])
    with pytest.raises(ValueError, match="2 emitted counts but 1"):
        m.record([2], [1], [2, 2])


def test_emitted_past_the_accepted_drafts():
    """An n-gram round's verify that accepted filler past its proposal (rounds.py): the tokens count as
    emitted, not as accepted drafts; a row without a proposal is no draft."""
    m = SpecDecodeMetrics()
    m.record([0, 2, 3], [0, 2, 1], [3, 4, 2])
    assert (m.num_drafts, m.num_proposed, m.num_accepted, m.num_emitted) == (2, 5, 3, 9)
    assert m.acceptance_per_position == [1.0, 0.5, 0.0] and m.mean_accepted_length == 2.5


def test_draft_limit_keeps_emitted_tokens_within_max_tokens_and_max_model_len():
    seq = Sequence(list(range(10)), SamplingParams(max_tokens=5))
    assert draft_limit(seq, 8, max_model_len=100) == 4  # 4 drafts + 1 target token = 5 = max_tokens
    seq.token_ids.extend([1, 2, 3])  # 3 generated: 2 left
    assert draft_limit(seq, 8, max_model_len=100) == 1
    seq.token_ids.append(4)  # 1 left: a plain step
    assert draft_limit(seq, 8, max_model_len=100) == 0
    long = Sequence(list(range(95)), SamplingParams(max_tokens=50))
    assert draft_limit(long, 8, max_model_len=100) == 4  # 95 + 5 emitted = 100 tokens; last K/V at position 98
    assert draft_limit(long, 2, max_model_len=100) == 2


def test_proposal_as_tensors_pads_ragged_rows():
    ids, counts = Proposal([[5, 6], [], [7]]).as_tensors("cpu", k=3)
    assert ids.tolist() == [[5, 6, 0], [0, 0, 0], [7, 0, 0]] and counts.tolist() == [2, 0, 1]
    ids, counts = Proposal([[], []]).as_tensors("cpu")
    assert ids.shape == (2, 0) and counts.tolist() == [0, 0] and ids.dtype == torch.int64


def test_proposal_with_device_ids_hands_them_over_without_host_lists():
    ids = torch.tensor([[5, 6, 9], [7, 8, 8]])
    p = Proposal(None, ids=ids, counts=[2, 1])  # the draft ran 3 steps; row 0 keeps 2, row 1 keeps 1
    assert p.num_tokens == [2, 1] and p.host_token_ids() == [[5, 6], [7]]
    got, counts = p.as_tensors("cpu")
    assert got.tolist() == [[5, 6], [7, 8]] and counts.tolist() == [2, 1]
    for bad in (dict(token_ids=None), dict(token_ids=[[1]], ids=ids, counts=[1, 1]), dict(token_ids=None, ids=ids)):
        with pytest.raises(ValueError, match="host token_ids, or device ids"):
            Proposal(**bad)

"""engine/spec_decode/ngram_device.py: the device n-gram lookup equals ngram.ngram_proposal (the spec) row by
row, on random contexts of small alphabets (many matches, overlaps with the suffix, contexts shorter than
the n-grams), garbage past each row's length, several (min_n, max_n, k); filler past each row's count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.spec_decode.ngram import ngram_proposal
from engine.spec_decode.ngram_device import ngram_draft_device


@pytest.mark.parametrize("min_n,max_n,k", [(1, 1, 3), (1, 4, 4), (2, 4, 2), (3, 5, 6), (2, 2, 1)])
@pytest.mark.parametrize("alphabet", [2, 3, 7])
def test_device_lookup_equals_the_reference(min_n, max_n, k, alphabet):
    g = torch.Generator().manual_seed(min_n * 100 + max_n * 10 + k + alphabet)
    b, width = 24, 40
    hist = torch.randint(0, alphabet, (b, width), generator=g)
    lens = torch.randint(1, width + 1, (b,), generator=g)
    lens[:3] = torch.tensor([1, 2, min_n])  # shorter than any proposal needs
    garbage = torch.randint(100, 200, (b, width), generator=g)
    past = torch.arange(width)[None, :] >= lens[:, None]
    hist = torch.where(past, garbage, hist)  # what lies past a row's length must not matter
    drafts, count = ngram_draft_device(hist, lens, min_n, max_n, k)
    assert drafts.shape == (b, k) and count.shape == (b,)
    proposed = 0
    for i in range(b):
        context = hist[i, : lens[i]].numpy()
        ref = ngram_proposal(context, min_n, max_n, k).tolist()
        assert count[i].item() == len(ref), (i, context.tolist())
        assert drafts[i, : len(ref)].tolist() == ref
        assert drafts[i, len(ref):].tolist() == [context[-1]] * (k - len(ref))  # filler: the last token
        proposed += len(ref) > 0
    assert 0 < proposed < b  # both kinds of rows were checked


def test_lengths_beyond_the_width_are_clamped():
    hist = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]])
    drafts, count = ngram_draft_device(hist, torch.tensor([99]), 1, 3, 3)
    ref = ngram_proposal(np.array([1, 2, 3, 1, 2, 3, 1, 2]), 1, 3, 3).tolist()
    assert count.item() == len(ref) and drafts[0, : len(ref)].tolist() == ref

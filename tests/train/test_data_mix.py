"""Mixing generated text into the training blocks by a ratio."""

from __future__ import annotations

import pytest
import torch

from common.errors import ShrinkError
from train.data import mix_generated


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_ratio_holds_and_block_count_is_kept(ratio):
    corpus = torch.randint(0, 100, (40, 8))
    samples = [list(range(1000 + 20 * i, 1000 + 20 * i + 15)) for i in range(30)]  # 30 x (15 + EOS) tokens
    mixed = mix_generated(corpus, samples, ratio, eos_id=999, seed=0)
    assert mixed.shape == corpus.shape
    generated = (mixed >= 999).all(dim=1)
    assert int(generated.sum()) == round(ratio * 40)
    corpus_rows = {tuple(r) for r in corpus.tolist()}
    assert all(tuple(r) in corpus_rows for r in mixed[~generated].tolist())


def test_few_generated_blocks_repeat_and_bad_ratio_is_refused():
    corpus = torch.zeros(10, 4, dtype=torch.long)
    mixed = mix_generated(corpus, [[7, 7, 7]], 0.5, eos_id=9, seed=1)  # one block [7, 7, 7, 9]
    assert int((mixed == 7).all(dim=1).sum()) == 0 and int((mixed[:, 0] == 7).sum()) == 5
    for bad in (1.5, -0.1):  # 1.0 is allowed: every block generated (distill=drafter)
        with pytest.raises(ShrinkError, match="ratio"):
            mix_generated(corpus, [[7, 7, 7]], bad, eos_id=9, seed=1)

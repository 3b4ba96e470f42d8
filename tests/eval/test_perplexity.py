"""Sliding-window perplexity equals a direct transformers computation on the same model and text."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from support import tiny_llama_config
from eval.perplexity import encode, perplexity, wikitext2_text, windows
from common.errors import ShrinkError


def reference_perplexity(model, ids: torch.Tensor, context: int, stride: int) -> tuple[float, int]:
    """The loop of the transformers perplexity guide, written out with labels=-100 masking."""
    seq_len = ids.numel()
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + context, seq_len)
        trg_len = end - prev_end
        input_ids = ids[begin:end].unsqueeze(0)
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target).loss  # mean over the shifted valid labels
        n_valid = int((target[:, 1:] != -100).sum())
        nll_sum += loss.item() * n_valid
        n_tokens += n_valid
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.parametrize("context,stride", [(64, 16), (64, 64), (50, 7)])
def test_matches_transformers_labels_loss(context, stride):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config()).eval()
    ids = torch.randint(3, 320, (301,))
    ours = perplexity(model, ids, context=context, stride=stride)
    ref_ppl, ref_tokens = reference_perplexity(model, ids, context, stride)
    assert ours.ppl == pytest.approx(ref_ppl, rel=1e-5)
    assert ours.tokens == ref_tokens
    if stride < context:
        assert ours.tokens == ids.numel() - 1  # overlapping windows score every token but the first


def test_full_windows_only_drops_the_short_tail():
    assert list(windows(10, 4, 4, full_windows_only=True)) == [(0, 4, 4), (4, 8, 4)]
    assert list(windows(10, 4, 4)) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]


def test_bad_window_settings_are_rejected():
    with pytest.raises(ShrinkError, match="stride"):
        list(windows(100, 16, 32))


def test_wikitext_reader_restores_blank_lines(shared_data_dir):
    text = wikitext2_text(shared_data_dir)
    assert "\r" not in text
    assert text.startswith(" = Robert Boulter = \n\n")
    assert len(text.split("\n\n")) == 2891


def test_wikitext_rows_keep_their_newline(shared_data_dir):
    """The reference protocol: each row keeps its "\\n" (as the dataset's rows do), rows joined with "\\n\\n"."""
    text = wikitext2_text(shared_data_dir)
    assert text.startswith(" = Robert Boulter = \n\n\n Robert Boulter is")
    assert len(text) == 1_291_402


@pytest.mark.slow
def test_wikitext_smollm2_tokens_and_full_windows(shared_data_dir, smollm2_artifact):
    from shrink.modeling import load_tokenizer

    ids = encode(load_tokenizer(smollm2_artifact), wikitext2_text(shared_data_dir))
    assert ids.numel() == 304_838
    full = list(windows(ids.numel(), 2048, 2048, full_windows_only=True))
    assert len(full) == 148 and ids.numel() - full[-1][1] == 1_734

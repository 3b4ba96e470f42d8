"""Perplexity: sliding windows as in the transformers perplexity guide, and WikiText-2 raw test.

Each window of at most `context` tokens advances by `stride`; only the tokens not scored by an
earlier window count (the rest are context, label -100). stride == context gives the
non-overlapping protocol; `full_windows_only` then drops a short last window.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from common.errors import ShrinkError
from common.paths import WIKITEXT_FILE


@dataclass(frozen=True)
class WindowProtocol:
    """How one dataset is cut into windows (the arguments of `perplexity`)."""

    context: int
    stride: int
    max_windows: int | None = None
    full_windows_only: bool = False

    def capped(self, max_positions: int) -> WindowProtocol:
        """The context cut to the model's positions, the stride with it (never past the context)."""
        if self.context <= max_positions:
            return self
        return replace(self, context=max_positions, stride=min(self.stride, max_positions))

    def describe(self) -> str:
        kind = "non-overlapping" if self.stride == self.context else "sliding"
        return (f"{kind} windows of {self.context} tokens"
                + ("" if self.stride == self.context else f", stride {self.stride}")
                + (", full windows only" if self.full_windows_only else "")
                + (f", the first {self.max_windows}" if self.max_windows else ", all windows"))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int

    def as_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "windows": self.windows}


def windows(seq_len: int, context: int, stride: int, full_windows_only: bool = False):
    """(begin, end, n_scored) for each window; n_scored counts the new tokens at its end."""
    if context < 2 or stride < 1 or stride > context:
        raise ShrinkError(f"perplexity needs context >= 2 and 1 <= stride <= context (got {context}, {stride})")
    prev_end = 0
    for begin in range(0, seq_len, stride):
        end = min(begin + context, seq_len)
        if full_windows_only and end - begin < context:
            break
        yield begin, end, end - prev_end
        prev_end = end
        if end == seq_len:
            break


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, context: int = 2048, stride: int = 512,
               max_windows: int | None = None, full_windows_only: bool = False) -> PerplexityResult:
    """Perplexity of a 1-D token tensor. The first token of the text is never scored."""
    ids = ids.view(-1)
    device = next(model.parameters()).device
    nll_sum, count, n_windows = 0.0, 0, 0
    for begin, end, n_new in windows(ids.numel(), context, stride, full_windows_only):
        if max_windows is not None and n_windows >= max_windows:
            break
        chunk = ids[begin:end].to(device).unsqueeze(0)
        logits = model(chunk).logits[0, :-1].float()
        targets = chunk[0, 1:]
        # Score only the last n_new targets (and never the text's very first token).
        n_score = min(n_new, targets.numel())
        token_nll = F.cross_entropy(logits[-n_score:], targets[-n_score:], reduction="sum")
        nll_sum += token_nll.item()
        count += n_score
        n_windows += 1
    if count == 0:
        raise ShrinkError("perplexity: text too short for one window")
    mean = nll_sum / count
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=count, windows=n_windows)


def wikitext2_text(data_dir: Path) -> str:
    """WikiText-2 raw test on the reference protocol: this copy has CRLF endings and no blank lines;
    read with universal newlines, each row keeps its trailing "\n" (as the dataset's rows do), and
    rows are joined with "\n\n" (1,291,402 characters; 304,838 SmolLM2 tokens without BOS)."""
    path = Path(data_dir) / WIKITEXT_FILE
    if not path.is_file():
        raise ShrinkError(f"WikiText-2 test split not found at {path}")
    with open(path, encoding="utf-8") as f:
        rows = f.readlines()
    return "\n\n".join(rows)


def encode(tokenizer, text: str) -> torch.Tensor:
    """Tokenize once, without BOS (the protocol the project's numbers use)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

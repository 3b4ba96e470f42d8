"""Engine logprobs ({token id: Logprob} per token, holding the chosen token and the top-n) in
OpenAI's two shapes: the completions API's parallel lists and the chat API's content list."""

from __future__ import annotations

from typing import Any

from engine.sequence import TokenLogprobs


class TokenText:
    """The text of single tokens, as vLLM shows them (decoded alone); ``token_id:N`` without a tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])


def _ranked(entry: TokenLogprobs, limit: int) -> list[tuple[int, float]]:
    """The entry's top ``limit`` alternatives, most likely first."""
    alts = sorted(entry.values(), key=lambda lp: lp.rank)
    return [(lp.token_id, lp.logprob) for lp in alts if lp.rank <= limit]


class CompletionLogprobs:
    """Accumulates ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``.

    ``top_logprobs`` holds the chosen token and the top-n (so its best value is the greedy one, as
    lm-eval's is_greedy check expects); a prompt's first token has None in both lists."""

    def __init__(self, token_text: TokenText, offset: int = 0) -> None:
        self.token_text = token_text
        self.offset = offset
        self.clear()

    def clear(self) -> None:
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, token_ids: list[int], entries: list[TokenLogprobs | None], top_n: int) -> None:
        for token_id, entry in zip(token_ids, entries):
            text = self.token_text(token_id)
            self.tokens.append(text)
            self.text_offset.append(self.offset)
            self.offset += len(text)
            if entry is None:
                self.token_logprobs.append(None)
                self.top_logprobs.append(None)
                continue
            self.token_logprobs.append(entry[token_id].logprob)
            top = {self.token_text(t): lp for t, lp in _ranked(entry, top_n)}
            top.setdefault(text, entry[token_id].logprob)
            self.top_logprobs.append(top)

    def take(self) -> dict[str, list]:
        """The lists so far, and start new ones (for the next streamed chunk)."""
        out = {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
               "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}
        self.clear()
        return out


def chat_logprobs(token_text: TokenText, token_ids: list[int], entries: list[TokenLogprobs], top_n: int) -> dict:
    """``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}``."""

    def item(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for token_id, entry in zip(token_ids, entries):
        top = [item(t, lp) for t, lp in _ranked(entry, top_n)]
        content.append({**item(token_id, entry[token_id].logprob), "top_logprobs": top})
    return {"content": content}

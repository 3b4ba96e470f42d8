"""Token sampling for a batch where every row has its own SamplingParams: the ``Sampler`` does all of
a step's sampling (the plain-greedy argmax, min-tokens masking of stop tokens, temperature, top-k,
top-p, min-p, per-request seeds, logprobs and prompt logprobs).

Greedy rows take the argmax. Other rows: temperature, then top-k, top-p and min-p filters, then a
draw by the exponential race (argmax of p / E with E ~ Exp(1)), which equals sampling from p and
lets rows with a per-request seed draw their noise from their own generator. Logprobs reported
are those of the model (log_softmax of the raw logits), as in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams
from engine.sequence import Logprob, Sequence, TokenLogprobs


@dataclass
class StepResult:
    """A step's new tokens, aligned with the batch's sequences: per sequence its tokens in order
    (none for a prompt chunk that samples nothing, one for a prefill or decode step, several for a
    multi-step decode), and where any sequence asked for logprobs, per sequence those of its tokens
    (empty where it did not ask)."""

    tokens: list[list[int]]
    logprobs: list[list[TokenLogprobs]] | None = None


def device_tensor(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small per-request tensor on ``device`` without a host sync: built in pinned memory and
    copied asynchronously (``torch.tensor(values, device=cuda)`` waits for the device)."""
    host = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def filter_logits(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
    use_top_k_p: bool, use_min_p: bool,
) -> torch.Tensor:
    """logits: [n, vocab] already temperature-scaled; per-row filter values (top_k 0 = off). The
    two flags are decided on the host, so that filtering never waits for the GPU."""
    vocab = logits.shape[-1]
    if use_top_k_p:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).clamp(max=vocab)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        remove = ranks >= k[:, None]
        probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it stays).
        cum_before = probs.cumsum(dim=-1) - probs
        remove |= cum_before >= top_p[:, None]
        remove[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)
    if use_min_p:
        probs = logits.softmax(dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """logits: [n, vocab] float32. Returns [n] token ids (on logits' device)."""
    n = logits.shape[0]
    device = logits.device
    tokens = logits.argmax(dim=-1)
    if all(p.greedy for p in params):  # decided on the host: no device sync
        return tokens
    greedy = device_tensor([p.greedy for p in params], device)
    temps = device_tensor([p.temperature if not p.greedy else 1.0 for p in params], device, logits.dtype)
    top_k = device_tensor([max(p.top_k, 0) for p in params], device)
    top_p = device_tensor([p.top_p for p in params], device, logits.dtype)
    min_p = device_tensor([p.min_p for p in params], device, logits.dtype)
    use_top_k_p = any(p.top_k > 0 or p.top_p < 1.0 for p in params)
    use_min_p = any(p.min_p > 0 for p in params)
    scaled = filter_logits(logits / temps[:, None], top_k, top_p, min_p, use_top_k_p, use_min_p)
    probs = scaled.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for i, g in enumerate(generators):
        if g is not None and not params[i].greedy:
            noise[i] = torch.empty(probs.shape[1], device=device, dtype=probs.dtype).exponential_(generator=g)
    drawn = (probs / noise).argmax(dim=-1)
    return torch.where(greedy, tokens, drawn)


def token_logprobs(logprobs_row: torch.Tensor, chosen: int, top_n: int) -> TokenLogprobs:
    """The chosen token's logprob and rank, plus the top-n entries, from one row of log_softmax."""
    rows = LogprobRows()
    rows.add(logprobs_row[None], torch.tensor([chosen], device=logprobs_row.device), top_n)
    return rows.entries([[chosen]])[0][0]


class LogprobRows:
    """Logprob entries of rows of log_softmax, reduced on the device to what an entry holds (the
    chosen token's logprob and rank, the top-n) and brought to the host in one transfer for all
    groups added: the host never copies or scans a vocabulary-wide row (on a GPU, a copy and a
    sync per request and a host pass over the vocabulary per token made prompt-logprob scoring
    cost many times its prefill)."""

    def __init__(self) -> None:
        self.groups: list[tuple[torch.Tensor, int, int]] = []  # (flat packed rows, rows, top_n)

    def add(self, logprobs: torch.Tensor, chosen: torch.Tensor, top_n: int) -> None:
        """``logprobs``: [rows, vocab] fp32 log_softmax; ``chosen``: [rows] token ids (same device)."""
        chosen_lp = logprobs.gather(1, chosen.long()[:, None])
        rank = (logprobs > chosen_lp).sum(dim=1, keepdim=True) + 1
        parts = [chosen_lp.double(), rank.double()]  # fp64 holds fp32 values and token ids exactly
        if top_n > 0:
            values, idx = logprobs.topk(top_n, dim=-1)
            parts += [values.double(), idx.double()]
        self.groups.append((torch.cat(parts, dim=1).flatten(), logprobs.shape[0], top_n))

    def entries(self, chosen: list[list[int]]) -> list[list[TokenLogprobs]]:
        """Per group added, in order, its rows' entries; ``chosen[g]``: group g's chosen token ids."""
        if not self.groups:
            return []
        flat = torch.cat([g[0] for g in self.groups]).tolist()  # the one transfer
        out: list[list[TokenLogprobs]] = []
        k = 0
        for (_, rows, top_n), tokens in zip(self.groups, chosen):
            group: list[TokenLogprobs] = []
            assert len(tokens) == rows
            for token in tokens:
                values, ids = flat[k + 2 : k + 2 + top_n], flat[k + 2 + top_n : k + 2 + 2 * top_n]
                entry: TokenLogprobs = {int(t): Logprob(int(t), v, r)
                                        for r, (v, t) in enumerate(zip(values, ids), start=1)}
                entry[token] = Logprob(token, flat[k], int(flat[k + 1]))
                group.append(entry)
                k += 2 + 2 * top_n
            out.append(group)
        return out


class PromptLogprobs:
    """One step's prompt logprobs (Sampler.prompt_logprobs queues each chunk's): recorded to their
    sequences together, in one transfer."""

    def __init__(self) -> None:
        self.rows = LogprobRows()
        self.seqs: list[tuple[Sequence, list[int]]] = []  # each queued chunk's sequence and tokens

    def record(self) -> None:
        """Append the queued entries to their sequences' prompt_logprobs."""
        for (seq, _), entries in zip(self.seqs, self.rows.entries([tokens for _, tokens in self.seqs])):
            seq.prompt_logprobs.extend(entries)


class Sampler:
    def __init__(self, device: torch.device, eos_token_ids: set[int]) -> None:
        self.device = device
        self.eos_token_ids = eos_token_ids  # impossible tokens until a sequence reaches min_tokens

    def sample_step(self, seqs: list[Sequence], logits: torch.Tensor | None, rows: list[int] | None = None) -> StepResult:
        """One token for each sequence that samples this step. ``logits`` [rows, vocab] fp32;
        ``rows[i]``: sequence i's row, increasing with i (-1: it samples nothing now); None: row i
        is sequence i's."""
        if rows is None:
            if all(seq.plain_greedy for seq in seqs):
                # The common decode step: one argmax and one transfer, no per-row work.
                return StepResult([[t] for t in logits.argmax(dim=-1).tolist()])
            rows = list(range(len(seqs)))
        n = len(seqs)
        tokens: list[list[int]] = [[] for _ in range(n)]
        idx = [i for i in range(n) if rows[i] >= 0]
        if not idx or logits is None:
            return StepResult(tokens)
        raw = logits if len(idx) == logits.shape[0] else logits[[rows[i] for i in idx]]
        sel = raw
        for j, i in enumerate(idx):  # min_tokens: stop tokens are impossible until then
            seq = seqs[i]
            if seq.num_output_tokens < seq.params.min_tokens:
                banned = set(seq.params.stop_token_ids) | self.eos_token_ids
                if banned:
                    if sel is raw:
                        sel = raw.clone()  # logprobs stay those of the model
                    sel[j, list(banned)] = float("-inf")
        params = [seqs[i].params for i in idx]
        gens = [self.generator(seqs[i]) for i in idx]
        picked = sample(sel, params, gens)
        sampled = picked.tolist()
        for j, i in enumerate(idx):
            tokens[i] = [sampled[j]]
        need_lp = [j for j, i in enumerate(idx) if seqs[i].params.logprobs is not None]
        if not need_lp:
            return StepResult(tokens)
        lps: list[list[TokenLogprobs]] = [[] for _ in range(n)]
        lp = torch.log_softmax(raw[need_lp], dim=-1)
        rows = LogprobRows()
        for r, j in enumerate(need_lp):
            rows.add(lp[r : r + 1], picked[j : j + 1], seqs[idx[j]].params.logprobs or 0)
        for j, entries in zip(need_lp, rows.entries([[sampled[j]] for j in need_lp])):
            lps[idx[j]] = entries
        return StepResult(tokens, lps)

    def prompt_logprobs(self, seq: Sequence, logits: torch.Tensor, start: int, step: PromptLogprobs) -> None:
        """Queue on ``step`` the logprobs of the prompt tokens that ``logits`` predict: [rows, vocab]
        fp32, computed at positions start, start + 1, ... (row j scores token start + j + 1); the
        first prompt token gets None. They are reduced on the device now and appended to
        seq.prompt_logprobs by ``step.record()``, once for the step. Entry k of seq.prompt_logprobs
        belongs to prompt token k; a recompute after preemption skips entries already recorded (so
        do entries taken from the prefix cache)."""
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)
        first = len(seq.prompt_logprobs) - start - 1  # row of the first token without an entry
        stop = min(logits.shape[0], seq.num_prompt_tokens - start - 1)
        if first < 0 or first >= stop:  # nothing new (or not contiguous with the entries it has)
            return
        lp = torch.log_softmax(logits, dim=-1)
        tokens = seq.token_ids[start + first + 1 : start + stop + 1]
        step.rows.add(lp[first:stop], device_tensor(tokens, lp.device, torch.long), seq.params.prompt_logprobs or 0)
        step.seqs.append((seq, tokens))

    def generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None:
            return None
        if seq.generator is None:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(seq.params.seed)
        return seq.generator

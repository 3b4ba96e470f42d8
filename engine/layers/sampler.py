"""Token sampling for a batch where every row has its own SamplingParams: the ``Sampler`` does all of
a step's sampling (the plain-greedy argmax, min-tokens masking of stop tokens, temperature, top-k,
top-p, min-p, per-request seeds, logprobs and prompt logprobs).

Greedy rows take the argmax. Other rows: temperature, then top-k, top-p and min-p filters, then a
draw from the filtered softmax p. Rows without a seed draw by the exponential race (argmax of p / E
with E ~ Exp(1), one noise tensor for the batch from the global generator). A row with a per-request
seed draws by inverse CDF with one uniform that is a hash of (seed, output position, kind of draw)
(``SeededRows``): its tokens depend only on its seed and its logits, whatever shares the batch, and
all seeded rows draw at once, with no per-row work or state. Logprobs reported are those of the
model (log_softmax of the raw logits), as in vLLM.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence as Seq

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


# Kinds of draw a seeded request makes at an output position (SeededRows): distinct counters.
DRAW_TOKEN = 0  # the token a target distribution emits there: a plain step's, a verify's residual or bonus
DRAW_DRAFT = 1  # a drafter's proposal there
DRAW_ACCEPT = 2  # the uniform that accepts or rejects the proposal there
NUM_DRAW_KINDS = 3

_GOLDEN = 0x9E3779B97F4A7C15 - 2**64  # splitmix64's increment and multipliers, as signed int64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic: mask off the copies of the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer (Stafford's Mix13) on int64 tensors, products wrapping mod 2**64: a
    bijection of 64-bit words whose every output bit depends on every input bit."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def counter_uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) (float64, 53 random bits) from int64 ``seeds`` and ``counters`` (broadcast):
    output number ``counter`` of a splitmix64 generator whose state starts at mix64(seed), which is
    computed directly instead of stepping a generator (the state is seed-hashed so that nearby
    seeds, such as a request's n choices, start far apart)."""
    return state_uniforms(mix64(seeds), counters)


def state_uniforms(states: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """counter_uniforms of the seeds whose hashed start ``states`` (mix64(seeds)) are already known:
    a seed's state is hashed once, not at every draw (SeededRows keeps it)."""
    z = mix64(states + (counters + 1) * _GOLDEN)
    return _shr(z, 11).double() * 2.0**-53


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [m, V] (>= 0, not necessarily normalised, a positive entry per row), u [m] uniforms in
    [0, 1) -> [m] int64: the first token whose cumulative mass exceeds u * total. The cumsum is
    float64 (an fp32 running sum's error bound over 49k terms, about V * 2**-24 = 3e-3 of the mass,
    is many tokens' share); a token is picked only
    where the cumsum rises, so never one with probability 0, and the target is kept below the total
    so that rounding of u * total never runs past the last token."""
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    total = cdf[:, -1:]
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def _as_int64(seed: int) -> int:
    """A seed of [-2**63, 2**64) as the int64 with the same 64 bits."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


class SeededRows:
    """The rows of a batch that carry a per-request seed (and sample: greedy rows never draw), with
    the output position of each row's draw: how many tokens its sequence has generated before the
    token drawn. Every draw of a seeded request is one uniform, ``counter_uniforms(seed, position *
    NUM_DRAW_KINDS + kind)``, so a request's tokens depend only on its seed, its logits and the
    position, not on the other rows, on how many steps ran, or on a preemption's recompute (which
    keeps the generated tokens and so the positions).

    The kinds (DRAW_*) keep speculative decoding lossless. A round proposing from output position n
    draws proposal j with (n + j, DRAW_DRAFT), accepts it with (n + j, DRAW_ACCEPT) and draws the
    residual at the first rejection j, or the bonus at j = k, with (n + j, DRAW_TOKEN), the same
    counter as a plain step's token there. What a round emits up to and including position n + a
    depends only on the counters of positions <= n + a, so the positions the next round starts from
    have counters that nothing emitted has seen: a proposal discarded there reuses its counter only
    for a new draw from a new context. Each emitted token therefore uses fresh independent uniforms,
    as the acceptance proof needs (given a drafter whose state comes from the emitted tokens alone)."""

    def __init__(self, rows: list[int], seeds: list[int], positions: list[int], n: int,
                 device: torch.device) -> None:
        self.rows = rows
        self.all = len(rows) == n  # every row of the batch: no gather or scatter
        self.index = None if self.all else device_tensor(rows, device, torch.int64)
        self.seeds = device_tensor([_as_int64(s) for s in seeds], device, torch.int64)
        self.states = mix64(self.seeds)  # each seed's generator state, hashed once (state_uniforms)
        self.positions = device_tensor(positions, device, torch.int64)

    @classmethod
    def of(cls, params: Seq[SamplingParams], positions: Seq[int] | None,
           device: torch.device) -> SeededRows | None:
        """Row i's SamplingParams and output position (None: no row may have a seed); None when no
        sampled row has a seed."""
        rows = [i for i, p in enumerate(params) if p.seed is not None and not p.greedy]
        if not rows:
            return None
        if positions is None or len(positions) != len(params):
            raise ValueError("seeded rows need each row's output position (how many tokens it has generated)")
        return cls(rows, [params[i].seed for i in rows], [positions[i] for i in rows], len(params), device)

    def at(self, positions: list[int]) -> SeededRows:
        """The same rows and seeds drawing at ``positions`` (each seeded row's, in order): a batch
        whose composition did not change stages only its positions."""
        out = copy.copy(self)
        out.positions = device_tensor(positions, self.positions.device, torch.int64)
        return out

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """The seeded rows of ``x`` (dim 0: the batch's rows)."""
        return x if self.all else x.index_select(0, self.index)

    def put(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``x`` with its seeded rows replaced by ``values`` (the seeded rows' own, in order)."""
        return values if self.all else x.index_copy(0, self.index, values)

    def uniforms(self, kind: int, offsets: int | torch.Tensor = 0) -> torch.Tensor:
        """[m] uniforms of the seeded rows at their positions plus ``offsets`` (an int, or a tensor
        of the seeded rows' [m] or [m or 1, k] offsets, giving [m, k])."""
        pos = self.positions
        if isinstance(offsets, torch.Tensor) and offsets.dim() > 1:
            pos = pos[:, None]
        counters = (pos + offsets) * NUM_DRAW_KINDS + kind
        return state_uniforms(self.states.view(-1, *([1] * (counters.dim() - 1))), counters)


def check_seeded(params: Seq[SamplingParams], seeded: SeededRows | None) -> None:
    """A sampled row with a seed but no SeededRows would draw from the global generator, silently
    irreproducible: an error instead."""
    if seeded is None and any(p.seed is not None and not p.greedy for p in params):
        raise _missing_seeded_rows()


def _missing_seeded_rows() -> ValueError:
    return ValueError("rows with a seed need their SeededRows (SeededRows.of(params, positions, device))")


def seeded_rows(seqs: Seq[Sequence], device: torch.device, steps: int = 1) -> SeededRows | None:
    """SeededRows of ``steps`` rows per sequence, row i * steps + j drawing sequence i's output
    token num_output_tokens + j (steps > 1: a drafter's k proposals in one batch)."""
    if all(s.params.seed is None for s in seqs):  # the common case: no per-row lists
        return None
    return SeededRows.of([s.params for s in seqs for _ in range(steps)],
                         [s.num_output_tokens + j for s in seqs for j in range(steps)], device)


def draw(probs: torch.Tensor, seeded: SeededRows | None, kind: int = DRAW_TOKEN,
         offsets: int | torch.Tensor = 0) -> torch.Tensor:
    """[n, V] probabilities -> [n] token ids: seeded rows by inverse CDF with their uniform of
    ``kind`` (at their positions plus ``offsets``: an int or a [n] tensor over all rows), the others
    by the exponential race with the global generator."""
    if seeded is not None and seeded.all:
        return inverse_cdf(probs, seeded.uniforms(kind, offsets))
    noise = torch.empty_like(probs).exponential_()
    # Exp(1) may round to 0; p / 0 would make a zero-probability token win the race.
    tokens = (probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(dim=-1)
    if seeded is None:
        return tokens
    if isinstance(offsets, torch.Tensor):
        offsets = seeded.select(offsets)
    return seeded.put(tokens, inverse_cdf(seeded.select(probs), seeded.uniforms(kind, offsets)))


class RowParams:
    """What ``sample`` needs of its rows' SamplingParams, as device tensors and host flags (decided on
    the host, so that nothing waits for the device). Built per call by ``sample``, or once per batch
    composition by the Sampler (``BatchRows``), which reuses it while the same sequences sample."""

    def __init__(self, params: Seq[SamplingParams], device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.all_greedy = all(p.greedy for p in params)
        if self.all_greedy:
            return
        self.any_greedy = any(p.greedy for p in params)  # else no argmax: every row draws
        self.any_seeded = any(p.seed is not None and not p.greedy for p in params)
        self.greedy = device_tensor([p.greedy for p in params], device)
        self.temps = device_tensor([p.temperature if not p.greedy else 1.0 for p in params], device, dtype)
        self.top_k = device_tensor([max(p.top_k, 0) for p in params], device)
        self.top_p = device_tensor([p.top_p for p in params], device, dtype)
        self.min_p = device_tensor([p.min_p for p in params], device, dtype)
        self.use_top_k_p = any(p.top_k > 0 or p.top_p < 1.0 for p in params)
        self.use_min_p = any(p.min_p > 0 for p in params)


def sample(logits: torch.Tensor, params: list[SamplingParams] | None, seeded: SeededRows | None = None,
           rows: RowParams | None = None) -> torch.Tensor:
    """logits: [n, vocab] float32; ``seeded``: the rows with a seed (SeededRows.of(params, ...)), None
    when none has; ``rows``: RowParams(params, logits' device and dtype) when the caller keeps one
    (``params`` is then not read). Returns [n] token ids (on logits' device)."""
    if rows is None:
        rows = RowParams(params, logits.device, logits.dtype)
    if rows.all_greedy:
        return logits.argmax(dim=-1)
    if seeded is None and rows.any_seeded:
        raise _missing_seeded_rows()
    scaled = filter_logits(logits / rows.temps[:, None], rows.top_k, rows.top_p, rows.min_p, rows.use_top_k_p,
                           rows.use_min_p)
    drawn = draw(scaled.softmax(dim=-1), seeded)
    return torch.where(rows.greedy, logits.argmax(dim=-1), drawn) if rows.any_greedy else drawn


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


class BatchRows:
    """What the sequences that sample in a step need from their requests' constant parameters, built
    once per batch composition: their RowParams, their seeds, the rows that mask stop tokens until
    min_tokens (with those tokens) and the rows that want logprobs. ``Sampler.sample_step`` reuses it
    while the same sequences (the same objects, in the same order) sample, as they do step after step
    of a decode; whatever changes per step (output positions, min_tokens progress) is read from the
    sequences each step. Sound because a sequence's params never change while it runs (nothing
    assigns Sequence.params after construction)."""

    def __init__(self, seqs: list[Sequence], device: torch.device, dtype: torch.dtype,
                 eos_token_ids: set[int]) -> None:
        self.seqs = list(seqs)
        self.eos_token_ids = eos_token_ids
        params = [s.params for s in seqs]
        self.params = RowParams(params, device, dtype)
        self.no_logprobs = all(p.logprobs is None for p in params)
        # (row, sequence, tokens it may not sample before min_tokens)
        self.min_tokens = [(j, s, list(set(s.params.stop_token_ids) | eos_token_ids))
                           for j, s in enumerate(seqs) if s.params.min_tokens > 0]
        self.need_lp = [j for j, p in enumerate(params) if p.logprobs is not None]
        rows = [j for j, p in enumerate(params) if p.seed is not None and not p.greedy]
        self.seeded_seqs = [seqs[j] for j in rows]
        # Positions are staged per step (SeededRows.at); these are placeholders.
        self.seeded = SeededRows(rows, [params[j].seed for j in rows], [0] * len(rows), len(seqs), device) \
            if rows else None

    def matches(self, seqs: list[Sequence], logits: torch.Tensor, eos_token_ids: set[int]) -> bool:
        """Whether ``seqs`` sampling from ``logits`` is the composition this was built for (list ==
        compares the sequences by identity first), with the same set of EOS ids."""
        rp = self.params
        return self.seqs == seqs and rp.device == logits.device and rp.dtype == logits.dtype and \
            self.eos_token_ids is eos_token_ids

    def masking(self) -> list[tuple[int, list[int]]]:
        """(row, banned tokens) of the rows still short of their min_tokens."""
        return [(j, banned) for j, s, banned in self.min_tokens
                if banned and len(s.token_ids) - s.num_prompt_tokens < s.params.min_tokens]

    def plain_greedy(self) -> bool:
        """Every row greedy, without logprobs and past min_tokens (Sequence.plain_greedy of each)."""
        return self.params.all_greedy and self.no_logprobs and \
            all(len(s.token_ids) - s.num_prompt_tokens >= s.params.min_tokens for _, s, _ in self.min_tokens)

    def seeded_at_positions(self) -> SeededRows | None:
        """The seeded rows at their sequences' output positions now (tokens generated so far)."""
        if self.seeded is None:
            return None
        return self.seeded.at([len(s.token_ids) - s.num_prompt_tokens for s in self.seeded_seqs])


class Sampler:
    def __init__(self, device: torch.device, eos_token_ids: set[int]) -> None:
        self.device = device
        self.eos_token_ids = eos_token_ids  # impossible tokens until a sequence reaches min_tokens
        self._batch: BatchRows | None = None  # the last step's sampling sequences (BatchRows)

    def batch_rows(self, seqs: list[Sequence], logits: torch.Tensor) -> BatchRows:
        """BatchRows of ``seqs``: the last step's when the same sequences sample again, else new."""
        batch = self._batch
        if batch is None or not batch.matches(seqs, logits, self.eos_token_ids):
            batch = self._batch = BatchRows(seqs, logits.device, logits.dtype, self.eos_token_ids)
        return batch

    def sample_step(self, seqs: list[Sequence], logits: torch.Tensor | None, rows: list[int] | None = None) -> StepResult:
        """One token for each sequence that samples this step. ``logits`` [rows, vocab] fp32;
        ``rows[i]``: sequence i's row, increasing with i (-1: it samples nothing now); None: row i
        is sequence i's."""
        n = len(seqs)
        if rows is None:  # a decode step: every sequence samples, row i is sequence i's
            idx = None
            chosen = seqs
            raw = logits
        else:
            idx = [i for i in range(n) if rows[i] >= 0]
            if not idx or logits is None:
                return StepResult([[] for _ in range(n)])
            chosen = [seqs[i] for i in idx]
            raw = logits if len(idx) == logits.shape[0] else logits[[rows[i] for i in idx]]
        batch = self.batch_rows(chosen, raw)
        if idx is None and batch.plain_greedy():
            # The common greedy decode step: one argmax and one transfer, no per-row work.
            return StepResult([[t] for t in logits.argmax(dim=-1).tolist()])
        sel = raw
        masking = batch.masking()  # min_tokens: stop tokens are impossible until then
        if masking:
            sel = raw.clone()  # logprobs stay those of the model
            for j, banned in masking:
                sel[j, banned] = float("-inf")
        picked = sample(sel, None, batch.seeded_at_positions(), batch.params)
        sampled = picked.tolist()
        if idx is None:
            tokens = [[t] for t in sampled]
        else:
            tokens = [[] for _ in range(n)]
            for j, i in enumerate(idx):
                tokens[i] = [sampled[j]]
        need_lp = batch.need_lp
        if not need_lp:
            return StepResult(tokens)
        lps: list[list[TokenLogprobs]] = [[] for _ in range(n)]
        lp = torch.log_softmax(raw[need_lp], dim=-1)
        lp_rows = LogprobRows()
        for r, j in enumerate(need_lp):
            lp_rows.add(lp[r : r + 1], picked[j : j + 1], chosen[j].params.logprobs or 0)
        for j, entries in zip(need_lp, lp_rows.entries([[sampled[j]] for j in need_lp])):
            lps[j if idx is None else idx[j]] = entries
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

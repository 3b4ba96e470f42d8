"""``num_speculative_tokens_per_batch_size: "auto"``: k chosen per decode step from measured step
costs and the acceptance seen so far, 0 (plain decoding) where speculation does not pay.

For a decode batch of n sequences the policy takes

    k* = argmax over k in 0..k_max of  expected_tokens(a, k) / step_seconds(n, k)

where a_j is the estimated rate at which draft position j is accepted given positions 0..j-1 were
(AcceptanceEstimate), expected_tokens(a, k) = 1 + sum_{j<k} prod_{i<=j} a_i (the accepted drafts
plus the target's own token), and step_seconds is a plain decode step (per token of the
multi-step decode where the engine runs one) for k = 0, else drafting k tokens (a model drafter's
k forwards, plus its one-token catch-up after a fully accepted round; n-gram's host lookup) plus
the verify of k + 1 tokens per sequence, all measured by the engine at startup (step_costs.py).
k > 0 must beat plain decoding by MIN_GAIN, so a tie decodes plainly.

Acceptance is a decayed count with a Beta prior (PRIOR_RATE over PRIOR_TRIALS pseudo-trials), so a
new engine speculates (WARMUP_TRIALS sequence-steps at k_max whatever the costs say) and then
follows the workload. While k* = 0 nothing is observed, so every ``probe_interval`` plain steps one
step speculates at k_max to refresh the estimate; the interval doubles (PROBE_MIN..PROBE_MAX) each
time a probe leaves k* at 0, and returns to PROBE_MIN once speculation pays again, so a drafter that
never pays costs at most one probe per PROBE_MAX steps. Which k runs never changes greedy output:
every k is verified losslessly.

The plain cost is a greedy batch's multi-step decode per token; a batch with sampled rows (or with
requests waiting) decodes one token per step, which costs more, so there the policy errs towards
plain decoding: it may leave a gain unused, never take a loss it could see."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence as Seq

PRIOR_RATE = 0.8  # a distilled drafter's typical per-position acceptance (the H200 eval's: 0.72)
PRIOR_TRIALS = 2.0  # the prior's weight, in sequence-steps
DECAY = 0.95  # per observed step: the estimate remembers about the last 20 steps
WARMUP_TRIALS = 8  # sequence-steps speculated at k_max before the costs decide
MIN_GAIN = 1.02  # speculation must beat plain decoding by this factor (within measurement noise)
PROBE_MIN, PROBE_MAX = 16, 256  # plain steps between probes while k* = 0


@dataclass
class StepCosts:
    """Seconds per decode step, per measured batch size (ascending); a batch of n sequences costs
    what the smallest measured size >= n does (a CUDA graph bucket pads n up to its size)."""

    batch_sizes: list[int]
    decode: list[float]  # plain decoding, per step of one token per sequence
    draft: dict[int, list[float]]  # by k: drafting k tokens per sequence (n-gram: the host lookup)
    verify: dict[int, list[float]]  # by k: the verify forward of k + 1 tokens per sequence
    catch_up: bool = True  # a draft model forwards one token first after a fully accepted round
    measure_s: float = 0.0  # what measuring took at startup

    def __post_init__(self) -> None:
        n = len(self.batch_sizes)
        if n == 0 or sorted(self.batch_sizes) != list(self.batch_sizes) or len(self.decode) != n:
            raise ValueError("StepCosts: ascending batch_sizes, and a decode cost for each")
        if not self.verify or sorted(self.draft) != sorted(self.verify) or any(
                len(v) != n for v in (*self.verify.values(), *self.draft.values())):
            raise ValueError("StepCosts: a draft and a verify cost per batch size for every k")

    def index(self, n: int) -> int:
        return next((i for i, b in enumerate(self.batch_sizes) if b >= n), len(self.batch_sizes) - 1)

    @property
    def k_max(self) -> int:
        return max(self.verify)

    def step_seconds(self, n: int, k: int, p_full: float = 0.0) -> float:
        """One step of n sequences at k (0: plain decoding). ``p_full``: the chance that all k drafts
        of a round are accepted, when a draft model then catches up one token before drafting."""
        i = self.index(n)
        if k == 0:
            return self.decode[i]
        catch_up = p_full * self.draft[1][i] if self.catch_up else 0.0
        return self.draft[k][i] + catch_up + self.verify[k][i]

    def as_dict(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes), "decode_s": list(self.decode),
                "draft_s": {str(k): list(v) for k, v in sorted(self.draft.items())},
                "verify_s": {str(k): list(v) for k, v in sorted(self.verify.items())},
                "catch_up": self.catch_up, "measure_s": self.measure_s}


def expected_tokens(rates: Seq[float], k: int) -> float:
    """Tokens a sequence emits in a round of k drafts: 1 + sum_{j<k} prod_{i<=j} rates[i]."""
    total, reach = 1.0, 1.0
    for a in rates[:k]:
        reach *= a
        total += reach
    return total


def choose_k(rates: Seq[float], costs: StepCosts, n: int, k_max: int, min_gain: float = MIN_GAIN) -> int:
    """k* for a batch of n sequences: the k > 0 with the most expected tokens per second if it beats
    plain decoding's by ``min_gain``, else 0."""
    plain = 1.0 / costs.step_seconds(n, 0)
    best_k, best = 0, plain * min_gain
    for k in range(1, min(k_max, costs.k_max) + 1):
        p_full = expected_tokens(rates, k) - expected_tokens(rates, k - 1)  # prod of rates[:k]
        rate = expected_tokens(rates, k) / costs.step_seconds(n, k, p_full)
        if rate > best:
            best_k, best = k, rate
    return best_k


@dataclass
class AcceptanceEstimate:
    """Per draft position j, the rate at which it is accepted given positions < j were: decayed
    counts of trials (sequences asked for a token at j whose first j drafts were accepted) and hits
    (of those, j accepted too), with a Beta(PRIOR_RATE, PRIOR_TRIALS) prior. A sequence asked for
    a token that its drafter did not propose (n-gram without a match) counts a miss there."""

    k_max: int
    prior_rate: float = PRIOR_RATE
    prior_trials: float = PRIOR_TRIALS
    decay: float = DECAY
    hits: list[float] = field(default_factory=list)
    trials: list[float] = field(default_factory=list)
    num_observed: int = 0  # sequence-steps observed (undecayed)

    def __post_init__(self) -> None:
        self.hits = self.hits or [0.0] * self.k_max
        self.trials = self.trials or [0.0] * self.k_max

    def observe(self, asked: Seq[int], accepted: Seq[int]) -> None:
        """One verify step: per sequence, the draft tokens it was asked for and how many were accepted."""
        if len(asked) != len(accepted):
            raise ValueError(f"{len(asked)} draft limits but {len(accepted)} acceptance counts")
        self.hits = [h * self.decay for h in self.hits]
        self.trials = [t * self.decay for t in self.trials]
        for n, a in zip(asked, accepted):
            if not 0 <= a <= n:
                raise ValueError(f"accepted {a} of {n} asked-for draft tokens")
            self.num_observed += n > 0
            for j in range(min(n, a + 1, self.k_max)):  # positions 0..a reached; a < n was a miss
                self.trials[j] += 1.0
                self.hits[j] += j < a

    @property
    def rates(self) -> list[float]:
        p, w = self.prior_rate, self.prior_trials
        return [(h + p * w) / (t + w) for h, t in zip(self.hits, self.trials)]


class SpecPolicy:
    """k per decode step (the scheduler's ``spec_k``) and what it observed, for one engine."""

    def __init__(self, k_max: int, max_batch_size: int, costs: StepCosts) -> None:
        self.k_max, self.max_batch_size, self.costs = k_max, max_batch_size, costs
        self.acceptance = AcceptanceEstimate(k_max)
        self.probe_interval = PROBE_MIN
        self.plain_steps = 0  # since the last speculative step
        self.num_probes = 0
        # Decode steps the policy gave each k (0: plain; a step the pool lacks blocks for still decodes
        # plainly), and the latest k.
        self.steps_by_k = [0] * (k_max + 1)
        self.last_k = k_max

    def k_for_step(self, n: int) -> int:
        """Draft tokens per sequence for a decode step of n sequences (0: decode plainly)."""
        if n > self.max_batch_size:
            return 0
        if self.acceptance.num_observed < WARMUP_TRIALS:
            k = self.k_max
        else:
            k = choose_k(self.acceptance.rates, self.costs, n, self.k_max)
            if k == 0:
                self.plain_steps += 1
                if self.plain_steps >= self.probe_interval:
                    k, self.plain_steps = self.k_max, 0
                    self.num_probes += 1
                    self.probe_interval = min(2 * self.probe_interval, PROBE_MAX)
            else:
                self.plain_steps, self.probe_interval = 0, PROBE_MIN
        self.steps_by_k[k] += 1
        self.last_k = k
        return k

    def observe(self, asked: Seq[int], accepted: Seq[int]) -> None:
        self.acceptance.observe(asked, accepted)

    def as_dict(self) -> dict:
        return {"policy": "auto", "last_k": self.last_k, "steps_by_k": list(self.steps_by_k),
                "num_probes": self.num_probes, "probe_interval": self.probe_interval,
                "acceptance_estimate": self.acceptance.rates, "costs": self.costs.as_dict()}

"""``num_speculative_tokens_per_batch_size: "auto"``: k chosen per decode step from measured step
costs, the drafter's match rate and the acceptance seen so far, 0 (plain decoding) where
speculation does not pay.

For a decode batch of n sequences the policy takes

    k* = argmax over k in 0..k_max of  tokens(k) / round_seconds(n, k)

with, per sequence, m the rate at which the drafter proposes anything when asked
(AcceptanceEstimate.match: 1 for a draft model; n-gram finds no earlier occurrence of the context's
suffix in a share of its rounds) and a_j the rate at which draft position j is accepted given the
drafter proposed and positions 0..j-1 were accepted:

    tokens(k) = 1 + m * sum_{j<k} prod_{i<=j} a_i      (the accepted drafts plus the target's token)
    round_seconds(n, k) = draft[k] + P * (verify[k] + catch-up) + (1 - P) * decode_one,
    P = 1 - (1 - m)^n                                   (some sequence of the batch has a proposal)

draft[k] is a model drafter's k forwards or n-gram's host lookup (spent whether or not it finds a
match); verify[k] the forward of k + 1 tokens per sequence; catch-up a model drafter's one-token
forward after a fully accepted round; decode_one a plain one-token step, which is what the engine
runs when no sequence has a proposal (worker.py), not a verify. k = 0 costs a plain decode step
(per token of the multi-step decode where the engine runs one). The table is measured by the
engine at startup, in SpecDecodeWorker's constructor (step_costs.py), never inside a request; it
times the forwards alone. Each engine decode step's wall time then calibrates it (StepOverheads):
per batch size, the median of what plain tokens, verify rounds and rounds without a proposal took
beyond the table is added to that kind's cost, so per-step host work (scheduling, the drafter's
bookkeeping, appending tokens), which a multi-step plain decode pays once for several tokens and a
speculative round once for its few, counts. k > 0 must beat plain decoding by MIN_GAIN, so a tie
decodes plainly.

Match and acceptance are decayed counts with a prior (PRIOR_MATCH, PRIOR_RATE over PRIOR_TRIALS
pseudo-trials): a round without a proposal lowers m only, not a_0, so an n-gram drafter whose
matches are rare but right keeps speculating (its misses cost a plain step and a lookup), while one
whose proposals are rejected stops. A new engine speculates (WARMUP_TRIALS sequence-steps at k_max
whatever the costs say) and then follows the workload. While k* = 0 an n-gram drafter is still
observed: after a plain step one greedy row's lookup is compared with the tokens the step made (the
target's own, so exactly what a verify would have accepted; worker.py), so the policy returns to
speculation when matches do. Those lookups run on the host between two steps, the device idle (~2%
of a plain step at batch 1 on the H200), so they get a share of the plain steps' measured time,
spent at their own measured cost (``lookup_due``): LOOKUP_SHARE_NEAR while speculation might pay (a
match rate LOOKUP_Z standard errors above the estimate, or the long-memory one, ``long_match``,
which remembers a workload's matches through a stretch without them, would choose k > 0),
LOOKUP_SHARE_FAR once neither would. A model drafter's round would cost its forwards, so there
every ``probe_interval`` plain steps one step speculates at k_max to refresh the estimate; the
interval doubles (PROBE_MIN..PROBE_MAX) each time a probe leaves k* at 0, and returns to PROBE_MIN
once speculation pays again, so a drafter that never pays costs at most one probe per PROBE_MAX
steps. An n-gram drafter's lookups show what its probes would, so its probes start and stay at
PROBE_MAX (a probe at a batch of 16 with rounds leaves the fixed batch's sequences uneven, which
costs more than the probe's own step). Which k runs never changes greedy output: every k is verified
losslessly. A Medusa drafter (medusa.py) reads the target's hidden state of the latest verify,
which plain steps do not leave: its first round after them proposes nothing and only makes the
features, observed as nothing, and the step after runs the same k again (``k_again``), so a probe
still gathers its evidence.

With ``num_rounds`` R (rounds.py) a k_max step of a batch the rounds runner takes runs R device-
resident rounds with one host sync: step_seconds costs it per round from the startup table's
``rounds`` (a rounds step's time / R, every row verifying k_max + 1 tokens whether or not it
matched, so no decode_one term), calibrated by the "rounds" overhead, against the same expected
tokens per round; smaller k still cost one round through the host. The rounds' real proposals
(rounds.py: a row without a match proposed nothing) are observed round by round, plain steps'
lookups and the probes as above. A speculative step of a batch, rounds or one round, is costed by
the tokens of its slowest sequence, not the mean one (RowSpread: the lasting spread of the
sequences' tokens per round, from rounds steps two apart and from each one-round step's tokens
against each sequence's rounds ROUND_LAG and more before, counted once SPREAD_Z standard errors
above none): a batch whose sequences want the same length waits for its slowest, and the steps
after the others finished carry few rows at nearly a full step's cost. Until RowSpread
has that evidence, a rounds step is costed with the spread that chance alone gives sequences of the
same rates over HORIZON_STEPS rounds steps too (``horizon``, round_variance): a rounds step or two
at the start of a batch that then decodes plainly leaves its sequences that far apart (one round
leaves them a few tokens apart, so a one-round step is not).

What spec_policy_sim.py (a CPU replay of spec_bench's rows with the H200's cost table; arithmetic,
not a GPU measurement) found, 20 seeds: costing rounds by the mean sequence, even the true rates gave
gsm8k 0.93x at batch 16; the slowest-sequence costing, the lookups' time share, n-gram probes at
PROBE_MAX and the chance horizon bring every gsm8k row to 0.993-0.999x, and one-round wikitext at
batch 16 from 0.946x to 0.979x (its slowest-sequence oracle: 1.0x; what is left is learning), the
other wikitext rows within 0.2% (streaky batch 4 with rounds: 1.55x, from 1.59x). The tables, and
what each constant traded (a chance horizon for one-round steps, no SPREAD_Z gate), are in
BENCHMARKS.md, eighteenth session.

``steps_by_k`` counts scheduled decode steps, not tokens: a k = 0 step of a greedy batch is a
multi-step decode of up to num_decode_steps tokens per sequence, a k > 0 step emits 1..k + 1.

The table's plain cost is a greedy batch's multi-step decode per token; a batch with sampled rows
(or with requests waiting) decodes one token per step, which costs more: until the calibration has
seen such steps the policy errs towards plain decoding there, leaving a gain unused rather than
taking a loss it could see."""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence as Seq

PRIOR_RATE = 0.8  # a distilled drafter's typical per-position acceptance (the H200 eval's: 0.72)
PRIOR_MATCH = 1.0  # a drafter proposes when asked until seen otherwise (a draft model always does)
PRIOR_TRIALS = 2.0  # the prior's weight, in sequence-steps
DECAY = 0.95  # per observed step: the estimate remembers about the last 20 steps
WARMUP_TRIALS = 8  # sequence-steps speculated at k_max before the costs decide
MIN_GAIN = 1.02  # speculation must beat plain decoding by this factor (within measurement noise)
PROBE_MIN, PROBE_MAX = 16, 256  # plain steps between probes while k* = 0
# Plain steps' n-gram lookups (worker.py _unrun_round) may take this share of the plain steps' time:
# NEAR while speculation might pay (a match rate LOOKUP_Z standard errors above the estimate, or the
# long-memory one, would choose k > 0), FAR once neither would (SpecPolicy.lookup_due).
LOOKUP_SHARE_NEAR, LOOKUP_SHARE_FAR, LOOKUP_Z = 0.03, 0.001, 1.25
LONG_DECAY = 0.995  # the long-memory match rate's (AcceptanceEstimate.long_match): ~200 sequence-steps
# Until RowSpread has evidence, a rounds step is costed with the spread chance gives the batch's
# sequences over this many rounds steps (SpecPolicy.horizon). In the replay 1 (the step alone) cost
# wikitext's rounds at batch 4 (1.60x from 1.68x), 4 let gsm8k's first rounds steps at 16 through.
HORIZON_STEPS = 2
# RowSpread compares a one-round step's tokens with each sequence's mean over its rounds at least
# this many before (a streak of matches, ~0.6 a round in the replay's "~" rows, has faded to ~2%).
ROUND_LAG = 8
# RowSpread's spread counts once its evidence is this many standard errors above none: a spread
# that noise made (one round's tokens vary far more than the sequences' rates) turned batches of 4
# plain in the replay, and plain steps add no evidence to take it back (one round at batch 4, 20
# seeds: with none wikitext 1.21x, at 3 the streaky one 1.24x, at 4 1.33x / 1.28x as before). Its
# standard error takes the covariances as independent, which a streak's consecutive rounds are not.
SPREAD_Z = 4.0
SPREAD_PRIOR = 8.0  # RowSpread's prior of no spread, in degrees of freedom of the covariances
OVERHEAD_WINDOW = 16  # engine steps per batch size and kind whose median overhead is used

# Seconds added to (a plain token, a verify round, a round without proposals, a round of a rounds step).
Overhead = tuple[float, float, float, float]
NO_OVERHEAD: Overhead = (0.0, 0.0, 0.0, 0.0)


@dataclass
class StepCosts:
    """Seconds per decode step, per measured batch size (ascending); a batch of n sequences costs
    what the smallest measured size >= n does (a CUDA graph bucket pads n up to its size)."""

    batch_sizes: list[int]
    decode: list[float]  # plain decoding, per token of one sequence's (multi-step) decode step
    draft: dict[int, list[float]]  # by k: drafting k tokens per sequence (n-gram: the host lookup)
    verify: dict[int, list[float]]  # by k: the verify forward of k + 1 tokens per sequence
    catch_up: bool = True  # a draft model forwards one token first after a fully accepted round
    measure_s: float = 0.0  # what measuring took at startup
    # A plain step of one token per sequence: a round in which no sequence has a proposal. Empty:
    # the engine decodes one token per step anyway (num_decode_steps 1), so ``decode``.
    decode_one: list[float] = field(default_factory=list)
    # num_rounds R > 1 (rounds.py): per round, a step of R device-resident rounds at k_max, for the
    # first len(rounds) batch sizes (those the rounds runner takes); a k_max step of a batch that
    # size runs such rounds. Empty: k_max speculates one round like any k.
    rounds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.batch_sizes)
        if n == 0 or sorted(self.batch_sizes) != list(self.batch_sizes) or len(self.decode) != n:
            raise ValueError("StepCosts: ascending batch_sizes, and a decode cost for each")
        if self.decode_one and len(self.decode_one) != n:
            raise ValueError("StepCosts: a one-token decode cost for each batch size, or none")
        if len(self.rounds) > n:
            raise ValueError("StepCosts: a rounds cost for at most every batch size")
        if not self.verify or sorted(self.draft) != sorted(self.verify) or any(
                len(v) != n for v in (*self.verify.values(), *self.draft.values())):
            raise ValueError("StepCosts: a draft and a verify cost per batch size for every k")

    def index(self, n: int) -> int:
        return next((i for i, b in enumerate(self.batch_sizes) if b >= n), len(self.batch_sizes) - 1)

    @property
    def k_max(self) -> int:
        return max(self.verify)

    def step_seconds(self, n: int, k: int, p_full: float = 0.0, p_any: float = 1.0,
                     overhead: Overhead = NO_OVERHEAD) -> float:
        """One step of n sequences at k (0: plain decoding, per token). ``p_full``: the chance that
        all k drafts of a round are accepted, when a draft model then catches up one token before
        drafting. ``p_any``: the chance that some sequence has a proposal; otherwise the round is
        the drafting plus a plain one-token step, no verify. ``overhead``: what the engine's steps
        of each kind took beyond this table (StepOverheads). A k_max step of a batch the rounds
        runner takes costs a round of it (every row verifies k + 1 tokens, match or not)."""
        i = self.index(n)
        if k == 0:
            return self.decode[i] + overhead[0]
        if self.in_rounds(n, k):
            return self.rounds[i] + overhead[3]
        catch_up = p_full * self.draft[1][i] if self.catch_up else 0.0
        verify = catch_up + self.verify[k][i] + overhead[1]
        return self.draft[k][i] + p_any * verify + (1.0 - p_any) * (self.decode_one_at(i) + overhead[2])

    def decode_one_at(self, i: int) -> float:
        return (self.decode_one or self.decode)[i]

    def in_rounds(self, n: int, k: int) -> bool:
        """Whether a step of n sequences at k runs device-resident rounds (costed per round)."""
        return k == self.k_max and n <= self.batch_sizes[-1] and self.index(n) < len(self.rounds)

    def as_dict(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes), "decode_s": list(self.decode),
                "draft_s": {str(k): list(v) for k, v in sorted(self.draft.items())},
                "verify_s": {str(k): list(v) for k, v in sorted(self.verify.items())},
                "decode_one_s": list(self.decode_one or self.decode), "catch_up": self.catch_up,
                "rounds_s": list(self.rounds), "measure_s": self.measure_s}


def expected_tokens(rates: Seq[float], k: int) -> float:
    """Tokens a sequence emits in a round of k drafts: 1 + sum_{j<k} prod_{i<=j} rates[i]."""
    total, reach = 1.0, 1.0
    for a in rates[:k]:
        reach *= a
        total += reach
    return total


def round_variance(rates: Seq[float], k: int, match: float = 1.0) -> float:
    """The variance of a sequence's tokens in a round of k drafts (1 + the accepted drafts, 1 without
    a proposal), rounds independent: what sequences of the same rates differ by, by chance."""
    mean = 1.0 + match * (expected_tokens(rates, k) - 1.0)
    second, reach = 1.0 - match, match  # E[t^2]: t = 1 + a with a the accepted drafts
    for a in range(k + 1):
        stop = 1.0 - rates[a] if a < k else 1.0  # position a rejected (or all k accepted)
        second += reach * stop * (1 + a) ** 2
        reach *= rates[a] if a < k else 0.0
    return max(0.0, second - mean * mean)


def slowest_of(n: int) -> float:
    """How many standard deviations below the mean the lowest of n normal draws lies (about): the
    quantile 1 / (n + 1). 0 for one."""
    return -statistics.NormalDist().inv_cdf(1.0 / (n + 1)) if n > 1 else 0.0


def choose_k(rates: Seq[float], costs: StepCosts, n: int, k_max: int, min_gain: float = MIN_GAIN,
             match: float = 1.0, overhead: Overhead = NO_OVERHEAD, spread: float = 0.0,
             horizon: float = 0.0) -> int:
    """k* for a batch of n sequences: the k > 0 with the most expected tokens per second if it beats
    plain decoding's by ``min_gain``, else 0. ``match``: the rate at which a sequence's drafter
    proposes anything (``rates`` are given that it did); ``overhead``: StepOverheads.at(n).
    ``spread``: the standard deviation between the batch's sequences of their tokens per round
    (RowSpread); a step of n > 1 is costed by the tokens of the batch's slowest sequence, and a
    rounds step also by the spread chance gives its sequences over ``horizon`` rounds (none for a
    one-round step: one round leaves them a few tokens apart, a fraction of a plain step's tail)."""
    plain = 1.0 / costs.step_seconds(n, 0, overhead=overhead)
    p_any = 1.0 - (1.0 - match) ** n  # sequences taken as independent
    best_k, best = 0, plain * min_gain
    for k in range(1, min(k_max, costs.k_max) + 1):
        p_full = match * (expected_tokens(rates, k) - expected_tokens(rates, k - 1))  # m * prod of rates[:k]
        tokens = 1.0 + match * (expected_tokens(rates, k) - 1.0)
        if n > 1:  # a fixed batch waits for its slowest sequence, rounds step or one round
            rounds = horizon if costs.in_rounds(n, k) else 0.0
            chance = round_variance(rates, k, match) / rounds if rounds else 0.0
            tokens = max(1.0, tokens - slowest_of(n) * (spread * spread + chance) ** 0.5)
        rate = tokens / costs.step_seconds(n, k, p_full, p_any, overhead)
        if rate > best:
            best_k, best = k, rate
    return best_k


@dataclass
class AcceptanceEstimate:
    """Per draft position j, the rate at which it is accepted given positions < j were: decayed
    counts of trials (sequences asked for a token at j whose first j drafts were accepted) and hits
    (of those, j accepted too), with a Beta(PRIOR_RATE, PRIOR_TRIALS) prior; and the match rate, the
    share of sequences asked for drafts that proposed any (PRIOR_MATCH prior). A sequence that
    proposed nothing (n-gram without a match) is a match miss and no acceptance evidence; one that
    proposed fewer tokens than asked (its context ended) counts a miss at the first it lacked."""

    k_max: int
    prior_rate: float = PRIOR_RATE
    prior_trials: float = PRIOR_TRIALS
    decay: float = DECAY
    hits: list[float] = field(default_factory=list)
    trials: list[float] = field(default_factory=list)
    match_hits: float = 0.0
    match_trials: float = 0.0
    long_hits: float = 0.0  # the match counts again, decayed by LONG_DECAY (long_match)
    long_trials: float = 0.0
    num_observed: int = 0  # sequence-steps observed (undecayed)

    def __post_init__(self) -> None:
        self.hits = self.hits or [0.0] * self.k_max
        self.trials = self.trials or [0.0] * self.k_max

    def observe(self, asked: Seq[int], accepted: Seq[int], proposed: Seq[int] | None = None) -> None:
        """One speculative step: per sequence, the draft tokens it was asked for, how many were
        accepted and (None: as many as asked) how many its drafter proposed."""
        proposed = asked if proposed is None else proposed
        if not len(asked) == len(accepted) == len(proposed):
            raise ValueError(f"{len(asked)} draft limits, {len(proposed)} proposal counts and "
                             f"{len(accepted)} acceptance counts")
        self.hits = [h * self.decay for h in self.hits]
        self.trials = [t * self.decay for t in self.trials]
        self.match_hits *= self.decay
        self.match_trials *= self.decay
        self.long_hits *= LONG_DECAY
        self.long_trials *= LONG_DECAY
        for n, p, a in zip(asked, proposed, accepted):
            if not 0 <= a <= p <= n:
                raise ValueError(f"accepted {a} of {p} proposed of {n} asked-for draft tokens")
            if n == 0:
                continue
            self.num_observed += 1
            self.match_trials += 1.0
            self.long_trials += 1.0
            if p == 0:
                continue
            self.match_hits += 1.0
            self.long_hits += 1.0
            for j in range(min(n, a + 1, self.k_max)):  # positions 0..a reached; a < n was a miss
                self.trials[j] += 1.0
                self.hits[j] += j < a

    @property
    def rates(self) -> list[float]:
        p, w = self.prior_rate, self.prior_trials
        return [(h + p * w) / (t + w) for h, t in zip(self.hits, self.trials)]

    @property
    def match(self) -> float:
        w = self.prior_trials
        return (self.match_hits + PRIOR_MATCH * w) / (self.match_trials + w)

    @property
    def long_match(self) -> float:
        """The match rate over a longer memory (LONG_DECAY): what the workload gave before the latest
        stretch without matches (a continuation that copies nothing yet), which ``match`` forgets."""
        w = self.prior_trials
        return (self.long_hits + PRIOR_MATCH * w) / (self.long_trials + w)

    def hopeful_match(self, z: float) -> float:
        """The match rate ``z`` standard errors above the estimate (a binomial share's, over the decayed
        trials and the prior's), at most 1: what the evidence does not yet rule out. (Not the rates:
        they move only with matched rounds, few where matches are rare, and a hopeful bound on them
        too kept gsm8k's plain steps looking most of the time in the replay.)"""
        m = self.match
        return min(1.0, m + z * (m * (1.0 - m) / (self.match_trials + self.prior_trials)) ** 0.5)


class RowSpread:
    """How much the sequences of a batch differ in tokens per round of a rounds step, lastingly: a
    batch whose sequences all want the same length finishes with its slowest, and once the others
    have finished its steps carry few rows at nearly a full step's cost (the H200's gsm8k rows at
    batch 16, fixed k=4 and 8 rounds: 224 rounds for 256 tokens, 1.14 a round, where the mean
    sequence emitted about 1.5; spec_policy_sim.py: a policy costing rounds by the mean sequence
    lost ~7% there even with the true rates, one costing the slowest lost nothing). The variance of
    the sequences' own rates is the covariance, over the sequences of two consecutive rounds steps,
    of their mean tokens per round in each: chance and streaks within a step (a continuation copying
    a span matches round after round) do not carry over to the next step's rounds, a sequence's own
    rate does. Decayed like the acceptance counts, each covariance weighed by its degrees of freedom
    against a prior of none (SPREAD_PRIOR); 0 until rounds steps two apart shared three sequences.
    One-round speculative steps (num_rounds 1, the engine's default, or k < k_max) wait for the
    slowest too: each step's tokens per sequence against the sequence's mean over its rounds
    ROUND_LAG and more before (observe_round). One round varies by chance far more than a rounds
    step's mean, and a streak makes rounds steps' means vary too, so a spread counts only once it
    is SPREAD_Z standard errors above none."""

    def __init__(self, decay: float = DECAY) -> None:
        self.decay = decay
        self.weight = 0.0
        self.total = 0.0
        self.noise = 0.0  # total's variance, from the covariances' own (spread's standard error)
        # The two latest rounds steps' mean tokens per round, by sequence (older first).
        self.last: deque[dict[int, float]] = deque(maxlen=2)
        # One-round steps (observe_round), by sequence: its latest ROUND_LAG rounds' tokens, and the
        # sum and count of those before them.
        self.recent: dict[int, tuple[deque[int], float, int]] = {}

    def observe(self, ids: Seq[int], made: Seq[Seq[int]]) -> None:
        """One rounds step: per sequence (``ids``) that ran all of its rounds, the tokens each emitted."""
        now = {i: sum(m) / len(m) for i, m in zip(ids, made) if m}
        if len(self.last) == self.last.maxlen:  # two steps back: a streak across one step's end does not reach it
            self._add(self.last[0], now)
        self.last.append(now)

    def observe_round(self, ids: Seq[int], made: Seq[int]) -> None:
        """One speculative step of one round: per sequence (``ids``), the tokens it emitted (accepted
        + 1), against each sequence's mean over its rounds at least ROUND_LAG before (a streak has
        faded that far; its own rate has not): one round's tokens vary by chance far more than a
        rounds step's mean, and that mean grows more certain with every round. Sequences no longer
        in the batch are dropped."""
        now, before = {}, {}
        recent: dict[int, tuple[deque[int], float, int]] = {}
        for i, m in zip(ids, made):
            last, far, count = self.recent.get(i) or (deque(maxlen=ROUND_LAG), 0.0, 0)
            if count:
                now[i], before[i] = float(m), far / count
            if len(last) == ROUND_LAG:
                far, count = far + last[0], count + 1
            last.append(m)
            recent[i] = last, far, count
        self.recent = recent
        self._add(before, now)

    def _add(self, before: dict[int, float], now: dict[int, float]) -> None:
        """The covariance of ``before`` and ``now`` over the sequences in both (tokens far enough
        apart that chance and streaks do not reach across, a sequence's own rate does)."""
        both = [i for i in now if i in before]
        if len(both) >= 3:  # weighed by its degrees of freedom (3 rows say little, 16 more)
            x, y = [before[i] for i in both], [now[i] for i in both]
            cov, df = statistics.covariance(x, y), len(both) - 1
            self.weight = self.weight * self.decay + df
            self.total = self.total * self.decay + df * cov  # signed: chance cancels
            # A covariance of df degrees of freedom varies by (var x var y + cov^2) / df.
            noise = statistics.variance(x) * statistics.variance(y) + cov * cov
            self.noise = self.noise * self.decay ** 2 + df * noise

    @property
    def spread(self) -> float:
        """The standard deviation of the sequences' own tokens per round (the decayed covariances
        against SPREAD_PRIOR degrees of freedom of none), 0 until their sum is SPREAD_Z standard
        errors above 0: a spread noise made would turn a batch plain, and plain steps add no
        evidence to take it back."""
        if self.total <= SPREAD_Z * self.noise ** 0.5:
            return 0.0
        return (self.total / (self.weight + SPREAD_PRIOR)) ** 0.5


class StepOverheads:
    """What the engine's decode steps took beyond the startup table, per measured batch size and
    kind of step: plain (per token), a round with a verify, a round in which nothing was proposed,
    a round of a step of device-resident rounds (per round).
    The table times the forwards alone; an engine step also schedules, reserves and releases
    blocks, runs the drafter's bookkeeping and appends tokens, once per step (so a multi-step
    plain decode pays it once for several tokens, a speculative round once for its one to k + 1,
    a rounds step once for its R rounds).
    Each figure is the median of the last OVERHEAD_WINDOW residuals (a one-off stall does not
    move it), 0 before any step of that kind ran."""

    KINDS = ("plain", "verify", "unmatched", "rounds")

    def __init__(self, costs: StepCosts) -> None:
        self.costs = costs
        self.residuals = {kind: [deque(maxlen=OVERHEAD_WINDOW) for _ in costs.batch_sizes] for kind in self.KINDS}

    def observe(self, n: int, k: int, seconds: float, steps: int = 1, proposed: bool = True) -> None:
        """One engine decode step of n sequences that took ``seconds``: plain (k = 0) of ``steps``
        tokens per sequence, ``steps`` > 1 device-resident rounds at k, or a speculative round at k
        (``proposed``: some sequence had drafts)."""
        c, i = self.costs, self.costs.index(n)
        if k == 0:
            self.residuals["plain"][i].append(seconds / steps - c.decode[i])
        elif steps > 1:
            if c.in_rounds(n, k):
                self.residuals["rounds"][i].append(seconds / steps - c.rounds[i])
        elif proposed:
            self.residuals["verify"][i].append(seconds - c.draft[k][i] - c.verify[k][i])
        else:
            self.residuals["unmatched"][i].append(seconds - c.draft[k][i] - c.decode_one_at(i))

    def at(self, n: int) -> Overhead:
        i = self.costs.index(n)
        plain, verify, unmatched, rounds = (statistics.median(r[i]) if r[i] else 0.0 for r in self.residuals.values())
        return plain, verify, unmatched, rounds

    def as_dict(self) -> dict:
        return {kind: [statistics.median(r) if r else None for r in rows] for kind, rows in self.residuals.items()}


class SpecPolicy:
    """k per decode step (the scheduler's ``spec_k``) and what it observed, for one engine.
    ``calibrate``: weigh the engine's measured step times (observe_step) on top of ``costs``;
    False keeps ``costs`` the whole truth (a test's injected table). ``num_rounds``: the rounds of a
    rounds step (costs.rounds; horizon). ``lookups``: the drafter's rounds are observed after plain
    steps (n-gram: lookup_due), so probes, which those lookups stand in for, start at PROBE_MAX."""

    def __init__(self, k_max: int, max_batch_size: int, costs: StepCosts, calibrate: bool = True,
                 num_rounds: int = 1, lookups: bool = False) -> None:
        self.k_max, self.max_batch_size, self.costs = k_max, max_batch_size, costs
        self.num_rounds = num_rounds
        self.acceptance = AcceptanceEstimate(k_max)
        self.overheads = StepOverheads(costs) if calibrate else None
        self.spread = RowSpread()
        # A probe at batch 16 with rounds left the fixed batch's sequences uneven (a tail of plain steps
        # with few rows) and cost the replay's gsm8k rows 0.1-0.5% each time; the lookups see the matches.
        self.lookups = lookups
        self.probe_min = PROBE_MAX if lookups else PROBE_MIN
        self.probe_interval = self.probe_min
        self.plain_steps = 0  # since the last speculative step
        self.num_probes = 0
        self.lookup_credit = 0.0  # plain-step seconds' share not yet spent on lookups (lookup_due)
        self.lookup_s = 0.0  # the latest lookup's seconds (observe_lookup)
        self.num_lookups = 0
        self._near: tuple[tuple[int, int] | None, bool] = (None, True)  # lookup_due's latest verdict and its key
        # Decode steps the policy gave each k (0: plain; a step the pool lacks blocks for still decodes
        # plainly), and the latest k.
        self.steps_by_k = [0] * (k_max + 1)
        self.last_k = k_max

    def fresh(self) -> "SpecPolicy":
        """A new policy on the same costs and settings, with nothing learned (spec_bench's rows: one
        per batch size); the calibration starts over too."""
        return SpecPolicy(self.k_max, self.max_batch_size, self.costs, self.overheads is not None,
                          self.num_rounds, self.lookups)

    def k_for_step(self, n: int) -> int:
        """Draft tokens per sequence for a decode step of n sequences (0: decode plainly)."""
        if n > self.max_batch_size:
            return 0
        if self.acceptance.num_observed < WARMUP_TRIALS:
            k = self.k_max
        else:
            overhead = self.overheads.at(n) if self.overheads is not None else NO_OVERHEAD
            k = choose_k(self.acceptance.rates, self.costs, n, self.k_max, match=self.acceptance.match,
                         overhead=overhead, spread=self.spread.spread, horizon=self.horizon)
            if k == 0:
                self.plain_steps += 1
                if self.plain_steps >= self.probe_interval:
                    k, self.plain_steps = self.k_max, 0
                    self.num_probes += 1
                    self.probe_interval = min(2 * self.probe_interval, PROBE_MAX)
            else:
                self.plain_steps, self.probe_interval = 0, self.probe_min
        self.steps_by_k[k] += 1
        self.last_k = k
        return k

    def lookup_due(self, n: int, seconds: float) -> bool:
        """Whether the plain step of n sequences just taken (``seconds``) is followed by one row's
        n-gram lookup (worker.py _unrun_round): the lookups may spend LOOKUP_SHARE_NEAR of the plain
        steps' time while an estimate LOOKUP_Z standard errors more hopeful would speculate, and
        LOOKUP_SHARE_FAR once even that would not (a lookup between two steps leaves the device
        idle: at 2% of a plain step each, observing every step lost more than the policy's learning
        did). The credit carries over between plain steps and is spent by a lookup's own measured
        time, so a lookup that grows with the context is taken less often."""
        key = (n, self.acceptance.num_observed)  # the estimate moves only with an observation
        if self._near[0] != key:
            a = self.acceptance
            overhead = self.overheads.at(n) if self.overheads is not None else NO_OVERHEAD
            self._near = key, any(choose_k(a.rates, self.costs, n, self.k_max, match=m, overhead=overhead,
                                           spread=self.spread.spread, horizon=self.horizon) > 0
                                  for m in (a.hopeful_match(LOOKUP_Z), a.long_match))
        self.lookup_credit += (LOOKUP_SHARE_NEAR if self._near[1] else LOOKUP_SHARE_FAR) * seconds
        if self.lookup_credit < self.lookup_s:
            return False
        self.lookup_credit = 0.0  # no banking: a long far stretch does not buy a burst of lookups
        return True

    def observe_lookup(self, seconds: float) -> None:
        """A plain step's lookup took ``seconds`` (host time, the device idle): what the next costs."""
        self.lookup_s = seconds
        self.num_lookups += 1

    @property
    def horizon(self) -> float:
        """choose_k's: the rounds over which chance spreads a batch's sequences in a rounds step. Until
        RowSpread has covariances (rounds steps two apart, or one-round steps ROUND_LAG apart), a
        rounds step is costed as one alone (num_rounds: the plain steps after it leave the spread
        chance gave it for the batch's tail); after, the lasting spread alone."""
        return 0.0 if self.spread.weight else float(self.num_rounds) * HORIZON_STEPS

    def k_again(self, n: int) -> int:
        """The latest k once more (0 past max_batch_size), for the step after a round that observed
        nothing: a Medusa drafter has no features after plain steps, so the round of a probe only
        makes them, and the probe's evidence comes from this one."""
        k = self.last_k if n <= self.max_batch_size else 0
        self.steps_by_k[k] += 1
        self.last_k = k
        return k

    def observe(self, asked: Seq[int], accepted: Seq[int], proposed: Seq[int] | None = None) -> None:
        self.acceptance.observe(asked, accepted, proposed)

    def observe_rows(self, ids: Seq[int], made: Seq[Seq[int]]) -> None:
        """A rounds step's tokens per sequence and round (RowSpread.observe)."""
        self.spread.observe(ids, made)

    def observe_tokens(self, ids: Seq[int], made: Seq[int]) -> None:
        """A one-round speculative step's tokens per sequence, accepted + 1 (RowSpread.observe_round)."""
        self.spread.observe_round(ids, made)

    def observe_step(self, n: int, k: int, seconds: float, steps: int = 1, proposed: bool = True) -> None:
        """An engine decode step's wall time (StepOverheads.observe); steps past max_batch_size,
        which the policy does not decide, are left out."""
        if self.overheads is not None and n <= self.max_batch_size:
            self.overheads.observe(n, k, seconds, steps, proposed)

    def as_dict(self) -> dict:
        return {"policy": "auto", "last_k": self.last_k, "steps_by_k": list(self.steps_by_k),
                "num_probes": self.num_probes, "probe_interval": self.probe_interval,
                "num_lookups": self.num_lookups,
                "acceptance_estimate": self.acceptance.rates, "match_estimate": self.acceptance.match,
                "row_spread": self.spread.spread,
                "costs": self.costs.as_dict(),
                "overhead_s": self.overheads.as_dict() if self.overheads is not None else None}

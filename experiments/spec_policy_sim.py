"""CPU replay of the ``auto`` k policy (engine/spec_decode/policy.py) on a described workload: what a
spec_bench ``speed`` row would give, without a GPU.

A workload is a match rate (the share of a sequence's rounds in which the n-gram lookup proposes;
each prompt has its own, 0.5x..1.5x the mean: Workload.row_match) and per-position conditional
acceptance rates (position j accepted given 0..j-1 were), drawn per row and round independently,
or (the "~" workloads) in streaks, as a continuation copying a span of its context matches (a streak
runs in the text: a plain step's tokens advance it as the rounds they would have taken). The step
costs are the engine's startup table (StepCosts) plus what each kind of engine step really took
beyond it (the engine's scheduling, appends: the H200 policies' ``overhead_s``), which the policy's
calibration learns from observe_step as in the engine. A row runs as spec_bench's ``_speed_variant``
does: a fresh policy per batch size, an untimed warm-up generation of 8 tokens of the first batch,
then ``repeats`` timed runs, each generating the 16 prompts in batches of n one after another, 256
tokens each. The engine's steps are modelled as the scheduler and worker run them: a plain step of
a greedy batch decodes up to 8 tokens per sequence, after which, when the policy's lookup_due says
so, one row's n-gram round is observed (worker.py's _unrun_round; its host time LOOKUP_S is given to
observe_lookup and reported as the step kind "lookup"); k > 0 runs one round through the host (each
row's tokens, accepted + 1, given to observe_tokens as worker.py's _record does), or,
with ``--rounds`` R and k = k_max, R device-resident rounds at the rounds table's cost per round.
Sequences leave the batch when they reach 256 tokens (so a batch shrinks after speculative steps).

Reports per batch size the expected speedup over the plain engine (mean and min over seeds) and
where the time went: warm-up (the policy had too little evidence), probes, steps the estimate
chose, plain steps (what they lose is the tail of a batch whose sequences speculative steps left
uneven) and the plain steps' lookups, each with the seconds it lost (or won) against decoding the
same tokens plainly. The Oracle takes no lookups (it knows the rates).

    PYTHONPATH=. python experiments/spec_policy_sim.py [--policy FILE] [--rounds 8] [--seeds 20]

``--policy FILE``: a policy.py to replay instead of the engine's (e.g. ``git show REV:engine/
spec_decode/policy.py > /tmp/old.py`` for a before/after); ``oracle`` / ``oracle-slowest``: choose_k
on the truth (Oracle), to part what learning costs from what the choice itself costs. ``--cold``:
without the untimed warm-up generation, so a fresh engine's warm-up is in the timed runs.

What it found (2026-11-30, the H200 table): the learning (warm-up at k_max, probes) cost gsm8k-like
rows under 0.5% of a run, cold or not; the plain steps' lookups ~0.7%; the old policy's gap to
choices on the true rates ~0.5-2%. The large loss was at batch 16 with rounds (0.93x): a rounds
step costed by the mean sequence, which pays there, while the batch waits for its slowest sequence
(oracle on the mean: 0.93x too; on the slowest: 1.0x) -> policy.RowSpread (0.97x). What was left
(10 seeds): the lookups (every plain step for 8 after speculating, then every 4th: 0.5-1% of a run,
~2% of a plain step each at batch 1), probes (0.1-0.5%), and at batch 16 with rounds the tail of
plain steps a fixed batch ran after a probe or the first rounds steps (before RowSpread knew the
spread) left its sequences uneven (2-4%) -> the lookups' time share (near / far), n-gram probes at
PROBE_MAX, a rounds step costed with chance's spread until RowSpread has evidence (20 seeds): gsm8k
0.994-0.999 on every row (0.964-0.991 before; --cold 0.993-0.997), wikitext within 0.2% of before;
the streaky wikitext at batch 4 with rounds 1.55x (1.59x). With the chain standing still between lookups (before
the streak ran in the text) looking less often had looked far worse on the "~" rows than it is.
One round per step (num_rounds 1, the default) at batch 16: wikitext 0.946x (streaks 0.952x), the
policy costing one-round steps by the mean sequence (oracle on the mean 0.96x, on the slowest 1.0x)
-> one-round steps' tokens per sequence to RowSpread (the replay passes them as worker.py does:
observe_tokens) and one-round steps costed by the slowest too, the spread counted once SPREAD_Z
standard errors above none: 0.979x (0.968x), --cold 0.981x (0.957x); gsm8k, batches 1 and 4 and the
rounds rows as before or better. The rest is the first batch's speculation before the spread has
evidence (policy.py's docstring)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import random
import statistics
import sys
from dataclasses import dataclass

from engine.spec_decode import policy as engine_policy
from engine.spec_decode.policy import StepCosts, expected_tokens

# The worker's unrun-round schedule before SpecPolicy.lookup_due, for a replayed policy.py without
# it: a lookup after each of the first 8 plain steps after a speculative one, then every 4th.
OLD_UNRUN_EAGER, OLD_UNRUN_EVERY = 8, 4


@dataclass
class Workload:
    name: str
    match: float  # share of rounds in which a sequence's lookup proposes
    rates: list[float]  # position j accepted given 0..j-1 were
    streak: float = 0.0  # how much a row's match repeats its last (0: independent rounds)

    def row_match(self, prompt: int, prompts: int = 16) -> float:
        """Prompt ``prompt``'s own match rate: spread 0.5x..1.5x the mean over the prompts, so that a
        batch waits for its least repetitive sequence as on the H200 (gsm8k's fixed-k rounds at batch
        16 ran 224 rounds for 256 tokens, ~1.14 a round, where the mean row emitted ~1.5)."""
        return min(0.98, self.match * (0.5 + prompt / (prompts - 1)))


# From the H200 run of 2026-11-30 (benchmarks/2026-11-30-h200x2-s16/g0/ngram_auto_rounds.jsonl), the fixed
# k=4 one-round rows at batch 1: the conditional rates from acceptance_per_position, the match rate
# from the tokens per step (gsm8k 4096 tokens in 2623 steps, wikitext in 1332).
GSM8K = Workload("gsm8k", 0.35, [0.627, 0.677, 0.721, 0.787])
WIKITEXT = Workload("wikitext", 0.64, [0.876, 0.944, 0.932, 0.974])
# The same with matches in streaks (a continuation copying a span of its context matches round
# after round): what makes a decayed estimate swing.
GSM8K_STREAKS = dataclasses.replace(GSM8K, name="gsm8k~", streak=0.6)
WIKITEXT_STREAKS = dataclasses.replace(WIKITEXT, name="wikitext~", streak=0.6)

# That run's startup table (the "policy" of its auto rows): SmolLM2-135M bf16, n-gram k_max 4.
H200_COSTS = StepCosts(
    [1, 2, 4, 8, 16],
    [0.000507, 0.000769, 0.000801, 0.000859, 0.000923],
    {k: [1.8e-5, 3.6e-5, 7.2e-5, 1.44e-4, 2.88e-4] for k in range(1, 5)},
    {1: [0.000912, 0.001009, 0.001047, 0.001161, 0.001542], 2: [0.000953, 0.001065, 0.001091, 0.001455, 0.001596],
     3: [0.000970, 0.001022, 0.001129, 0.001445, 0.001544], 4: [0.000925, 0.000971, 0.001426, 0.001485, 0.001582]},
    catch_up=False, decode_one=[0.000587, 0.000955, 0.000952, 0.001053, 0.001127],
    rounds=[0.000895, 0.000988, 0.001267, 0.001295, 0.001278])
# What the engine's steps took beyond the table, per size (plain per token, verify round, round
# without a proposal, per device-resident round): typical of the run's policies' overhead_s medians.
H200_OVERHEAD = [(3e-5, 2e-4, 2.5e-4, 3e-5), (3e-5, 2e-4, 3e-4, 5e-5), (4e-5, 3e-4, 3.3e-4, 8e-5),
                 (6e-5, 4e-4, 4e-4, 1.3e-4), (1e-4, 6e-4, 5e-4, 1.5e-4)]
LOOKUP_S = 9e-5  # an unrun round's host lookup (worker.py: ~90 us for a ~300-token context)


def _accepted(rng: random.Random, rates: list[float], k: int) -> int:
    a = 0
    while a < k and rng.random() < rates[a]:
        a += 1
    return a


class Sim:
    """One engine (its policy and worker state) through a spec_bench row; ``policy`` None: the plain engine."""

    def __init__(self, policy, work: Workload, rounds: int, seed: int, costs: StepCosts = H200_COSTS,
                 overhead=H200_OVERHEAD, decode_steps: int = 8) -> None:
        self.policy, self.work, self.rounds, self.costs, self.overhead = policy, work, rounds, costs, overhead
        self.rng = random.Random(seed)
        self.decode_steps = decode_steps
        self.plain_run = 0
        self.unrun_row = 0
        self.mod_warmup = getattr(engine_policy, "WARMUP_TRIALS", 0)  # a replayed module's: run_row
        # seconds, tokens, steps by why the step speculated (or "plain")
        self.by_reason: dict[str, list[float]] = {}

    def _reason(self, before_observed: int, before_probes: int, k: int) -> str:
        p = self.policy
        if k == 0:
            return "plain"
        if getattr(p, "last_reason", None):
            return p.last_reason
        if p.num_probes > before_probes:
            return "probe"
        return "warmup" if before_observed < self.mod_warmup else "chosen"

    def generate(self, prompts: list[int], tokens: int) -> float:
        """A batch of these prompts to ``tokens`` new tokens each; the seconds it took."""
        n = len(prompts)
        match = [self.work.row_match(q) for q in prompts]
        self.last = [False] * n  # whether row j's latest lookup matched (Workload.streak)
        self.since = [float("inf")] * n  # row j's tokens since that lookup's position
        self.per_round = [1.0 + m * (expected_tokens(self.work.rates, self.costs.k_max) - 1.0) for m in match]
        rem = [tokens] * n
        total = 0.0
        c, p, w = self.costs, self.policy, self.work
        k_max = c.k_max
        while True:
            live = [i for i in range(n) if rem[i] > 0]
            if not live:
                return total
            b = len(live)
            i = c.index(b)
            ov = self.overhead[i]
            if p is not None:
                p.live_match = [match[j] for j in live]  # read by Oracle alone
                obs, probes = p.acceptance.num_observed, p.num_probes
                k = p.k_for_step(b)
                reason = self._reason(obs, probes, k)
            else:
                k, reason = 0, "plain"
            emitted = 0
            if k > 0 and self.rounds > 1 and c.in_rounds(b, k) and max(rem) > 1:
                r = min(self.rounds, max(rem))
                made = {j: [] for j in live}
                for _ in range(r):
                    rows = [j for j in live if rem[j] > 0]
                    if not rows:
                        break
                    prop, acc, got = self._one_round(rows, k, match, rem, w.rates)
                    emitted += sum(got)
                    for j, a, g in zip(rows, acc, got):
                        if rem[j] > 0 or g == a + 1:
                            made[j].append(a + 1)
                    p.observe([k] * len(rows), acc, prop)
                if hasattr(p, "observe_rows"):  # the rows that ran every round (worker.py)
                    full = [j for j in live if len(made[j]) == r]
                    p.observe_rows([prompts[j] for j in full], [made[j] for j in full])
                seconds = r * (c.rounds[i] + ov[3])
                p.observe_step(b, k, seconds, steps=r)
                self.plain_run = 0
            elif k > 0:
                prop, acc, got = self._one_round(live, k, match, rem, w.rates)
                emitted += sum(got)
                if hasattr(p, "observe_tokens"):  # each row's tokens, accepted + 1 (worker.py _record)
                    p.observe_tokens([prompts[j] for j in live], [a + 1 for a in acc])
                any_prop = any(prop)
                seconds = c.draft[k][i] + (c.verify[k][i] + ov[1] if any_prop else c.decode_one_at(i) + ov[2])
                p.observe([k] * b, acc, prop)
                p.observe_step(b, k, seconds, proposed=any_prop)
                self.plain_run = 0
            else:
                steps = min(self.decode_steps, max(rem))
                new = {j: min(steps, rem[j]) for j in live}
                for j in live:
                    rem[j] -= new[j]
                    emitted += new[j]
                seconds = steps * (c.decode[i] + ov[0])
                if p is not None:  # worker.py record_step
                    p.observe_step(b, 0, seconds, steps)
                    self.plain_run += 1
                    if hasattr(p, "lookup_due"):
                        due = p.lookup_due(b, seconds)
                    else:
                        due = self.plain_run <= OLD_UNRUN_EAGER or self.plain_run % OLD_UNRUN_EVERY == 0
                    if due:  # its host time is its own step kind, "lookup"
                        look = self.by_reason.setdefault("lookup", [0.0, 0.0, 0.0])
                        sec = self._unrun(live, new, match)
                        look[0] += sec
                        look[2] += 1
                        total += sec
                for j in live:  # after the lookup, which drafts from the step's start
                    self.since[j] += new[j]
            total += seconds
            s = self.by_reason.setdefault(reason, [0.0, 0.0, 0.0])
            s[0] += seconds
            s[1] += emitted
            s[2] += 1

    def _one_round(self, rows: list[int], k: int, match: list[float], rem: list[int],
                   rates: list[float]) -> tuple[list[int], list[int], list[int]]:
        """One speculative round of ``rows`` at k: per row the drafts its lookup proposed (k or 0),
        those accepted, and the tokens it emitted (at most its ``rem``aining ones, taken off them)."""
        prop, acc, got = [], [], []
        for j in rows:
            m = self._match(j, match[j])
            a = _accepted(self.rng, rates, k) if m else 0
            prop.append(k if m else 0)
            acc.append(a)
            got.append(min(a + 1, rem[j]))
            rem[j] -= got[-1]
            self.since[j] += self.per_round[j]  # a round: the chain's step
        return prop, acc, got

    def _match(self, j: int, rate: float) -> bool:
        """Whether row j's lookup matches now: a two-state chain with stationary rate ``rate`` whose
        next state repeats the last with extra probability ``streak`` (0: independent draws) per
        round; a plain step's tokens count as the rounds they would have taken (the row's mean
        tokens per round at k_max): a lookup g rounds after the last matches with rate + (last -
        rate) * streak^g. The streak is the text's: it runs on while plain steps look at other rows
        or none (the chain once stood still between lookups, which made looking less often look
        worse on the "~" rows than it is)."""
        s = self.work.streak
        carry = s ** (self.since[j] / self.per_round[j]) if s else 0.0  # what the last state still says
        p = rate + ((1.0 if self.last[j] else 0.0) - rate) * carry
        self.last[j] = self.rng.random() < p
        self.since[j] = 0.0
        return self.last[j]

    def _unrun(self, live: list[int], new: dict[int, int], match: list[float]) -> float:
        """worker.py's _unrun_round: one row's lookup before the plain step's tokens, observed; its host time."""
        p, w = self.policy, self.work
        j = live[self.unrun_row % len(live)]
        self.unrun_row += 1
        k = min(p.k_max, new[j])
        m = self._match(j, match[j])
        p.observe([k], [_accepted(self.rng, w.rates, k) if m else 0], [k if m else 0])
        if hasattr(p, "observe_lookup"):
            p.observe_lookup(LOOKUP_S)
        return LOOKUP_S


class Oracle:
    """The policy's choice (choose_k) made with the truth: the workload's rates, the steps' real costs
    and a match rate of the live rows' own, their mean (what the policy estimates, perfectly) or the
    lowest (``slowest``: a batch whose rows all run to the same length finishes with its slowest, and
    the steps after the others finished carry few rows at nearly a full step's cost)."""

    def __init__(self, work: Workload, costs: StepCosts, slowest: bool) -> None:
        self.work, self.costs, self.slowest = work, costs, slowest
        self.k_max, self.num_probes, self.last_reason, self.live_match = costs.k_max, 0, "chosen", []
        self.acceptance = engine_policy.AcceptanceEstimate(costs.k_max)

    def k_for_step(self, n: int) -> int:
        m = min(self.live_match) if self.slowest else statistics.mean(self.live_match)
        return engine_policy.choose_k(self.work.rates, self.costs, n, self.k_max, match=m,
                                      overhead=H200_OVERHEAD[self.costs.index(n)])

    def observe(self, *args) -> None:
        pass

    def observe_step(self, *args, **kw) -> None:
        pass

    def lookup_due(self, n: int, seconds: float) -> bool:
        return False  # it knows the truth: plain steps' lookups would only cost


def run_row(mod, work: Workload, n: int, rounds: int, seed: int, k_max: int = 4, prompts: int = 16,
            tokens: int = 256, repeats: int = 2, max_batch_size: int = 16, cold: bool = False) -> tuple[float, dict]:
    """A spec_bench row: (the timed runs' speedup over the plain engine, seconds/tokens/steps by reason).
    ``cold``: no untimed warm-up generation (a fresh engine's first requests pay the policy's warm-up)."""
    costs = H200_COSTS if rounds > 1 else dataclasses.replace(H200_COSTS, rounds=[])  # one round: no rounds table
    if mod in ("oracle", "oracle-slowest"):
        policy = Oracle(work, costs, mod == "oracle-slowest")
    else:
        try:  # the engine's worker passes its num_rounds (a replayed policy.py may predate it)
            policy = mod.SpecPolicy(k_max, max_batch_size, costs, num_rounds=rounds, lookups=True)
        except TypeError:
            policy = mod.SpecPolicy(k_max, max_batch_size, costs)
    sim = Sim(policy, work, rounds, seed, costs)
    sim.mod_warmup = getattr(mod, "WARMUP_TRIALS", 0)
    plain = Sim(None, work, rounds, seed, costs)
    batches = [list(range(s, min(s + n, prompts))) for s in range(0, prompts, n)]
    if not cold:
        sim.generate(batches[0], 8)  # spec_bench's warm-up: untimed
    sim.by_reason = {}
    spec_s = sum(sim.generate(b, tokens) for _ in range(repeats) for b in batches)
    plain_s = sum(plain.generate(b, tokens) for _ in range(repeats) for b in batches)
    sim.plain_token_s = plain_s / (repeats * prompts * tokens)
    return plain_s / spec_s, {"by_reason": sim.by_reason, "plain_token_s": sim.plain_token_s, "spec_s": spec_s}


def load_policy(path: str | None):
    if path is None:
        return engine_policy
    if path in ("oracle", "oracle-slowest"):
        return path
    spec = importlib.util.spec_from_file_location("replayed_policy", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["replayed_policy"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def report(mod, work: Workload, n: int, rounds: int, seeds: int, cold: bool = False) -> dict:
    """Mean and min speedup over ``seeds`` rows, and the mean seconds each reason's steps lost against
    decoding their tokens at the plain engine's per-token time, as a share of the plain run."""
    speedups, lost, steps = [], {}, {}
    for s in range(seeds):
        speedup, info = run_row(mod, work, n, rounds, 1000 * s + n, cold=cold)
        speedups.append(speedup)
        plain_total = info["spec_s"] * speedup
        for reason, (sec, tok, cnt) in info["by_reason"].items():
            lost[reason] = lost.get(reason, 0.0) + (sec - tok * info["plain_token_s"]) / plain_total / seeds
            steps[reason] = steps.get(reason, 0.0) + cnt / seeds
    return {"mean": statistics.mean(speedups), "min": min(speedups), "lost": lost, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default=None, help="a policy.py to replay (default: the engine's), or 'oracle' / "
                    "'oracle-slowest' (Oracle: choose_k on the truth, the live rows' mean or lowest match rate)")
    ap.add_argument("--rounds", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--cold", action="store_true", help="no untimed warm-up generation before the timed runs")
    args = ap.parse_args()
    mod = load_policy(args.policy)
    for work in (GSM8K, GSM8K_STREAKS, WIKITEXT, WIKITEXT_STREAKS):
        for rounds in args.rounds:
            for n in args.batch:
                r = report(mod, work, n, rounds, args.seeds, args.cold)
                parts = "  ".join(f"{k}: {r['steps'][k]:.0f} steps {100 * v:+.1f}%"
                                  for k, v in sorted(r["lost"].items()))
                print(f"{work.name:8s} R={rounds} b{n:<3d} speedup {r['mean']:.3f} (min {r['min']:.3f})  "
                      f"time lost vs plain by step kind: {parts}")


if __name__ == "__main__":
    main()

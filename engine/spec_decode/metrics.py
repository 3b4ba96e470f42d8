"""Acceptance counters of speculative decoding, for the engine's stats, eval and the server's /metrics.

Per verify step and sequence: how many draft tokens it proposed and how many the target accepted.
Rates are derived from the counters, so a reader can also difference two snapshots."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence as Seq

import torch

from engine.staging import device_index


@dataclass
class SpecDecodeMetrics:
    num_drafts: int = 0  # (sequence, verify step) pairs that proposed at least one token
    num_proposed: int = 0  # draft tokens proposed
    num_accepted: int = 0  # of those, accepted
    num_emitted: int = 0  # tokens the verify steps emitted (accepted + one per sequence and step)
    # Index j: drafts that proposed a token at position j, and drafts whose token j was accepted.
    proposed_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0

    def record(self, num_proposed: Seq[int], num_accepted: Seq[int], num_emitted: Seq[int] | None = None) -> None:
        """One verify step: per sequence, tokens proposed and the accepted prefix's length, and
        (None: accepted + 1) the tokens its verify emitted: more where an n-gram round's verify
        accepted filler past the proposal (rounds.py), a token the target chose anyway."""
        if len(num_proposed) != len(num_accepted):
            raise ValueError(f"{len(num_proposed)} proposal counts but {len(num_accepted)} acceptance counts")
        emitted = [a + 1 for a in num_accepted] if num_emitted is None else num_emitted
        if len(emitted) != len(num_accepted):
            raise ValueError(f"{len(emitted)} emitted counts but {len(num_accepted)} acceptance counts")
        width = max(num_proposed, default=0)
        for counts in (self.proposed_per_position, self.accepted_per_position):
            counts.extend([0] * (width - len(counts)))
        for n, a, e in zip(num_proposed, num_accepted, emitted):
            if not 0 <= a <= n or e < a + 1:
                raise ValueError(f"accepted {a} of {n} proposed tokens, emitting {e}")
            self.num_emitted += e
            if n == 0:
                continue
            self.num_drafts += 1
            self.num_proposed += n
            self.num_accepted += a
            for j in range(n):
                self.proposed_per_position[j] += 1
            for j in range(a):
                self.accepted_per_position[j] += 1

    def add_time(self, phase: str, seconds: float) -> None:
        if phase not in ("draft", "verify"):
            raise ValueError(f"phase: {phase!r} is not 'draft' or 'verify'")
        setattr(self, f"{phase}_time_s", getattr(self, f"{phase}_time_s") + seconds)

    def add_phases(self, clock: "PhaseClock") -> None:
        """A speculative step's draft and verify time from its clock's three marks (after the step's sync)."""
        self.add_time("draft", clock.seconds(0, 1))
        self.add_time("verify", clock.seconds(1, 2))

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_proposed if self.num_proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per draft: accepted ones plus the target's own (vLLM's mean acceptance length)."""
        return 1.0 + self.num_accepted / self.num_drafts if self.num_drafts else 0.0

    @property
    def acceptance_per_position(self) -> list[float]:
        """Of the drafts that proposed a token at position j, the fraction whose token j was accepted."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted_per_position, self.proposed_per_position)]

    def as_dict(self) -> dict[str, float | int | list]:
        return {
            "num_drafts": self.num_drafts, "num_proposed_tokens": self.num_proposed,
            "num_accepted_tokens": self.num_accepted, "num_emitted_tokens": self.num_emitted,
            "acceptance_rate": self.acceptance_rate, "mean_accepted_length": self.mean_accepted_length,
            "accepted_per_position": list(self.accepted_per_position),
            "proposed_per_position": list(self.proposed_per_position),
            "acceptance_per_position": self.acceptance_per_position,
            "draft_time_s": self.draft_time_s, "verify_time_s": self.verify_time_s,
        }


class PhaseClock:
    """Marks between the phases of a speculative step. On a GPU they are CUDA events, read after the
    step's one sync: the draft hands its tokens to the verify on the device, so the host reaches
    the end of the draft after launching it, long before the GPU does. On the CPU, host time.

    One clock per worker, restarted each step (``start``): its events are created once and recorded
    on the stream looked up once per step by device index. A fresh Event per mark and torch's
    current-stream lookup inside ``Event.record()`` cost ~35 us a mark on the H200's host (cProfile,
    BENCHMARKS.md fourteenth session: ~110 us of a ~1.2 ms round on SmolLM2-135M, with the GPU idle)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.index = device_index(device)
        self.events: list = []  # CUDA events, reused step after step
        self.marks: list = []
        self.stream = None

    def start(self) -> "PhaseClock":
        """Begin a step: forget the last step's marks and take mark 0 now."""
        self.marks = []
        if self.cuda:
            self.stream = torch.cuda.current_stream(self.index)
        self.mark()
        return self

    def mark(self) -> None:
        if self.cuda:
            if len(self.marks) == len(self.events):
                self.events.append(torch.cuda.Event(enable_timing=True))
            event = self.events[len(self.marks)]
            event.record(self.stream)
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self, i: int, j: int) -> float:
        """Time from mark i to mark j. On a GPU, read after the step's sync: mark j is then passed,
        or (a mark recorded after the sync) as good as passed, so waiting for it costs nothing."""
        if self.cuda:
            self.marks[j].synchronize()
            return self.marks[i].elapsed_time(self.marks[j]) / 1e3
        return self.marks[j] - self.marks[i]

"""What spec_bench's speed rows record about how each timed run went, and its ``--check``: is the
no-speculation baseline measured like the speculative rows it divides?

The twelfth H200 lease measured the plain engine at 1198 tok/s on wikitext at batch 1 while the
speculative engine with drafting off ran 1960 in the same process, and every wikitext speed-up was
measured against the 1198. Nothing in a row could say why. Now each timed run records its engine
steps (forwards scheduled: plain, multi-step and speculative ones) and prompt tokens computed (not
served by the prefix cache), its wall time and the share of it this process spent on the CPU, and
each row what else the machine was doing when it began (load average, processes on the GPU).
With ``--check`` every speculative engine is also timed with drafting off (k 0: the engine running
plain steps, as the auto policy does where speculation does not pay), the plain engine is timed
again after every drafter, and one ``check`` row per batch size compares them (``check_rows``)."""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from typing import Any

# Counters of one timed run that the plain engine and a speculative engine with drafting off must
# agree on for the same requests: otherwise they do not run the same work.
SCHEDULE_KEYS = ("steps", "multi_steps", "spec_steps", "prefill_tokens")


def step_counters(llm: Any) -> tuple[int, int, int]:
    """The engine's (steps, multi-step decode steps, speculative steps) so far."""
    engine = llm.engine
    return engine.num_steps, engine.num_multi_steps, engine.num_spec_steps


class RunClock:
    """Wall and process CPU time of one timed generate call, and the engine steps it ran."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.steps = step_counters(llm) if hasattr(llm, "engine") else None
        self.cpu = time.process_time()
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def record(self, outputs: list, seconds: float) -> dict:
        """The run's record: ``cpu_per_wall`` near 1 is a host busy with this process (launches, or
        spinning on a sync); well below 1, the host ran something else meanwhile."""
        rec = {"wall_s": seconds, "cpu_per_wall": (time.process_time() - self.cpu) / seconds,
               "prefill_tokens": sum(len(o.prompt_token_ids) - o.num_cached_tokens for o in outputs)}
        if self.steps is not None:
            now = step_counters(self.llm)
            rec.update(steps=now[0] - self.steps[0], multi_steps=now[1] - self.steps[1],
                       spec_steps=now[2] - self.steps[2])
        return rec


def gpu_processes() -> int | None:
    """Processes with a context on this process's GPU (this one included), or None where NVML
    cannot say (no GPU, no pynvml)."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        text = torch.cuda.list_gpu_processes()
    except Exception:  # NVML missing or refusing: not knowing is an answer, not a failure
        return None
    if not text.startswith("GPU:"):
        return None
    return sum(line.startswith("process") for line in text.splitlines())


def host_state() -> dict:
    """When a row began (UTC), the host's 1-minute load average and the processes on the GPU:
    what a row from a shared machine needs to be read against the other jobs' logs."""
    return {"utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "loadavg_1m": os.getloadavg()[0], "gpu_processes": gpu_processes()}


def schedule_of(row: dict) -> list[tuple]:
    """The SCHEDULE_KEYS of each timed run of a speed row."""
    return [tuple(run.get(k) for k in SCHEDULE_KEYS) for run in row["runs"]]


def check_rows(rows: list[dict], tolerance: float = 0.10) -> list[dict]:
    """One ``check`` row per (workload, batch size) that has a plain row and a drafting-off (k 0)
    row: the plain engine's tok/s (first and, when there, its rerun after the drafters), each
    engine's with drafting off, whether they ran the same schedule, and a verdict:

    - ``schedule_differs``: an engine with drafting off ran other steps or prefill tokens than the
      plain one for the same requests (an engine difference the CPU tests should catch);
    - ``baseline_unstable``: the plain engine's two measurements disagree by more than
      ``tolerance``: the machine changed under the run (another job, clocks), and every speed-up
      against the first one is suspect;
    - ``plain_slower``: same schedule, a stable plain measurement, and an engine with drafting off
      faster by more than ``tolerance``: the plain engine has a slow path on this device;
    - ``off_slower``: an engine's plain steps cost more than ``tolerance`` over the plain engine's
      (the speculative engine's own overhead: its policy, its bookkeeping per step);
    - ``ok``."""
    out = []
    keys = dict.fromkeys((r["workload"], r["batch"]) for r in rows if r.get("k") == 0 and "tok_s" in r)
    for workload, bs in keys:
        at = [r for r in rows if r["workload"] == workload and r["batch"] == bs and "tok_s" in r]
        plain = [r for r in at if r["spec"] == "none"]
        off = [r for r in at if r["spec"] != "none" and r["k"] == 0]
        if not plain or not off:
            continue
        first = plain[0]
        plain_tok_s = [r["tok_s"] for r in plain]
        same = {r["spec"]: schedule_of(r) == schedule_of(first) for r in off}
        unstable = max(plain_tok_s) > (1 + tolerance) * min(plain_tok_s)
        fastest_off = max(r["tok_s"] for r in off)
        if not all(same.values()):
            verdict = "schedule_differs"
        elif unstable:
            verdict = "baseline_unstable"
        elif fastest_off > (1 + tolerance) * max(plain_tok_s):
            verdict = "plain_slower"
        elif (1 + tolerance) * min(r["tok_s"] for r in off) < min(plain_tok_s):
            verdict = "off_slower"
        else:
            verdict = "ok"
        out.append({"bench": "check", "workload": workload, "batch": bs, "verdict": verdict,
                    "plain_tok_s": plain_tok_s, "off_tok_s": {r["spec"]: r["tok_s"] for r in off},
                    "same_schedule": same, "plain_schedule": schedule_of(first),
                    "plain_utc": [r["host"]["utc"] for r in plain], "tolerance": tolerance})
    return out

"""The tensor-parallel group's teardown order: what captured its collectives (CUDA graphs) is released
while the group still exists, then the group goes. The other order hangs NCCL's communicator
destruction forever (pytorch/pytorch#115388): two-GPU engines never returned from close()."""

from __future__ import annotations

import torch.distributed as dist

from engine.parallel.group import before_destroy, destroy_group, init_group, tp_size


def test_releases_run_before_the_group_is_destroyed_and_only_once(tmp_path):
    init_group(0, 1, f"file://{tmp_path / 'rendezvous'}", "cpu", 30)
    seen: list[tuple[str, bool]] = []
    before_destroy(lambda: seen.append(("graphs", dist.is_initialized())))
    before_destroy(lambda: seen.append(("verify graphs", dist.is_initialized())))
    destroy_group()
    assert seen == [("verify graphs", True), ("graphs", True)]  # newest first, the group still up
    assert not dist.is_initialized() and tp_size() == 1
    destroy_group()  # a second close releases nothing again
    assert len(seen) == 2


def test_rank_0_leaves_the_group_beside_its_workers_not_after_them(monkeypatch):
    """On two H200s every worker exited only when terminated: its NCCL teardown waited for rank 0's,
    which came only after rank 0 had waited to join it."""
    from engine.parallel import workers

    events: list[str] = []

    class Worker:
        def join(self, timeout=None):
            events.append("join")

        def is_alive(self):
            return False

    class Channel:
        def send(self, message, alive, timeout_s=None):
            events.append(f"send {message}")

        def close(self):
            events.append("close")

    monkeypatch.setattr(workers, "destroy_group", lambda: events.append("destroy"))
    workers._stop([Worker(), Worker()], Channel())
    assert events[:3] == ["send None", "destroy", "join"]

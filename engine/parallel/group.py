"""The tensor-parallel process group of this process, and the collectives the model needs.

One group per process (rank 0 is the engine's process, ranks 1.. its workers): NCCL when the
engine runs on CUDA, gloo on the CPU. Rank r uses cuda:r. Before ``init_group`` (or with one rank)
this process is rank 0 of 1 and the collectives do nothing. ``group_for(1)`` gives a model that
runs whole on this rank alone (a tensor-parallel engine's draft model, on rank 0) collectives that
do nothing too."""

from __future__ import annotations

import contextlib
import datetime
from typing import Callable, Iterator

import torch
import torch.distributed as dist

_RANK = 0
_SIZE = 1
_BEFORE_DESTROY: list[Callable[[], None]] = []
# torch 2.13 renamed all_gather_into_tensor (same arguments) and deprecates the old name.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def tp_rank() -> int:
    return _RANK


def tp_size() -> int:
    return _SIZE


def init_group(rank: int, size: int, init_method: str, device_type: str, timeout_s: float) -> None:
    """Join the group (blocks until all ``size`` ranks did). ``timeout_s`` bounds each collective:
    a rank that died leaves the others an error, not a hang."""
    global _RANK, _SIZE
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    _RANK, _SIZE = rank, size
    if device_type == "cuda":
        # NCCL sets its communicator up on the first collective: do it now, never inside a
        # CUDA graph capture.
        all_reduce(torch.zeros(1, device="cuda"))
        torch.cuda.synchronize()


def before_destroy(release: Callable[[], None]) -> None:
    """Run ``release`` when this process leaves the group, before the group is destroyed. CUDA
    graphs that captured the group's collectives must be released first: NCCL's communicator
    destruction waits forever on a live captured graph (pytorch/pytorch#115388)."""
    _BEFORE_DESTROY.append(release)


def destroy_group() -> None:
    global _RANK, _SIZE
    while _BEFORE_DESTROY:
        _BEFORE_DESTROY.pop()()
    if dist.is_initialized():
        dist.destroy_process_group()
    _RANK, _SIZE = 0, 1


@contextlib.contextmanager
def group_for(size: int) -> Iterator[None]:
    """Build or run a model of ``size`` ranks inside: this process's group (size == tp_size()), or,
    with size 1 in a larger group, this rank alone: tp_size() is 1 and the collectives do nothing,
    so that a model not sharded (a draft model on rank 0) never waits on ranks that do not run it."""
    global _RANK, _SIZE
    if size == _SIZE:
        yield
        return
    if size != 1:
        raise ValueError(f"a model of {size} ranks in a process group of {_SIZE}")
    saved = _RANK, _SIZE
    _RANK, _SIZE = 0, 1
    try:
        yield
    finally:
        _RANK, _SIZE = saved


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the ranks, in place; returns x."""
    if _SIZE > 1:
        dist.all_reduce(x)
    return x


def all_reduce_min(value: int) -> int:
    """The smallest of every rank's ``value`` (a host integer)."""
    if _SIZE == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def broadcast_from_first(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's x on every rank, in place (every rank passes a contiguous x of the same shape and
    dtype); returns x."""
    if _SIZE > 1:
        dist.broadcast(x, src=0)
    return x


def all_gather_columns(x: torch.Tensor) -> torch.Tensor:
    """[n, c] on every rank -> [n, size * c]: rank r's columns at [r * c, (r + 1) * c)."""
    if _SIZE == 1:
        return x
    n, c = x.shape
    out = torch.empty(_SIZE * n, c, dtype=x.dtype, device=x.device)
    _all_gather(out, x.contiguous())
    return out.view(_SIZE, n, c).permute(1, 0, 2).reshape(n, _SIZE * c)

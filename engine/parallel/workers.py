"""The worker processes of a tensor-parallel engine, driven in lock step by rank 0.

Rank 0 (the engine's process) schedules; its model runner starts ranks 1.. with torch
multiprocessing's spawn, joins the process group with them, and before each step it runs sends
them the step (``send_step``): per sequence only what the forward reads (the chunk's tokens or
the last token, the block table, the computed count). Each worker's model runner runs the same
step on its shard, so that every rank reaches the same collectives in the same order, and samples
nothing: the logits are gathered on every rank and rank 0 samples. A multi-step decode advances
on every rank's device from the same gathered logits. A forward that is not a scheduled batch (a
speculative verify: spec_decode/verify_paths.py's VerifyStep) is a ``RunnerStep``: it travels as it
is and every rank runs ``step.run(runner)``. The workers' runners are built with rank 0's runner
arguments (``start_workers``), so that they hold the same verify graphs and buffers.

Workers always exit: on ``close`` (an exit message, then terminate if they do not), when rank 0's
process is gone (channel.py), when a collective fails or times out, and at interpreter exit (a
finalizer). A failure on any rank breaks the group: rank 0 closes it and raises."""

from __future__ import annotations

import os
import signal
import socket
import traceback
import weakref
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.distributed
import torch.multiprocessing as tmp

from engine.parallel.channel import StepChannel, WorkerExited
from engine.parallel.group import destroy_group, init_group

# Each collective (and the rendezvous) may wait this long for the slowest rank before it fails:
# long enough for a first step's kernel compilation, short enough that a lost rank ends the engine.
COLLECTIVE_TIMEOUT_S = 600.0
JOIN_TIMEOUT_S = 10.0
_IN_WORKER = False  # set in a worker process: its model runner starts no workers of its own


class TokenWindow:
    """The token ids of a sequence as far as one step's forward reads them: the sequence's length,
    and the tokens from ``start`` on (the chunk computed now, or the last token)."""

    def __init__(self, length: int, start: int, tokens: list[int]) -> None:
        self.length, self.start, self.tokens = length, start, tokens

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int | slice) -> int | list[int]:
        if isinstance(index, slice):
            lo, hi, step = index.indices(self.length)
            assert step == 1 and lo >= self.start, f"the step did not send tokens [{lo}, {hi})"
            return self.tokens[lo - self.start : hi - self.start]
        i = index + self.length if index < 0 else index
        assert i >= self.start, f"the step did not send token {index}"
        return self.tokens[i - self.start]


@dataclass
class StepParams:
    prompt_logprobs: int | None


@dataclass
class StepSequence:
    """What the model runner reads of a Sequence in one step."""

    seq_id: int
    token_ids: TokenWindow
    num_computed_tokens: int
    block_table: list[int]
    params: StepParams

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class RunnerStep:
    """A step other than a scheduled batch, described by what every rank's forward reads: rank 0
    sends it as it is, and each rank runs ``run(runner)`` (rank 0 with what only it holds)."""

    def run(self, runner: Any) -> Any:
        raise NotImplementedError


def step_message(batch: Any) -> Any:
    """The ScheduledBatch a worker runs: its sequences cut down to what the step reads (a
    RunnerStep as it is)."""
    if isinstance(batch, RunnerStep):
        return batch
    seqs = []
    for seq, n in zip(batch.seqs, batch.num_scheduled):
        length = len(seq.token_ids)
        start = seq.num_computed_tokens if batch.is_prefill else length - 1
        stop = start + n if batch.is_prefill else length
        seqs.append(StepSequence(seq.seq_id, TokenWindow(length, start, seq.token_ids[start:stop]),
                                 seq.num_computed_tokens, list(seq.block_table), StepParams(seq.params.prompt_logprobs)))
    return replace(batch, seqs=seqs)


class NullSampler:
    """A worker's sampler: rank 0 samples, the workers' tokens would be thrown away."""

    def sample_step(self, seqs: list, logits: torch.Tensor | None, rows: list[int] | None = None) -> Any:
        from engine.layers.sampler import StepResult

        return StepResult([[] for _ in seqs])

    def prompt_logprobs(self, seq: Any, logits: torch.Tensor, start: int, step: Any) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(rank: int, config: Any, runner_class: type, runner_kwargs: dict, init_method: str,
                 channel: StepChannel, threads: int) -> None:
    global _IN_WORKER
    _IN_WORKER = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: rank 0 decides
    torch.set_num_threads(threads)
    try:
        init_group(rank, config.tensor_parallel_size, init_method, config.torch_device.type, COLLECTIVE_TIMEOUT_S)
        runner = runner_class(config, **runner_kwargs)
        runner.sampler = NullSampler()
        while (step := channel.receive(rank - 1)) is not None:
            if isinstance(step, RunnerStep):
                step.run(runner)
            else:
                runner.run(step)
    except BaseException:
        traceback.print_exc()
        os._exit(1)  # no clean-up of a group whose peers may be gone: that could wait on them
    finally:
        channel.close()
    destroy_group()


def _stop(processes: list, channel: StepChannel, polite: bool = True) -> None:
    """Make sure the workers exit: ask them (``polite``), else or then terminate them."""
    if polite:
        try:
            channel.send(None, lambda: None, timeout_s=JOIN_TIMEOUT_S)
            # Leave the group beside the workers, not after them: NCCL's communicator teardown
            # waits for its peers, so a worker would wait for rank 0 while rank 0 waited to join it.
            destroy_group()
        except TimeoutError:
            pass  # a worker stuck in a collective: terminated below
    for p in processes:
        p.join(JOIN_TIMEOUT_S if polite else 0)
        if p.is_alive():
            p.terminate()
            p.join(JOIN_TIMEOUT_S)
        if p.is_alive():
            p.kill()
            p.join()
    channel.close()
    destroy_group()


def start_workers(config: Any, runner_class: type, **runner_kwargs: Any) -> "TensorParallelWorkers | None":
    """Rank 0 of a tensor-parallel engine: its workers, each running a
    ``runner_class(config, **runner_kwargs)`` (the model runner hands itself in: this module never
    imports it), started; None with one rank, and in a worker (it is started by rank 0)."""
    if config.tensor_parallel_size == 1 or _IN_WORKER:
        return None
    return TensorParallelWorkers(config, runner_class, runner_kwargs)


class TensorParallelWorkers:
    """Rank 0's side: ranks 1.. of ``config.tensor_parallel_size``, started and joined into the
    process group with this process as rank 0."""

    def __init__(self, config: Any, runner_class: type, runner_kwargs: dict | None = None) -> None:
        size, device = config.tensor_parallel_size, config.torch_device.type
        if torch.distributed.is_initialized():
            raise RuntimeError("tensor_parallel_size: this process already runs a tensor-parallel engine (or another "
                               "torch.distributed group); close it first (LLM.close())")
        ctx = tmp.get_context("spawn")
        max_blocks = -(-config.max_model_len // config.block_size)
        # A prefill step's tokens and every sequence's block table, pickled, with room to spare.
        nbytes = 16 * (config.max_num_batched_tokens + config.max_num_seqs * (max_blocks + 16)) + (1 << 20)
        self.channel = StepChannel(ctx, size - 1, nbytes)
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self.processes = [ctx.Process(target=_worker_main, name=f"shrink-tp-rank{r}", daemon=True,
                                      args=(r, config, runner_class, runner_kwargs or {}, init_method,
                                            self.channel, torch.get_num_threads()))
                          for r in range(1, size)]
        for p in self.processes:
            p.start()
        self._finalizer = weakref.finalize(self, _stop, self.processes, self.channel)
        self.broken = False
        try:
            init_group(0, size, init_method, device, COLLECTIVE_TIMEOUT_S)
        except BaseException:
            self.close(polite=False)
            raise

    def check_alive(self) -> None:
        for rank, p in enumerate(self.processes, start=1):
            if not p.is_alive():
                raise WorkerExited(f"tensor-parallel worker rank {rank} exited (code {p.exitcode})")

    def run(self, batch: Any, run: Callable[[Any], Any]) -> Any:
        """Send ``batch`` (a ScheduledBatch or a RunnerStep) to the workers, then run rank 0's part
        with ``run``; any failure closes the group (its ranks may be left waiting in a collective)
        and is raised."""
        if self.broken:
            raise WorkerExited("the tensor-parallel group was closed after a failure")
        try:
            self.channel.send(step_message(batch), self.check_alive)
            return run(batch)
        except BaseException:
            self.broken = True
            self.close(polite=False)  # the workers may wait in a collective that never completes
            raise

    def close(self, polite: bool = True) -> None:
        """Stop the workers (at once unless ``polite``); later calls do nothing."""
        if self._finalizer.detach() is not None:
            _stop(self.processes, self.channel, polite)

"""Data-parallel and sharded training through accelerate: the process group, FSDP2 for the frozen
teacher, and the full student gathered for saving.

`accelerate launch --config_file conf/accelerate/fsdp.yaml` (fsdp_version: 2) shards the student
through `accelerator.prepare` and the teacher through the same accelerate routine
(`fsdp2_prepare_model`: one FSDP unit per decoder layer, embedding/norm/LM head in their own), with
no optimizer state. `conf/accelerate/ddp.yaml` replicates both. Nothing here is a home-made
collective: accelerate and torch.distributed do the work.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["launched_world_size", "process_state", "main_process_first", "make_accelerator", "is_sharded", "gathered_head",
           "shard_frozen", "gathered_model", "reduce_mean", "describe"]


def launched_world_size() -> int:
    """How many processes the launcher (`accelerate launch`, torchrun) started; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _cpu_only() -> bool:
    # Without CUDA, accelerate joins a launcher's process group only with cpu=True (gloo).
    return not torch.cuda.is_available()


def process_state():
    """accelerate's process state (joins the launcher's process group on first use). Its `cpu` flag is
    the one `make_accelerator` uses, so the two never disagree."""
    from accelerate import PartialState

    return PartialState(cpu=_cpu_only())


def main_process_first():
    """A block the main process runs first and the others after it (they then read what it cached)."""
    from contextlib import nullcontext

    return nullcontext() if launched_world_size() == 1 else process_state().main_process_first()


def make_accelerator(grad_accum: int):
    """The Accelerator of a training run: bf16 autocast on a GPU, full precision on the CPU; DDP or
    FSDP2 as the launcher's config says."""
    from accelerate import Accelerator

    use_bf16 = torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision="bf16" if use_bf16 else "no", gradient_accumulation_steps=grad_accum,
                              cpu=_cpu_only())
    if _cpu_only() and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        _fsdp_on_cpu(accelerator)
    return accelerator


def _fsdp_on_cpu(accelerator) -> None:
    """accelerate keeps FSDP for GPU-like devices and silently falls back to DDP on CPU processes,
    although torch's FSDP2 (`fully_shard`) runs on gloo. Turn the FSDP request of the launcher's config
    back on, so that the sharded code path (and its checkpoints) is the one CPU tests exercise."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.num_processes < 2:
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* environment
    if plugin.fsdp_version != 2:
        from common.errors import ShrinkError

        raise ShrinkError(f"FSDP on CPU processes needs fsdp_version: 2 in the accelerate config "
                          f"(got {plugin.fsdp_version})")
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a module FSDP2 (`fully_shard`) has sharded: its parameters are DTensor shards."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gathered_head(head: torch.nn.Module) -> torch.nn.Module:
    """The LM head as a plain bias-free nn.Linear over its gathered weight, for the chunked loss.

    Under FSDP2 the head is an FSDP unit that accelerate does not reshard after the model's forward,
    so right after that forward its `.weight` is the full (unsharded) parameter, and gradients put
    into it are reduce-scattered by FSDP in backward. The loss must not call the FSDP module itself:
    a call outside the root's forward (the loss is recomputed in backward) re-runs FSDP's hooks out of
    order (it crashed gloo), and the fused loss takes only plain nn.Linear heads. Not sharded: `head`."""
    if not is_sharded(head):
        return head
    from torch.distributed.tensor import DTensor

    weight = head.weight
    if isinstance(weight, DTensor):
        raise RuntimeError("the FSDP2 LM head is resharded after the forward; the chunked loss needs it gathered "
                           "(accelerate's fsdp2_prepare_model keeps it so)")
    view = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")  # no storage, no init
    view.weight = weight
    return view


def shard_frozen(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """A frozen model (the teacher) ready for this run: sharded like the student under FSDP2 (no
    optimizer, so no optimizer state), else moved to the device whole."""
    model = model.eval().requires_grad_(False)
    if not accelerator.is_fsdp2:
        return model.to(accelerator.device)
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    # accelerate.prepare() takes one model with its optimizer under FSDP2; a frozen model has none,
    # so it goes through the routine prepare() itself uses for the model.
    return fsdp2_prepare_model(accelerator, model)


def gathered_model(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The trained model as an ordinary (unsharded) module on the main process, for saving; a
    collective, so every rank calls it. Other ranks get `model` back unchanged. Not sharded: `model`."""
    if not is_sharded(model):
        return model
    from transformers import AutoModelForCausalLM

    from train.modules import causal_lm

    state = accelerator.get_state_dict(model)  # full tensors on the main process only, on the CPU
    if not accelerator.is_main_process:
        return model
    config = causal_lm(model).config
    dtype = next(iter(state.values())).dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(state, strict=True)
    plain.tie_weights()
    return plain.train(model.training)


def reduce_mean(accelerator, values: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of each value (a step's loss parts), so the logged curve is the global
    batch's, as one process would log it. Every rank must pass the same keys."""
    if accelerator.num_processes == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist()))


def describe(accelerator: Any) -> str:
    """One line naming how this run is distributed."""
    kind = "FSDP2" if accelerator.is_fsdp2 else str(accelerator.distributed_type).split(".")[-1]
    return f"{kind} over {accelerator.num_processes} processes on {accelerator.device.type}"

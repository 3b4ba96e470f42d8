"""The sequential layer-by-layer driver, for a recipe (an ordered list of methods).

Only the embeddings and one transformer block are on the device at a time; the rest of the model
stays where it was loaded (CPU). The calibration segments are run up to the first block once and
their hidden states kept on the device; then, block by block: the linears of a block are
compressed in true-sequential groups (q/k/v, then o, then gate/up, then down), each group's input
statistics gathered by running the block with the groups before it already compressed; the
block's outputs, computed with all of it compressed, become the next block's inputs. So every
layer is calibrated on the outputs of the already-compressed layers before it. With several
methods (SmoothQuant then GPTQ), each runs on a block in recipe order before the block's outputs
move on: one pass over the model.

Device memory is therefore: hidden states (num_samples x seq_len x hidden, fp32), one block, one
group's statistics (a Hessian is in_features^2 fp32), and one batch's activations. For a 7B Llama
(hidden 4096, MLP 11008) with 128 x 2048 segments: 4.3 GB of hidden states, 0.8 GB for the fp32
block, 0.5 GB for the down_proj Hessian, a few GB of activations: well inside one 80 GB GPU.
"""

from __future__ import annotations

import fnmatch
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from common.errors import SettingError, ShrinkError

# True-sequential order within a Llama-family block, by the last part of the linear's name.
SEQUENTIAL_GROUPS = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]
NEVER_COMPRESSED = ("lm_head", "embed_tokens")
DEFAULT_SKIP = ("lm_head", "*embed_tokens")  # the skip list of prune and quantize by default
ON_INDIVISIBLE = ("skip", "error")


class _Stop(Exception):
    pass


class Stat(Protocol):
    def add(self, x: torch.Tensor) -> None: ...


class BlockMethod(Protocol):
    """One compression algorithm as the driver sees it (a recipe is a list of them)."""

    needs_data: bool
    true_sequential: bool

    def misfit(self, linear: nn.Linear) -> SettingError | None: ...
    def new_stat(self, name: str, linear: nn.Linear, total_tokens: int) -> Stat | None: ...
    def apply(self, block: nn.Module, prefix: str, names: list[str], stats: dict[str, Stat],
              report: "Report") -> None: ...


@dataclass
class Report:
    """What happened: per-linear details, skipped linears with reasons, keep masks (those of a
    sparse input, then those pruning adds) and their structure, peak memory."""

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    sparsity_structure: str | None = None
    peak_device_bytes: int | None = None
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"compressed_linears": len(self.layers), "skipped": dict(self.skipped),
                "peak_device_MiB": None if self.peak_device_bytes is None else self.peak_device_bytes / 2**20,
                "seconds": round(self.seconds, 2)}


@dataclass
class Plan:
    """Which linears of each block the recipe compresses, and why the others are left alone."""

    linears: list[list[str]]        # per block, names relative to the block
    skipped: dict[str, str]         # full name -> reason

    def skipped_line(self) -> str:
        """The skipped linears in one line: `model.layers.*.mlp.down_proj (30): reason; ...`."""
        counts: dict[tuple[str, str], int] = {}
        for name, reason in self.skipped.items():
            key = (re.sub(r"\.layers\.\d+\.", ".layers.*.", name), reason)
            counts[key] = counts.get(key, 0) + 1
        return "; ".join(f"{pattern} ({n}): {reason}" for (pattern, reason), n in counts.items())


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ShrinkError(f"{type(model).__name__}: expected a Llama-family causal LM with model.layers")
    return layers


def check_skip(skip: list[str]) -> None:
    """Embeddings and the LM head are never compressed by this version; say so if asked to."""
    for name in NEVER_COMPRESSED:
        if not any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(f"model.{name}", p) for p in skip):
            raise SettingError("skip", f"must list {name}: compressing embeddings or the LM head is not supported")


def is_skipped(name: str, skip: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in skip)


def sequential_groups(names: list[str], true_sequential: bool) -> list[list[str]]:
    if not true_sequential:
        return [names]
    groups, left = [], list(names)
    for suffixes in SEQUENTIAL_GROUPS:
        g = [n for n in left if n.rsplit(".", 1)[-1] in suffixes]
        if g:
            groups.append(g)
            left = [n for n in left if n not in g]
    if left:
        groups.append(left)
    return groups


def plan_compression(model: nn.Module, methods: Sequence[BlockMethod], skip: list[str],
                     on_indivisible: str = "skip") -> Plan:
    """The linears every method of the recipe can compress; checked before any work. A linear that
    does not fit is an error with on_indivisible=error, else left dense; none left is an error."""
    if on_indivisible not in ON_INDIVISIBLE:
        raise SettingError("on_indivisible", f"must be skip or error (got {on_indivisible!r})")
    check_skip(skip)
    plan = Plan([], {})
    misfits: list[SettingError] = []
    for i, block in enumerate(decoder_layers(model)):
        names = []
        for name, mod in block.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            full = f"model.layers.{i}.{name}"
            if is_skipped(full, skip):
                plan.skipped[full] = "in skip"
                continue
            why = next((e for e in (m.misfit(mod) for m in methods) if e is not None), None)
            if why is not None:
                if on_indivisible == "error":
                    raise SettingError("on_indivisible", f"is error and {full} does not fit: {why.setting} "
                                                         f"{why.message}; set it to skip to leave such linears dense")
                plan.skipped[full] = f"{why.setting}={why.message}"
                misfits.append(why)
                continue
            names.append(name)
        plan.linears.append(names)
    if not any(plan.linears):
        if misfits:
            raise SettingError(misfits[0].setting, f"no linear of this model fits it, nothing to compress: "
                                                   f"{plan.skipped_line()}")
        raise SettingError("skip", "leaves no linear to compress")
    return plan


def _layer_out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, ids: torch.Tensor, device: torch.device,
                         batch_size: int) -> tuple[list[torch.Tensor], list[dict]]:
    """Hidden states and keyword arguments that reach the first block, one entry per batch."""
    layers = decoder_layers(model)
    inner = model.model
    moved = [m for m in (getattr(inner, "embed_tokens", None), getattr(inner, "rotary_emb", None)) if m is not None]
    for m in moved:
        m.to(device)
    inputs, kwargs_list = [], []

    def grab(_mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append(hidden.detach())
        kwargs_list.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, ids.shape[0], batch_size):
            try:
                model(input_ids=ids[start:start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        for m in moved:
            m.to("cpu")
    return inputs, kwargs_list


def _gather_stats(block: nn.Module, method: BlockMethod, group: list[str], inputs: list[torch.Tensor],
                  kwargs_list: list[dict], total_tokens: int) -> dict[str, Stat]:
    """Run the block on its inputs with hooks on the group's linears; what each one saw."""
    stats: dict[str, Stat] = {}
    handles = []
    for name in group:
        linear = block.get_submodule(name)
        stat = method.new_stat(name, linear, total_tokens)
        if stat is not None:
            stats[name] = stat
            handles.append(linear.register_forward_hook(lambda _m, args, _out, s=stat: s.add(args[0].detach())))
    try:
        if handles:
            with torch.no_grad():
                for hidden, kw in zip(inputs, kwargs_list):
                    block(hidden, **kw)
    finally:
        for h in handles:
            h.remove()
    return stats


def compress_model(model: nn.Module, methods: Sequence[BlockMethod], calib_ids: torch.Tensor | None,
                   device: torch.device, *, skip: list[str], on_indivisible: str = "skip", batch_size: int = 8,
                   masks: dict[str, torch.Tensor] | None = None, log: Callable[[str], None] = print) -> Report:
    """Compress every eligible linear of every block in place with the recipe `methods`, block by
    block: each method in turn, group by group, then the block's outputs feed the next block.
    `masks`: keep masks of a sparse input, whose zeros quantizers preserve."""
    plan = plan_compression(model, methods, skip, on_indivisible)
    started = time.time()
    report = Report(masks=dict(masks or {}), skipped=dict(plan.skipped))
    uncompressed = {n: r for n, r in plan.skipped.items() if r != "in skip"}
    if uncompressed:
        warnings.warn(f"{len(uncompressed)} linears left uncompressed (on_indivisible=skip): "
                      f"{Plan([], uncompressed).skipped_line()}", stacklevel=2)
    layers = decoder_layers(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    needs_data = any(m.needs_data for m in methods)
    inputs: list[torch.Tensor] = []
    kwargs_list: list[dict] = []
    if needs_data:
        if calib_ids is None or calib_ids.numel() == 0:
            raise SettingError("calibration", "this recipe needs calibration data")
        inputs, kwargs_list = capture_block_inputs(model, calib_ids, device, batch_size)
    total_tokens = int(calib_ids.numel()) if calib_ids is not None else 0
    for i, block in enumerate(layers):
        t0 = time.time()
        prefix = f"model.layers.{i}"
        block.to(device)
        names = plan.linears[i]
        for method in methods:
            for group in sequential_groups(names, method.true_sequential):
                stats = (_gather_stats(block, method, group, inputs, kwargs_list, total_tokens)
                         if method.needs_data else {})
                method.apply(block, prefix, group, stats, report)
        if needs_data:
            with torch.no_grad():
                inputs = [_layer_out(block(hidden, **kw)) for hidden, kw in zip(inputs, kwargs_list)]
        block.to("cpu")
        log(f"  block {i + 1}/{len(layers)}: {len(names)} linears in {time.time() - t0:.1f}s")
    del inputs
    if device.type == "cuda":
        report.peak_device_bytes = int(torch.cuda.max_memory_allocated(device))
        torch.cuda.empty_cache()
    report.seconds = time.time() - started
    return report

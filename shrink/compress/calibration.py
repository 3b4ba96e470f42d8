"""The sequential layer-by-layer driver.

Only the embeddings and one transformer block are on the device at a time; the rest of the model
stays where it was loaded (CPU). The calibration segments are run up to the first block once and
their hidden states kept on the device; then, block by block: the linears of a block are
compressed in true-sequential groups (q/k/v, then o, then gate/up, then down), each group's input
statistics gathered by running the block with the groups before it already compressed; the
block's outputs, computed with all of it compressed, become the next block's inputs. So every
layer is calibrated on the outputs of the already-compressed layers before it.

Device memory is therefore: hidden states (num_samples x seq_len x hidden, fp32), one block, one
group's statistics (a Hessian is in_features^2 fp32), and one batch's activations. For a 7B Llama
(hidden 4096, MLP 11008) with 128 x 2048 segments: 4.3 GB of hidden states, 0.8 GB for the fp32
block, 0.5 GB for the down_proj Hessian, a few GB of activations: well inside one 80 GB GPU.
"""

from __future__ import annotations

import fnmatch
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import nn

from common.errors import ShrinkError

# True-sequential order within a Llama-family block, by the last part of the linear's name.
SEQUENTIAL_GROUPS = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]
NEVER_COMPRESSED = ("lm_head", "embed_tokens")


class _Stop(Exception):
    pass


class Stat(Protocol):
    def add(self, x: torch.Tensor) -> None: ...


class BlockMethod(Protocol):
    """One compression algorithm as the driver sees it."""

    needs_data: bool
    true_sequential: bool

    def fits(self, linear: nn.Linear) -> bool: ...
    def new_stat(self, name: str, linear: nn.Linear, total_tokens: int) -> Stat | None: ...
    def apply(self, block: nn.Module, prefix: str, names: list[str], stats: dict[str, Stat],
              report: "Report") -> None: ...


@dataclass
class Report:
    """What happened: per-linear details, skipped linears with reasons, masks, peak memory."""

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    peak_device_bytes: int | None = None
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"compressed_linears": len(self.layers), "skipped": dict(self.skipped),
                "peak_device_MiB": None if self.peak_device_bytes is None else self.peak_device_bytes / 2**20,
                "seconds": round(self.seconds, 2)}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ShrinkError(f"{type(model).__name__}: expected a Llama-family causal LM with model.layers")
    return layers


def check_skip(skip: list[str], key: str) -> None:
    """Embeddings and the LM head are never compressed by this version; say so if asked to."""
    for name in NEVER_COMPRESSED:
        if not any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(f"model.{name}", p) for p in skip):
            raise ShrinkError(f"{key} must list {name}: compressing embeddings or the LM head is not supported")


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


def _eligible(block: nn.Module, prefix: str, method: BlockMethod, skip: list[str], on_indivisible: str,
              key: str, report: Report) -> list[str]:
    names = []
    for name, mod in block.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        full = f"{prefix}.{name}"
        if is_skipped(full, skip):
            report.skipped[full] = "in skip list"
            continue
        if not method.fits(mod):
            msg = f"{full}: in_features={mod.in_features} does not fit the sparsity/group structure"
            if on_indivisible == "error":
                raise ShrinkError(f"{msg} ({key}.on_indivisible=error; set it to skip to leave such layers dense)")
            warnings.warn(f"{msg}; left uncompressed ({key}.on_indivisible=skip)")
            report.skipped[full] = "indivisible"
            continue
        names.append(name)
    return names


def compress_model(model: nn.Module, method: BlockMethod, calib_ids: torch.Tensor | None, device: torch.device,
                   *, skip: list[str], on_indivisible: str = "skip", batch_size: int = 8, key: str = "prune",
                   log: Callable[[str], None] = print) -> Report:
    """Compress every eligible linear of every block in place, in order, calibrating sequentially."""
    if on_indivisible not in ("skip", "error"):
        raise ShrinkError(f"{key}.on_indivisible must be skip or error (got {on_indivisible!r})")
    check_skip(skip, f"{key}.skip")
    started = time.time()
    report = Report()
    layers = decoder_layers(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    inputs: list[torch.Tensor] = []
    kwargs_list: list[dict] = []
    if method.needs_data:
        if calib_ids is None or calib_ids.numel() == 0:
            raise ShrinkError(f"{key}: this method needs calibration data ({key}.calibration)")
        inputs, kwargs_list = capture_block_inputs(model, calib_ids, device, batch_size)
    total_tokens = int(calib_ids.numel()) if calib_ids is not None else 0
    for i, block in enumerate(layers):
        t0 = time.time()
        prefix = f"model.layers.{i}"
        block.to(device)
        names = _eligible(block, prefix, method, skip, on_indivisible, key, report)
        for group in sequential_groups(names, method.true_sequential):
            stats: dict[str, Stat] = {}
            handles = []
            if method.needs_data:
                for name in group:
                    linear = block.get_submodule(name)
                    stat = method.new_stat(name, linear, total_tokens)
                    if stat is not None:
                        stats[name] = stat
                        handles.append(linear.register_forward_hook(
                            lambda _m, args, _out, s=stat: s.add(args[0].detach())))
                if handles:
                    with torch.no_grad():
                        for hidden, kw in zip(inputs, kwargs_list):
                            block(hidden, **kw)
                for h in handles:
                    h.remove()
            method.apply(block, prefix, group, stats, report)
        if method.needs_data:
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

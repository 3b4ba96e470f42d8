"""torch.compile of the decoder layers of the student and the teacher, during a run's steps and validation.

Why (docs/distill_step_cost.md): at the default distill shape a step is ~6,600 aten ops (the teacher's
forward ~2,500, the student's forward ~1,300 and backward ~2,400) on only 4,096 tokens, so each op has a
few microseconds of GPU work and the step is paid in host dispatch and kernel launches, not in FLOPs or
bytes. Transformers' Llama layer runs its RMSNorm (7 ops), rotary embedding, SiLU-gate and autocast casts
as separate kernels; Inductor fuses each such run into one kernel, in forward and backward.

Each layer's `forward` is replaced by a compiled one (an instance attribute, removed on exit): module
hooks (capture_layers, FSDP2's all-gathers, DDP) keep running eagerly around it, and nothing compiled is
left on the model the caller saves or copies afterwards. Layers of one class share the compiled code (the
graph is specialised on shapes and grad mode, so the teacher's no-grad forward and the student's training
forward are two graphs, not 45).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from train.modules import causal_lm


def use_compile_model(compile_model: bool | str, device: torch.device, on_policy: bool, sharded: bool) -> bool:
    """`auto` compiles on CUDA only, and not where generation runs the same layers with a KV cache
    (on-policy / sequence-level KD) or FSDP2 shards them."""
    if compile_model == "auto":
        return device.type == "cuda" and not on_policy and not sharded
    return bool(compile_model)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(causal_lm(model).model.layers)


# One compiled function per layer class for the process, keyed like fused_head_loss's objective: every
# layer of a class, of the teacher and the student, and of a later run in the same process (the pipeline's
# gqa.train, prune.finetune) goes through it, and dynamo reuses its graphs where shapes and grad mode match.
_COMPILED: dict[Any, Any] = {}


def _compiled_forward(layer: torch.nn.Module) -> Callable[..., Any]:
    fn = type(layer).forward
    if fn not in _COMPILED:
        # Every layer of every model of the class shares the code object's entries (training and no-grad,
        # bf16 teacher weights in steps and fp32 in validation, the pipeline's later stages with their own
        # shapes): past dynamo's default of 8 the rest would silently run eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # dynamic=None: a second batch shape (validation's last batch) recompiles once with dynamic dims.
        _COMPILED[fn] = torch.compile(fn, dynamic=None)
    return functools.partial(_COMPILED[fn], layer)


class LayerCompiler:
    """Every decoder layer of `models` (None entries skipped) with its compiled forward, installed only
    while `active()` lasts: the training step and the validation loss, not the caller's `evaluate` or
    generation, which run the layers with a KV cache."""

    def __init__(self, models: list[Any], enabled: bool) -> None:
        layers = [layer for m in models if m is not None for layer in decoder_layers(m)] if enabled else []
        self._compiled = [(layer, _compiled_forward(layer)) for layer in layers]

    @contextmanager
    def active(self) -> Iterator[None]:
        for layer, forward in self._compiled:
            layer.forward = forward
        try:
            yield
        finally:
            for layer, _ in self._compiled:
                del layer.forward

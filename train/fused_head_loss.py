"""The student's LM head fused with the distillation loss: one pass per chunk, no recomputation.

The checkpoint path (train/chunked_loss.py) runs every chunk's head matmuls and fp32 loss work
twice: once in forward, again in backward. Here, as in Liger-Kernel's fused linear cross-entropy,
the forward already takes each chunk's gradient: logits = h @ W^T, the terms on a detached leaf
of those logits (upcast to fp32 inside the differentiated function), g = d(chunk's share of the
weighted total) / d(leaf) by torch.autograd.grad, then grad_h[chunk] = g @ W and
grad_W += g^T @ h. Backward only scales the saved gradients by the incoming one (the total is a
scalar). Peak extra memory stays about one chunk's logits plus grad_h [N, H] and an fp32
grad_W [V, H]. On an H100 (SmolLM2-135M teacher -> 15-layer student, 8 x 2048) the KD step went
from 74k to 130k tok/s and its peak memory from 16.1 to 11.6 GB (experiments/distill.py bench).

Matmul dtypes follow what nn.Linear would do under the active autocast (bf16 on a GPU under
autocast, the weight's dtype otherwise), and so do the gradient matmuls, as autograd would run
them; grad_W is accumulated over chunks in fp32.

Optionally the per-chunk term evaluation (forward and, through AOTAutograd, its backward) is
torch.compile'd: the elementwise softmax / KL work on [chunk x vocab] is memory-bound and fusing
it is most of the remaining win. Off on the CPU by default (CI has no compiler guarantee).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from train.loss_terms import term_sums

_COMPILED: dict[Any, Any] = {}


def plain_linear(head: torch.nn.Module) -> bool:
    """A plain bias-free nn.Linear: no hooks, no patched forward (LoRA wrappers, quantised or hooked heads)."""
    return (type(head) is torch.nn.Linear and head.bias is None and not head._forward_hooks
            and not head._forward_pre_hooks and "forward" not in vars(head))


def can_fuse(head: torch.nn.Module, hidden: torch.Tensor) -> bool:
    """A plain head (others keep the checkpoint path), with something to differentiate, while grad is enabled."""
    return plain_linear(head) and torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)


def teacher_head_fn(t_head: torch.nn.Module, device_type: str):
    """The teacher head as a function of a chunk of hidden states. Autocast caches the cast of a weight
    only when it requires grad, so a frozen fp32 head (the teacher's, tied to its embedding) would be cast
    to bf16 again for every chunk (0.17 GB of traffic each at SmolLM2's vocabulary): cast it once. The
    chunk then runs the same F.linear on the same bf16 operands autocast would give it."""
    if plain_linear(t_head) and not t_head.weight.requires_grad and torch.is_autocast_enabled(device_type):
        dt = torch.get_autocast_dtype(device_type)
        w = t_head.weight.to(dt)
        return lambda x: F.linear(x.to(dt), w)
    return t_head


def use_compile(compile_loss: bool | str, device: torch.device) -> bool:
    """`auto` compiles on CUDA only."""
    return device.type == "cuda" if compile_loss == "auto" else bool(compile_loss)


def _objective_fn(terms, top_k):
    """(student logits leaf, teacher logits, labels, per-term scale) -> (weighted sum, term sums).

    The logits come in the matmul dtype and are upcast to fp32 here, inside the differentiated (and
    maybe compiled) function: the terms see exactly the fp32 logits `.float()` gives the checkpoint
    path, the gradient comes back in the matmul dtype as autograd would hand it to the bf16 matmul,
    and the compiler fuses the casts into the loss kernels instead of writing fp32 copies."""
    def objective(s_logits, t_logits, labels, scale):
        t_logits = t_logits.float() if t_logits is not None else None
        sums = term_sums(s_logits.float(), t_logits, labels, None, terms, top_k)
        # Term sums are returned detached: only the weighted sum is differentiated.
        return (sums * scale).sum(), sums.detach()
    return objective


def _compiled_objective(terms, top_k):
    # Keyed by what the terms compute (not object identity: make_terms builds new objects per run).
    key = (tuple((t.name, type(t.fn), repr(sorted(vars(t.fn).items()))) for t in terms), top_k)
    if key not in _COMPILED:
        # dynamic=None: the first new row count (last chunk, masked rows) recompiles once with a
        # dynamic dim, after which every chunk length reuses that graph.
        _COMPILED[key] = torch.compile(_objective_fn(terms, top_k), dynamic=None)
    return _COMPILED[key]


def _matmul_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype nn.Linear would compute in here."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.result_type(x, w)


class FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_hidden, s_weight, t_hidden, t_head, labels, terms, weights, chunk_size, top_k, n_tokens,
                compile_loss):
        # t_head is the teacher's head module, called as the checkpoint path calls it (a frozen plain
        # head with its weight cast once, teacher_head_fn): it gets no gradient, so it need not be a
        # tensor input, and any head (bias, adapters) works.
        dt = _matmul_dtype(s_hidden, s_weight)
        w = s_weight.to(dt)  # cast once, not once per chunk
        need_h, need_w = s_hidden.requires_grad, s_weight.requires_grad
        grad_h = torch.empty_like(s_hidden) if need_h else None
        grad_w = torch.zeros(s_weight.shape, dtype=torch.float32, device=s_weight.device) if need_w else None
        scale = weights / n_tokens  # d total / d term_sum, as autograd forms it from sums / n * weights
        objective = _compiled_objective(terms, top_k) if compile_loss else _objective_fn(terms, top_k)
        sums = torch.zeros(len(terms), dtype=torch.float32, device=s_hidden.device)
        t_logits_of = teacher_head_fn(t_head, s_hidden.device.type) if t_hidden is not None else None
        for start in range(0, s_hidden.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            h = s_hidden[sl].to(dt)
            leaf = (h @ w.t()).detach().requires_grad_()
            t_logits = t_logits_of(t_hidden[sl]) if t_hidden is not None else None
            with torch.enable_grad():
                chunk_obj, chunk_sums = objective(leaf, t_logits, labels[sl], scale)
                (g,) = torch.autograd.grad(chunk_obj, leaf)
            sums += chunk_sums
            del leaf, t_logits, chunk_obj
            if need_h:
                grad_h[sl] = g @ w
            if need_w:
                grad_w += g.t() @ h  # fp32 += bf16 upcasts in the add: the bits of .float(), without its copy
            del g
        ctx.w_dtype = s_weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        total = (sums / n_tokens * weights).sum()  # the same expression the checkpoint path evaluates
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    def backward(ctx, grad_total, _grad_sums):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_total if ctx.needs_input_grad[0] else None
        gw = (grad_w * grad_total).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, *([None] * 9)


def fused_head_loss(s_hidden: torch.Tensor, s_head: torch.nn.Linear, t_hidden: torch.Tensor | None,
                    t_head: torch.nn.Module | None, labels: torch.Tensor, terms, weights: torch.Tensor,
                    chunk_size: int, top_k: int | None, n_tokens: int, compile_loss: bool | str = "auto"):
    """(weighted total, per-term sums) over flat rows [N, H] that all count (labels >= 0), with
    `weights` the terms' fp32 weights [n_terms]; see chunked_distill_loss."""
    return FusedHeadLoss.apply(s_hidden, s_head.weight, t_hidden, t_head, labels, terms, weights, chunk_size,
                               top_k, n_tokens, use_compile(compile_loss, s_hidden.device))

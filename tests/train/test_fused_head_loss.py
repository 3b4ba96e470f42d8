"""The fused head+loss path gives the checkpoint path's loss and gradients, term by term, and
falls back to the checkpoint path where it cannot apply."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from support import tiny_llama_config
from common.errors import ShrinkError
from train import fused_head_loss as fhl
from train.chunked_loss import LossTerm, chunked_distill_loss
from train.config import TrainConfig
from train.loop import distill_batch_loss
from train.losses import make_loss

TAU = 2.0
FAMILIES = {
    "ce": [("ce", 1.0, {})],
    "forward_kl": [("forward_kl", 1.0, {})],
    "reverse_kl": [("reverse_kl", 1.0, {})],
    "jsd": [("jsd", 1.0, {"beta": 0.5})],
    "tvd": [("tvd", 1.0, {})],
    "mix": [("forward_kl", 0.7, {}), ("ce", 0.3, {})],
}


def _terms(spec):
    return [LossTerm(name, w, make_loss(name, temperature=TAU, **kw)) for name, w, kw in spec]


def _setup(seed=0, hidden=16, vocab=50, bias=False):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    s_head = torch.nn.Linear(hidden, vocab, bias=bias)
    t_head = torch.nn.Linear(hidden + 4, vocab, bias=False).requires_grad_(False)
    s_hidden = torch.randn(3, 11, hidden, generator=g, requires_grad=True)
    t_hidden = torch.randn(3, 11, hidden + 4, generator=g)
    labels = torch.randint(0, vocab, (3, 11), generator=g)
    labels[0, :4] = -100
    labels[2, 7] = -100
    return s_head, t_head, s_hidden, t_hidden, labels


def _run(fused, s_head, t_head, s_hidden, t_hidden, labels, terms, chunk, top_k, wrt):
    loss, parts = chunked_distill_loss(s_hidden, s_head, t_hidden, t_head, labels, terms, chunk, top_k,
                                       fused=fused, compile_loss=False)
    return loss, parts, torch.autograd.grad(loss, wrt)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("top_k", [None, 5])
@pytest.mark.parametrize("chunk", [7, 64])  # 29 rows count: 7 gives a ragged last chunk
def test_fused_equals_checkpoint_path(family, top_k, chunk):
    s_head, t_head, s_hidden, t_hidden, labels = _setup()
    terms = _terms(FAMILIES[family])
    wrt = [s_hidden, s_head.weight]
    ref, ref_parts, ref_grads = _run(False, s_head, t_head, s_hidden, t_hidden, labels, terms, chunk, top_k, wrt)
    got, parts, grads = _run(True, s_head, t_head, s_hidden, t_hidden, labels, terms, chunk, top_k, wrt)
    assert type(got.grad_fn).__name__ == "FusedHeadLossBackward"  # the fused path was taken
    assert type(ref.grad_fn).__name__ != "FusedHeadLossBackward"
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    assert parts.keys() == ref_parts.keys()
    for k in parts:
        assert parts[k] == pytest.approx(ref_parts[k], rel=1e-6, abs=1e-7)
    for a, b in zip(grads, ref_grads):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert t_head.weight.grad is None


def test_frozen_head_gets_no_grad_and_hidden_still_does():
    s_head, t_head, s_hidden, t_hidden, labels = _setup(seed=2)
    s_head.weight.requires_grad_(False)
    terms = _terms(FAMILIES["mix"])
    ref, _, (ref_g,) = _run(False, s_head, t_head, s_hidden, t_hidden, labels, terms, 8, None, [s_hidden])
    got, _ = chunked_distill_loss(s_hidden, s_head, t_hidden, t_head, labels, terms, 8, fused=True)
    assert type(got.grad_fn).__name__ == "FusedHeadLossBackward"
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s_hidden.grad, ref_g, rtol=1e-5, atol=1e-7)
    assert s_head.weight.grad is None


def test_head_weight_alone_gets_its_grad():
    s_head, t_head, s_hidden, t_hidden, labels = _setup(seed=3)
    s_hidden = s_hidden.detach()
    terms = _terms(FAMILIES["jsd"])
    _, _, (ref_g,) = _run(False, s_head, t_head, s_hidden, t_hidden, labels, terms, 8, None, [s_head.weight])
    _, _, (g,) = _run(True, s_head, t_head, s_hidden, t_hidden, labels, terms, 8, None, [s_head.weight])
    torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-7)


def test_falls_back_for_a_biased_head_and_without_grad():
    s_head, t_head, s_hidden, _, _ = _setup(bias=True)
    assert not fhl.can_fuse(s_head, s_hidden)
    s_head, *_ = _setup()
    assert fhl.can_fuse(s_head, s_hidden)
    with torch.no_grad():
        assert not fhl.can_fuse(s_head, s_hidden)
    s_head.register_forward_hook(lambda *a: None)  # a hooked head may change its output: keep the generic path
    assert not fhl.can_fuse(s_head, s_hidden)
    # A biased head still gives the right loss (through the checkpoint path).
    s_head, t_head, s_hidden, t_hidden, labels = _setup(bias=True)
    terms = _terms(FAMILIES["mix"])
    a, _, ga = _run(True, s_head, t_head, s_hidden, t_hidden, labels, terms, 8, None, [s_hidden, s_head.bias])
    b, _, gb = _run(False, s_head, t_head, s_hidden, t_hidden, labels, terms, 8, None, [s_hidden, s_head.bias])
    torch.testing.assert_close(a, b)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


def test_compile_auto_is_off_on_the_cpu():
    assert not fhl.use_compile("auto", torch.device("cpu"))
    assert fhl.use_compile("auto", torch.device("cuda"))
    assert fhl.use_compile(True, torch.device("cpu")) and not fhl.use_compile(False, torch.device("cuda"))


@pytest.mark.parametrize("field,value", [("fused_head_loss", "yes"), ("compile_loss", "sometimes")])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ShrinkError, match=field):
        TrainConfig(**{field: value}).validate()


def test_tied_tiny_student_end_to_end_grads_match():
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_llama_config()).eval().requires_grad_(False)
    torch.manual_seed(1)
    student = AutoModelForCausalLM.from_config(tiny_llama_config(num_hidden_layers=2))
    assert student.lm_head.weight is student.model.embed_tokens.weight
    ids = torch.randint(3, 320, (2, 17), generator=torch.Generator().manual_seed(2))
    terms = _terms(FAMILIES["mix"]) + [LossTerm("jsd", 0.2, make_loss("jsd", temperature=TAU, beta=0.5))]
    grads = {}
    for fused in (False, True):
        student.zero_grad(set_to_none=True)
        loss, parts = distill_batch_loss(student, teacher, ids, terms, 7, top_k=9, fused_head_loss=fused,
                                         compile_loss=False)
        loss.backward()
        grads[fused] = (loss.detach(), parts, {n: p.grad.clone() for n, p in student.named_parameters()})
    (l0, p0, g0), (l1, p1, g1) = grads[False], grads[True]
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-7)
    assert p1 == pytest.approx(p0, rel=1e-6)
    assert g1.keys() == g0.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("compile_loss", [False, True])
def test_fused_matches_checkpoint_under_bf16_autocast_on_cuda(compile_loss):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    H, V = 64, 1000
    s_head = torch.nn.Linear(H, V, bias=False, device=dev)
    t_head = torch.nn.Linear(H, V, bias=False, device=dev).requires_grad_(False)
    terms = _terms(FAMILIES["mix"]) + [LossTerm("tvd", 0.1, make_loss("tvd"))]
    for rows in (300, 257):  # two lengths: a dynamic-shape recompile must not crash
        s_hidden = torch.randn(rows, H, device=dev, generator=g, requires_grad=True)
        t_hidden = torch.randn(rows, H, device=dev, generator=g)
        labels = torch.randint(0, V, (rows,), device=dev, generator=g)
        labels[:5] = -100
        out = {}
        for fused in (False, True):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = chunked_distill_loss(s_hidden, s_head, t_hidden, t_head, labels, terms, 64, 20,
                                               fused=fused, compile_loss=compile_loss)
            out[fused] = (loss, *torch.autograd.grad(loss, [s_hidden, s_head.weight]))
        for a, b in zip(out[True], out[False]):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-4)


def test_frozen_teacher_head_is_cast_once_and_gives_the_autocast_logits_bitwise():
    """Under autocast the frozen head's weight is cast once per loss, not per chunk, with the same bits."""
    s_head, t_head, s_hidden, t_hidden, labels = _setup(hidden=24, vocab=97)
    x = t_hidden.reshape(-1, t_hidden.shape[-1])
    assert fhl.teacher_head_fn(t_head, "cpu") is t_head  # no autocast: the module as it is
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fn = fhl.teacher_head_fn(t_head, "cpu")
        assert fn is not t_head and torch.equal(fn(x[:7]), t_head(x[:7]))
        trained = torch.nn.Linear(28, 97, bias=False)
        assert fhl.teacher_head_fn(trained, "cpu") is trained  # autocast caches a trained weight's cast itself
    terms = _terms(FAMILIES["mix"])
    runs = []
    for hoisted in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            if not hoisted:
                mp.setattr(fhl, "teacher_head_fn", lambda head, device_type: head)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, parts = chunked_distill_loss(s_hidden, s_head, t_hidden, t_head, labels, terms, 7, None,
                                                   fused=True, compile_loss=False)
            runs.append((loss, parts, torch.autograd.grad(loss, [s_hidden, s_head.weight])))
    (loss, parts, grads), (ref, ref_parts, ref_grads) = runs
    assert torch.equal(loss, ref) and parts == ref_parts
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))

"""Fused RMSNorm, SwiGLU and rotary+KV-store kernels against their torch references."""

from __future__ import annotations

import pytest
import torch

from kernels.activation import silu_and_mul, silu_and_mul_ref
from kernels.rmsnorm import rmsnorm, rmsnorm_ref
from kernels.rotary import rope_store, rope_store_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _tables(max_pos, dim):
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.arange(max_pos).float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos(), emb.sin()


def _check_rmsnorm(rows, n, dtype, device, tol):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(rows, n, generator=g).to(device, dtype)
    res = torch.randn(rows, n, generator=g).to(device, dtype)
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(device, dtype)
    assert _rel(rmsnorm(x, w, 1e-6), rmsnorm_ref(x, w, 1e-6)) < tol
    out, new_res = rmsnorm(x, w, 1e-6, res)
    ref_out, ref_res = rmsnorm_ref(x, w, 1e-6, res)
    assert _rel(out, ref_out) < tol and torch.equal(new_res, ref_res)


def _check_silu(rows, inter, dtype, device, tol):
    x = torch.randn(rows, 2 * inter, generator=torch.Generator().manual_seed(inter)).to(device, dtype)
    assert _rel(silu_and_mul(x), silu_and_mul_ref(x)) < tol


def _check_rope(tokens, qh, kh, dim, dtype, device, tol):
    g = torch.Generator().manual_seed(dim + qh)
    cos, sin = (t.to(device) for t in _tables(256, dim))
    qkv = torch.randn(tokens, (qh + 2 * kh) * dim, generator=g).to(device, dtype)
    q, k, v = qkv.split([qh * dim, kh * dim, kh * dim], -1)
    q, k, v = q.view(tokens, qh, dim), k.view(tokens, kh, dim), v.view(tokens, kh, dim)
    positions = torch.randint(0, 256, (tokens,), generator=g).to(device)
    kc = torch.randn(8, 4, kh, dim, generator=g).to(device, dtype)
    vc = torch.randn(8, 4, kh, dim, generator=g).to(device, dtype)
    slots = torch.randperm(32, generator=g)[:tokens].to(device)
    slots[1] = -1
    ref_kc, ref_vc = kc.clone(), vc.clone()
    ref_q, ref_k = rope_store_ref(q.clone(), k.clone(), v, positions, cos, sin, ref_kc, ref_vc, slots)
    rope_store(q, k, v, positions, cos, sin, kc, vc, slots)  # in place on the qkv views
    assert _rel(q, ref_q) < tol and _rel(k, ref_k) < tol
    assert _rel(kc, ref_kc) < tol and torch.equal(vc, ref_vc)


@pytest.mark.parametrize("n", [64, 100])
def test_rmsnorm_small(n):
    _check_rmsnorm(5, n, torch.float32, DEVICE, 1e-6)


def test_silu_and_mul_small():
    _check_silu(3, 40, torch.float32, DEVICE, 1e-6)


@pytest.mark.parametrize("qh,kh,dim", [(4, 2, 16), (3, 1, 32), (4, 4, 24)])
def test_rope_store_small(qh, kh, dim):
    _check_rope(6, qh, kh, dim, torch.float32, DEVICE, 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_elementwise_gpu(dtype):
    for n in (576, 2048, 4096):
        _check_rmsnorm(300, n, dtype, "cuda", 1e-2)
    for inter in (1536, 5632, 11008):
        _check_silu(300, inter, dtype, "cuda", 1e-2)
    for qh, kh, dim in ((9, 3, 64), (32, 4, 64), (32, 32, 128), (32, 8, 128)):
        _check_rope(32, qh, kh, dim, dtype, "cuda", 1e-2)

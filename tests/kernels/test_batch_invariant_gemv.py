"""Batch-invariant GEMV (kernels/gemv.py, ``batch_invariant``): a row's output is bitwise the same
whether it is computed alone or among 5, 16 or 37 rows (past SMALL_M: the grid's 16-row tiles), for
every fusion, the rotary + KV-store variant and the exact int4 / int8 paths, in fp32 and bf16.

Interpreted, tl.dot is numpy's, whose BLAS sums rows of one tile in different orders: these tests run
with row_invariant_dot's substitute (a dot that, as a GPU's, sums every element alike), so they check
what the kernel decides (one config at every M, the row tiles, masks, per-row prologues and
epilogues), and equality here is necessary, not sufficient: on a GPU the property rests on one
compiled kernel for every M, which tests/engine/spec_decode/test_batch_invariant_gpu.py checks end to
end."""

from __future__ import annotations

import pytest
import torch
from test_gemv import DEVICE, FUSIONS, _case, _rope_case
from row_invariant_dot import row_invariant_dot
from test_quant_gemv import quant_weight

from kernels.gemv import SMALL_M, batch_invariant_config, gemv, gemv_ref, gemv_rope_store, gemv_rope_store_ref

M = 37  # three 16-row tiles, the last one partial
SUBSETS = [slice(0, 1), slice(4, 5), slice(0, 5), slice(7, 8), slice(9, 12), slice(0, 16), slice(15, 16),
           slice(20, 29), slice(30, 35), slice(36, 37)]


@pytest.fixture(autouse=True)
def rows_summed_alike():
    with row_invariant_dot():
        yield


def _rows(kw: dict, rows: slice) -> dict:
    """The per-row arguments cut to ``rows`` (the others are the weights')."""
    per_row = ("residual", "positions", "slot_mapping")
    return {key: (v[rows] if key in per_row and v is not None else v) for key, v in kw.items()}


@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_is_bitwise_the_same_at_every_m(fusion, dtype):
    x, w, kw = _case(M, 37, 83, dtype, DEVICE, seed=5, **FUSIONS[fusion])
    swiglu = FUSIONS[fusion].get("swiglu", False)

    def run(rows: slice) -> torch.Tensor:
        return gemv(x[rows], w, swiglu=swiglu, batch_invariant=True, **_rows(kw, rows))

    full = run(slice(0, M))
    for rows in SUBSETS:
        assert torch.equal(run(rows), full[rows]), rows
    ref = gemv_ref(x, w, swiglu=swiglu, **kw)  # and still the unfused modules' values
    if dtype == torch.float32:
        torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-5)
    else:
        assert ((full.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


def test_without_the_flag_m1_and_m5_reduce_differently():
    """Why the mode exists: the M == 1 multiply-reduce and the M > 1 tl.dot sum K in other orders, so
    a row's fp32 output differs in its last bits between a batch of 1 and a batch of 5."""
    x, w, _ = _case(5, 37, 83, torch.float32, DEVICE, seed=5)
    assert not torch.equal(gemv(x[:1], w), gemv(x, w)[:1])


@pytest.mark.parametrize("fusion", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_store_row_is_bitwise_the_same_at_every_m(fusion, dtype):
    x, w, kw, cache = _rope_case(M, 6, 2, 16, 83, dtype, DEVICE, seed=6, bias=fusion == "qwen2")

    def run(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        c = cache.clone()
        return gemv_rope_store(x[rows], w, k_cache=c[0], v_cache=c[1], batch_invariant=True, **_rows(kw, rows)), c

    q_full, c_full = run(slice(0, M))
    for rows in SUBSETS:
        q, c = run(rows)
        slots = kw["slot_mapping"][rows]
        slots = slots[slots >= 0]
        flat, flat_full = c.flatten(1, 2), c_full.flatten(1, 2)
        assert torch.equal(q, q_full[rows]) and torch.equal(flat[:, slots], flat_full[:, slots]), rows
    ref_cache = cache.clone()
    ref = gemv_rope_store_ref(x, w, k_cache=ref_cache[0], v_cache=ref_cache[1], **kw)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((q_full.float() - ref.float()).norm() / ref.float().norm()).item() < tol


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_compressed_rows_are_bitwise_the_same_at_every_m(quant):
    x, _, _ = _case(M, 37, 128, torch.bfloat16, DEVICE, seed=7)
    codes, scale, zero, _ = quant_weight(37, 128, quant, zero=True, seed=7)
    args = {"quant": quant, "scale": scale.to(DEVICE), "zero": None if zero is None else zero.to(DEVICE)}
    full = gemv(x, codes.to(DEVICE), **args, batch_invariant=True)
    for rows in SUBSETS:
        assert torch.equal(gemv(x[rows], codes.to(DEVICE), **args, batch_invariant=True), full[rows]), rows


def test_the_config_depends_on_n_and_k_alone_and_bad_combinations_are_refused():
    assert batch_invariant_config(576, 1536)[0] == SMALL_M
    x, w, _ = _case(2, 37, 83, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="fast"):
        gemv(x, w, batch_invariant=True, fast=True)
    with pytest.raises(ValueError, match="16-row tiles"):
        gemv(x, w, batch_invariant=True, config=(1, 8, 128, 4))


# SmolLM2-135M's decode linears (qkv, o_proj, gate_up, down_proj, lm_head) and a Llama-2-7B shape.
GPU_SHAPES = [(960, 576, False), (576, 576, False), (1536, 576, True), (576, 1536, False), (49152, 576, False),
              (4096, 4096, False)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,swiglu", GPU_SHAPES)
def test_rows_are_bitwise_the_same_at_every_m_on_the_gpu(n, k, swiglu):
    """The compiled kernel (tensor-core dots in bf16): a row alone equals the row at any place of a
    16-row tile and of a 3-tile grid (the invariance the CPU tests cannot show with numpy's dot)."""
    x, w, kw = _case(M, n, k, torch.bfloat16, "cuda", seed=9, norm=True, swiglu=swiglu, residual=not swiglu)

    def run(rows: slice) -> torch.Tensor:
        return gemv(x[rows], w, swiglu=swiglu, batch_invariant=True, **_rows(kw, rows))

    full = run(slice(0, M))
    for rows in SUBSETS + [slice(i, i + 1) for i in range(M)]:
        assert torch.equal(run(rows), full[rows]), rows


@pytest.mark.gpu
def test_one_compiled_kernel_for_every_row_count():
    """Triton would compile M == 1 (a constant) and M % 16 == 0 (a divisibility hint) as kernels of
    their own; M is left unspecialized so that every row count runs the same code."""
    from kernels import gemv as gemv_module

    for kernel in (gemv_module._gemv_kernel, gemv_module._gemv_rope_store_kernel):
        assert "M" in kernel.do_not_specialize


@pytest.mark.gpu
def test_rope_store_rows_are_bitwise_the_same_at_every_m_on_the_gpu():
    x, w, kw, cache = _rope_case(M, 9, 3, 64, 576, torch.bfloat16, "cuda", seed=10)

    def run(rows: slice) -> torch.Tensor:
        c = cache.clone()
        return gemv_rope_store(x[rows], w, k_cache=c[0], v_cache=c[1], batch_invariant=True, **_rows(kw, rows))

    full = run(slice(0, M))
    for i in range(M):
        assert torch.equal(run(slice(i, i + 1)), full[i : i + 1]), i

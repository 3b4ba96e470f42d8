"""kernels/int4_mma.py (tensor-core int4 GEMM, M <= 16) against kernels/quant.py's fp32 reference,
in the interpreter on CPU (a GPU run compiles the same kernel): random nonzero codes, scales and
zero points, ragged N and K, groups 32/64/128, bf16 and fp16 x, split-K on and off, bias.

Tolerance: the kernel's operand (code - 8 - zero) and products are exact and it sums in fp32, so
its result is the fp32 reference rounded once to x's dtype up to fp32 summation order: within one
unit in the last place of x's dtype (2^-8 relative for bf16, 2^-11 for fp16) of the unrounded
reference, plus 1e-5 of the output's largest magnitude for the fp32 sums' own error (1e-4 on the
GPU at the 7B shapes: the tensor cores' sums over K up to 11008).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_quant_gemv_fast import _compile_sm90

from kernels import quant as ref
from kernels.int4_mma import WORKSPACE, int4_mma, int4_mma_config, repack_int4, unrepack_int4

ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}  # spacing just above 1.0


def make_int4(n: int, k: int, group: int, zero: bool, seed: int = 0):
    """Random packed codes (no code or scale zero), scales, integer zero points in int4's range."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    codes[codes == 0] = 3
    scale = torch.rand(n, k // group, generator=g) * 0.02 + 0.001
    z = torch.randint(-8, 8, (n, k // group), generator=g).float() if zero else None
    return ref.pack_int4(codes), scale, z


def check(got: torch.Tensor, x: torch.Tensor, packed, scale, zero, bias=None, abs_share: float = 1e-5) -> None:
    """got is the fp32 reference rounded to x's dtype, to one ulp of the dtype (module docstring);
    ``abs_share``: the fp32 sums' error allowed, a share of the output's largest magnitude."""
    w = ref.dequantize_grouped(ref.unpack_int4(packed), scale, zero)
    exact = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    assert got.dtype == x.dtype and got.shape == exact.shape
    tol = exact.abs() * ULP[x.dtype] + abs_share * exact.abs().max()
    err = (got.double() - exact).abs()
    assert bool((err <= tol).all()), f"max error {err.max().item():.3g}, worst excess {(err - tol).max().item():.3g}"
    # and the library reference, rounded the same way, agrees to the same tolerance
    expected = ref.int4_linear_fast_ref(x, packed, scale, zero, bias)
    assert bool(((got.double() - expected.double()).abs() <= 2 * tol).all())


@pytest.mark.parametrize("n,k,group,zero,m,dtype,config", [
    (48, 256, 64, False, 1, torch.bfloat16, None),  # heuristic config
    (40, 384, 128, True, 5, torch.float16, (32, 128, 2, 4, 2)),  # ragged N, split-K 2 (3 groups: a ragged split)
    (24, 96, 32, False, 16, torch.bfloat16, (16, 64, 2, 4, 1)),  # K not a multiple of BLOCK_K
    (72, 320, 32, True, 2, torch.bfloat16, (32, 128, 3, 2, 2)),  # three splits, the last one short
    (33, 256, 128, True, 16, torch.bfloat16, (64, 256, 1, 4, 3)),  # no split, one ragged tile
    (64, 512, 64, False, 5, torch.float16, (16, 128, 4, 4, 2)),
])
def test_matches_reference(n, k, group, zero, m, dtype, config):
    packed, scale, z = make_int4(n, k, group, zero, seed=n + k)
    w = repack_int4(packed, scale, z)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    check(int4_mma(x, w, config=config), x, packed, scale, z)


def test_bias_and_strided_x():
    n, k, group = 40, 256, 64
    packed, scale, z = make_int4(n, k, group, True, seed=3)
    w = repack_int4(packed, scale, z)
    x = torch.randn(2, 2 * k, dtype=torch.bfloat16)[:, :k]  # row stride 2 K
    bias = torch.randn(n, dtype=torch.bfloat16)
    check(int4_mma(x, w, bias, config=(16, 128, 2, 4, 1)), x, packed, scale, z, bias)


def test_split_k_is_deterministic_and_leaves_counters_zero():
    """The split-K fixup sums the partials in split order: runs are bitwise equal, and every launch
    returns the counters to 0 (the next launch, or a graph replay, starts clean)."""
    n, k, group = 32, 512, 64
    packed, scale, _ = make_int4(n, k, group, False, seed=5)
    w = repack_int4(packed, scale)
    x = torch.randn(3, k, dtype=torch.bfloat16)
    config = (16, 64, 4, 4, 1)
    first = int4_mma(x, w, config=config)
    for _ in range(2):
        assert torch.equal(int4_mma(x, w, config=config), first)
    _, counters = WORKSPACE.get(x.device, 1, 1)
    assert int(counters.abs().sum()) == 0
    check(first, x, packed, scale, None)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("zero", [False, True])
def test_repack_round_trips(group, zero):
    n, k = 20, 4 * group
    packed, scale, z = make_int4(n, k, group, zero, seed=group)
    w = repack_int4(packed, scale, z)
    assert w.words.dtype == torch.int32 and w.words.shape == (n, k // 8) and w.k == k and w.n == n
    back, s, z2 = unrepack_int4(w)
    assert torch.equal(back, packed) and torch.equal(s, scale)
    assert (z2 is None) == (z is None) and (z is None or torch.equal(z2, z))
    assert w.nbytes() == n * k // 2 + scale.numel() * 4 * (2 if zero else 1)


def test_repack_puts_each_thread_fragment_in_one_word():
    """The layout the kernel relies on, found by placing one nonzero code at a time: word c of a
    32-input block holds inputs 2c, 2c + 1, 2c + 8, 2c + 9 of both k16 tiles (one lane's MMA
    operand registers), and inputs 2i, 2i + 1 (one register) sit 16 bits apart (one mask)."""
    where = {}
    for i in range(32):
        codes = torch.full((1, 32), -8, dtype=torch.int8)  # stored +8: nibble 0
        codes[0, i] = 7  # nibble 15
        words = repack_int4(ref.pack_int4(codes), torch.ones(1, 1)).words[0]
        found = [(c, q) for c in range(4) for q in range(8) if (int(words[c]) >> (4 * q)) & 0xF]
        assert len(found) == 1 and all((int(words[c]) >> (4 * q)) & 0xF == 15 for c, q in found)
        where[i] = found[0]
    for c in range(4):
        assert {i for i, (w, _) in where.items() if w == c} == {t + 2 * c + d for t in (0, 16) for d in (0, 1, 8, 9)}
    assert all(where[2 * i + 1][1] == where[2 * i][1] + 4 for i in range(16))


def test_clear_errors():
    packed, scale, z = make_int4(16, 128, 64, True)
    w = repack_int4(packed, scale, z)
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="group size 16"):
        repack_int4(ref.pack_int4(torch.ones(16, 128, dtype=torch.int8)), torch.ones(16, 8))
    with pytest.raises(ValueError, match="zero points must be integers"):
        repack_int4(packed, scale, z + 0.5)
    with pytest.raises(ValueError, match="zero points must be integers"):
        repack_int4(packed, scale, torch.full_like(z, 9.0))
    with pytest.raises(ValueError, match="17 rows"):
        int4_mma(torch.randn(17, 128, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="dtype torch.float32"):
        int4_mma(x.float(), w)
    with pytest.raises(ValueError, match="x has 64 inputs"):
        int4_mma(x[:, :64], w)
    with pytest.raises(ValueError, match="BLOCK_K a power of two multiple of the group size"):
        int4_mma(x, w, config=(16, 32, 1, 4, 1))
    with pytest.raises(ValueError, match="uint8"):
        repack_int4(packed.to(torch.int8), scale)


def test_config_launches_two_programs_per_sm_on_7b_shapes():
    """The heuristic's grid on Llama-2-7B's shapes: 264+ programs (two per H200 SM) at M == 1,
    whole groups a step, every split one step or more, and the split-K partials (fp32, written
    and read) at most a quarter of the weight's bytes at any M."""
    import triton

    for n, k in [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]:
        for group in (64, 128):
            for m in (1, 2, 4, 8, 16):
                block_n, block_k, split, warps, _ = int4_mma_config(m, n, k, group)
                assert block_k % group == 0 and block_n in (64, 128) and warps == 4
                assert k // split >= block_k and (split == 1 or 16 * m * split <= k / 4), (n, k, m, split)
                programs = triton.cdiv(n, block_n) * split
                assert programs >= 264 or m > 1, (n, k, group, programs)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 5, 16])
@pytest.mark.parametrize("group,zero", [(64, False), (128, False), (128, True)])
def test_gpu_7b_shapes_match_reference(m, group, zero):
    """On the GPU (wgmma, cp.async, the split-K semaphore: what the interpreter does not run), every
    7B shape with the heuristic config, to the module's tolerance, and bitwise equal over reruns."""
    for n, k in [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]:
        packed, scale, z = make_int4(n, k, group, zero, seed=m)
        packed, scale = packed.cuda(), scale.cuda()
        z = None if z is None else z.cuda()
        w = repack_int4(packed, scale, z)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        got = int4_mma(x, w)
        # the tensor cores' fp32 sums in their order (a K of 4096-11008): 1e-4 of the largest output
        check(got.cpu(), x.cpu(), packed.cpu(), scale.cpu(), None if z is None else z.cpu(), abs_share=1e-4)
        assert torch.equal(int4_mma(x, w), got)


SM90_COUNT = """
import json
from experiments.int4_mma_sass_count import count

for fmt in ("int4_g128", "int4_g128_zero"):  # the heuristic's tile, two steps a program (a loop to count)
    print(json.dumps(count(fmt, 1, 4096, 4096, (128, 256, 8, 4, 3))))
"""


def test_sm90_counts_stay_under_the_copy_ceiling_budgets():
    """The design's evidence, kept: compiled for sm_90 with Triton's bundled ptxas (a fresh process
    without the interpreter), the heuristic's tile's K loop issues fewer SASS instructions and moves
    fewer shared-memory bytes per weight byte than an H200 SM has at the copy ceiling (~7.9 each),
    on the tensor cores, without spills. A layout the compiler cannot load straight into the MMA
    operand (the fragment order broken, a magic passed as an argument) goes back to ~10-12 smem B/B."""
    import json

    recs = [json.loads(line) for line in _compile_sm90(SM90_COUNT).strip().splitlines()]
    assert len(recs) == 2
    for rec in recs:
        assert rec["counted"] == "loop" and rec["spill_bytes"] == 0, rec
        assert rec["instructions_per_byte"] < 7.0 and rec["smem_bytes_per_byte"] < 6.0, rec
        assert rec["tensor_ops_per_byte"] > 0, rec

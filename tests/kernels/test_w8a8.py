"""kernels/w8a8.py against its torch references (kernels/quant.py), interpreted on CPU: the
per-token activation quantization (int8 and fp8 e4m3, bit for bit) and the int8 GEMM with the
dequantization fused into its epilogue; and W8A8Linear's Triton prefill path on a GPU."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.layers.options import ModelOptions
from engine.layers.quantized import W8A8Linear
from kernels import quant as ref
from kernels.w8a8 import INT8_MM_MIN_ROWS, INT8_MM_TILES, int8_mm, int8_mm_tile, quantize_per_token

REFS = {"int8": ref.quantize_per_token_int8, "fp8": ref.quantize_per_token_fp8}
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _rows(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows over six decades of magnitude, with the edge cases: an all-zero row, an
    all-equal row, the absmax in the first and in the last column, tiny values beside a large one."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 3, m)[:, None]
    edge = [torch.zeros(k), torch.full((k,), -0.75), torch.randn(k, generator=g), torch.randn(k, generator=g),
            torch.rand(k, generator=g) * 1e-5]
    edge[2][0] = -40.0  # absmax first
    edge[3][-1] = 40.0  # absmax last
    edge[4][k // 2] = 3.0  # the rest deep below it (fp8 subnormals)
    for i, row in enumerate(edge[:m]):
        x[i] = row
    return x.to(dtype)


def _codes(w: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """W8A8 codes of w per output channel: int8 by absmax / 127, fp8 e4m3 by absmax / 448."""
    scale = w.abs().amax(1) / (127.0 if act == "int8" else 448.0)
    q = w / scale[:, None]
    return (q.round().to(torch.int8) if act == "int8" else q.to(torch.float8_e4m3fn)), scale


@pytest.mark.parametrize("act", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 8), (5, 100), (37, 300), (9, 1000)])
def test_quantize_per_token_equals_reference(act, dtype, m, k):
    x = _rows(m, k, dtype, seed=m * k)
    codes, scale = quantize_per_token(x, act)
    want_codes, want_scale = REFS[act](x)
    assert codes.dtype == want_codes.dtype and codes.shape == (m, k) and scale.shape == (m, 1)
    assert torch.equal(scale, want_scale)
    assert torch.equal(codes.float(), want_codes.float()), (codes.float() - want_codes.float()).abs().max()


@pytest.mark.parametrize("act", ["int8", "fp8"])
def test_quantize_per_token_pads_rows_with_zero_codes(act):
    """Rows past M (a GEMM's row multiple) are written as zero codes: no F.pad copy after."""
    x = _rows(5, 64, torch.bfloat16, seed=1)
    codes, scale = quantize_per_token(x, act, rows=16)
    want_codes, want_scale = REFS[act](x)
    assert codes.shape == (16, 64) and scale.shape == (16, 1)
    assert torch.equal(codes[:5].float(), want_codes.float()) and torch.equal(scale[:5], want_scale)
    assert not codes[5:].float().any()


def test_quantize_per_token_rounds_ties_to_even():
    """Every midpoint of the code grids, at scale 1 (absmax 127.5 / 448 in the row): round half to
    even for int8, the e4m3 cast's ties to even for fp8, subnormals included."""
    int8_ties = torch.arange(-128, 127).float() + 0.5
    x = torch.cat([torch.tensor([127.5]), int8_ties])[None, :]
    codes, scale = quantize_per_token(x, "int8")
    assert scale.item() == 1.0
    assert torch.equal(codes, ref.quantize_per_token_int8(x)[0])
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique()
    grid = grid[grid.abs() <= 448]
    ties = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([torch.tensor([448.0]), ties, grid])[None, :]
    codes, scale = quantize_per_token(x, "fp8")
    assert scale.item() == 1.0
    assert torch.equal(codes.float(), ref.quantize_per_token_fp8(x)[0].float())


def _by_division(a: torch.Tensor, d: float) -> torch.Tensor:
    """fp32(a / d), correctly rounded (a double quotient rounds to the same float)."""
    return (a.double() / d).float()


def _by_product(a: torch.Tensor, d: float) -> torch.Tensor:
    """a * fp32(1 / d): what torch computes for `cuda_tensor / d` with d a Python float."""
    return a * torch.tensor(1 / d, dtype=torch.float32)


def absmax_tie_rows(m: int, k: int, seed: int) -> torch.Tensor:
    """Rows [m, k] whose absmax a (each row's one negative extreme -a) scales differently by
    division and by the reciprocal product, fp32(a / 127.5) != a * fp32(1 / 127.5), and whose
    extreme's code, -a over the scale (-127.5, a rounding tie, by construction), rounds to -128 by
    the division and -127 by the product."""
    a = torch.linspace(1.0, 3.0, 4001)
    a = a[torch.round(-a / _by_product(a, 127.5)) != torch.round(-a / _by_division(a, 127.5))][::97][:m]
    assert len(a) == m
    x = (torch.rand(m, k, generator=torch.Generator().manual_seed(seed)) * 1.8 - 0.9) * a[:, None]
    x[torch.arange(m), (7 * torch.arange(m)) % k] = -a
    return x


def test_quantize_per_token_scale_is_the_division():
    """The scale formula, pinned where it matters: rows whose absmax gives another scale, and
    another code at the absmax element, when absmax / 127.5 is computed as torch computes it for a
    CUDA tensor and a Python float (times fp32(1 / 127.5)). Kernel and reference divide, as
    compressed-tensors does (kernels/quant.py's docstring); the reference's `/ 127.5` was a
    division only on the CPU, so the CPU-interpreted kernel matched it while on the H200 about a
    third of the rows' extremes came out one code apart. fp8: absmax / 448 likewise."""
    x = absmax_tie_rows(12, 64, seed=1)
    amax = x.abs().amax(1, keepdim=True)
    codes, scale = quantize_per_token(x, "int8")
    want_codes, want_scale = ref.quantize_per_token_int8(x)
    assert torch.equal(want_scale, _by_division(amax, 127.5))
    assert not torch.equal(want_scale, _by_product(amax, 127.5))
    assert torch.equal(scale, want_scale) and torch.equal(codes, want_codes)
    assert torch.equal(codes.gather(1, x.abs().argmax(1, keepdim=True)), torch.full((12, 1), -128, dtype=torch.int8))
    codes, scale = quantize_per_token(x, "fp8")
    want_codes, want_scale = ref.quantize_per_token_fp8(x)
    assert torch.equal(want_scale, _by_division(amax, 448.0))
    assert torch.equal(scale, want_scale) and torch.equal(codes.float(), want_codes.float())


class _Divisors(TorchDispatchMode):
    """Records the divisor of every aten.div call."""

    def __init__(self) -> None:
        super().__init__()
        self.divisors: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.div:
            self.divisors.append(args[1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("act", ["int8", "fp8"])
def test_reference_divides_by_tensors_alike_on_every_device(act):
    """torch divides a CUDA tensor by a CPU scalar (a Python number, a 0-dim CPU tensor) as the
    product with its fp32 reciprocal, and a CPU tensor by a true division: the references'
    divisions take tensor divisors of the rows' shape, so that they compute the same on the CPU
    (where this runs, and where both forms agree) and on a GPU. `amax / 127.5` was the H200's fp32
    int8 failures (test_w8a8_triton_prefill_path_gpu, relative error 2.3e-4)."""
    with _Divisors() as seen:
        REFS[act](_rows(5, 64, torch.float32, seed=2))
    assert len(seen.divisors) == 2  # the scale, the codes
    assert all(torch.is_tensor(d) and d.dim() == 2 for d in seen.divisors), seen.divisors


def test_quantize_per_token_divides_by_the_scale():
    """The codes are round(x / scale) with an IEEE division, not x times the scale's reciprocal:
    inputs a few ulps from the ties (k + 1/2) * scale where the two round to different codes."""
    a = torch.tensor(2.7182817)
    s = _by_division(a, 127.5)
    ties = (torch.arange(-127, 127).float() + 0.5) * s
    near = torch.cat([ties + j * torch.finfo(torch.float32).eps * ties.abs() for j in range(-6, 7)])
    near = near[(near.abs() < a) & (torch.round(near / s) != torch.round(near * (1 / s)))]
    assert len(near) >= 16
    x = torch.cat([a[None], near])[None, :]
    codes, scale = quantize_per_token(x, "int8")
    assert scale.item() == s.item()
    assert torch.equal(codes, ref.quantize_per_token_int8(x)[0])
    assert torch.equal(codes[0, 1:].float(), torch.round(near / s))


def test_quantize_per_token_rounds_just_below_a_half_down():
    """At scale 1: 0.49999997 (the float below 1/2) to 0, where floor(v + 1/2) alone gives 1 (v + 1/2
    rounds up to 1.0 in fp32; the kernel's tie correction takes it back); the halves to even."""
    x = torch.tensor([[127.5, 0.49999997, -0.49999997, 0.5, -0.5, 1.5, 2.5, -2.5, 1.4999999, -126.5]])
    codes, scale = quantize_per_token(x, "int8")
    assert scale.item() == 1.0
    assert codes.tolist() == [[127, 0, 0, 0, 0, 2, 2, -2, 1, -126]]
    assert torch.equal(codes, ref.quantize_per_token_int8(x)[0])


def test_quantize_per_token_refuses_bad_rows():
    x = torch.randn(8, 32)
    with pytest.raises(ValueError, match="into 4 rows"):
        quantize_per_token(x, "int8", rows=4)
    with pytest.raises(ValueError, match="stride"):
        quantize_per_token(x.t(), "int8")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1, 8, 16), (37, 70, 100), (50, 96, 300)])
def test_int8_mm_equals_w8a8_reference(m, n, k, dtype, bias):
    """Ragged M, N and K against the tiles: the quantize kernel + int8_mm give w8a8_linear_ref's
    result (int32 sums exact, the same fp32 scaling, rounded once; the bias added after)."""
    g = torch.Generator().manual_seed(m + n + k)
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, generator=g) * 0.01 + 1e-3
    b = (torch.randn(n, generator=g)).to(dtype) if bias else None
    x = _rows(m, k, dtype, seed=k)
    xq, xs = quantize_per_token(x, "int8")
    y = int8_mm(xq, xs, codes, scale, b, dtype)
    want = ref.w8a8_linear_ref(x, codes, scale, "int8", b)
    assert y.dtype == dtype and y.shape == (m, n)
    assert torch.equal(y, want), (y.float() - want.float()).abs().max()


@pytest.mark.parametrize("config", INT8_MM_TILES)
def test_int8_mm_gpu_tiles_equal_w8a8_reference(config):
    """The GPU's tiles (interpreted here), with M, N and K ragged against them."""
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(-128, 128, (300, 200), dtype=torch.int8, generator=g)
    scale = torch.rand(300, generator=g) * 0.01 + 1e-3
    x = _rows(130, 200, torch.bfloat16, seed=3)
    xq, xs = quantize_per_token(x, "int8")
    y = int8_mm(xq, xs, codes, scale, None, torch.bfloat16, config)
    assert torch.equal(y, ref.w8a8_linear_ref(x, codes, scale, "int8"))


def test_int8_mm_tile_fills_the_sms():
    """Prefill shapes take the largest tile; fewer rows or columns take smaller ones, down to the
    smallest, so that the H200's 132 SMs each get a tile where the shape has enough."""
    assert int8_mm_tile(4080, 22016, 132) == INT8_MM_TILES[0]
    assert int8_mm_tile(4080, 4096, 132) == INT8_MM_TILES[0]  # 32 x 16 tiles
    assert int8_mm_tile(1024, 4096, 132) == INT8_MM_TILES[1]  # 8 x 16 < 132 <= 8 x 32
    assert int8_mm_tile(128, 4096, 132) == INT8_MM_TILES[3]
    assert int8_mm_tile(17, 64, 132) == INT8_MM_TILES[-1]


def test_int8_mm_refuses_mismatched_operands():
    with pytest.raises(ValueError, match="K-contiguous"):
        int8_mm(torch.zeros(4, 32, dtype=torch.int8), torch.ones(4, 1), torch.zeros(8, 16, dtype=torch.int8),
                torch.ones(8), None, torch.float32)


@pytest.mark.parametrize("act", ["int8", "fp8"])
def test_w8a8_weight_is_kept_in_the_gemm_layout(act):
    """No per-call weight copy: codes.t() (what _int_mm / _scaled_mm get) is a column-major view
    of the stored codes, the layout _scaled_mm requires of mat2."""
    layer = W8A8Linear(*_codes(torch.randn(48, 64), act), act)
    view = layer.codes.t()
    assert view.stride() == (1, 64) and view.data_ptr() == layer.codes.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m_rows", [17, 21, INT8_MM_MIN_ROWS - 1, INT8_MM_MIN_ROWS, 200])
def test_w8a8_int8_triton_routes_equal_reference(m_rows, dtype):
    """W8A8Linear's int8 Triton path on the CPU (interpreted; torch._int_mm has a CPU kernel):
    decode batches below INT8_MM_MIN_ROWS through _int_mm on the kernel's padded codes, prefill
    rows through int8_mm with the bias fused; both give the reference's result exactly."""
    codes, scale = _codes(torch.randn(48, 96), "int8")
    layer = W8A8Linear(codes, scale, "int8", torch.randn(48).to(dtype), ModelOptions(use_triton=True))
    x = _rows(m_rows, 96, dtype, seed=m_rows)
    y = layer._triton(x)
    want = ref.w8a8_linear_ref(x, codes, scale, "int8", layer.bias)
    assert y.dtype == dtype and torch.equal(y, want), (y.float() - want.float()).abs().max()


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("act", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_per_token_equals_reference_gpu(act, dtype):
    """On the GPU, kernel and reference (on CUDA tensors: torch's CUDA division and rounding) give
    the same codes and scales bit for bit: random rows at K 4096 and the absmax tie rows."""
    x = torch.cat([_rows(64, 4096, torch.float32, seed=5), absmax_tie_rows(12, 4096, seed=6)]).to("cuda", dtype)
    codes, scale = quantize_per_token(x, act)
    want_codes, want_scale = REFS[act](x)
    assert torch.equal(scale, want_scale)
    assert torch.equal(codes.float(), want_codes.float()), int((codes.float() != want_codes.float()).sum())


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("act", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m_rows", [17, 21, 64, 300, 4096])
def test_w8a8_triton_prefill_path_gpu(act, m_rows, dtype):
    """W8A8Linear with Triton kernels at prefill row counts (quantize kernel, then int8_mm or
    _scaled_mm) against the fp32 reference; int8 to its rounding, fp8 as the torch path is held."""
    if act == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    g = torch.Generator().manual_seed(m_rows)
    codes, scale = _codes(torch.randn(4096, 4096, generator=g) * 0.02, act)
    bias = torch.randn(4096, generator=g)
    layer = W8A8Linear(codes, scale, act, bias, ModelOptions(use_triton=True)).cuda()
    layer.bias.data = layer.bias.data.to(dtype)
    x = torch.randn(m_rows, 4096, device="cuda", dtype=dtype)
    expected = ref.w8a8_linear_ref(x.float(), layer.codes, layer.scale, act, layer.bias.float())
    y = layer(x)
    err = ((y.float() - expected).norm() / expected.norm()).item()
    assert y.dtype == dtype and err < (1e-2 if dtype == torch.bfloat16 else 1e-5 if act == "int8" else 2e-2), err

"""Int4 weights through torch's tinygemm kernel (kernels/quant_tinygemm.py, Int4Linear,
engine/layers/int4_kernel.py): our codes, scales and zero points converted to tinygemm's layout
compute the layer's dequantized weight (on CPU through tinygemm's CPU ops, the same dequantization
math; on a GPU through the CUDA kernel), and the int4_kernel option picks the path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support import load_experiment

from engine.config import EngineConfig
from engine.layers.int4_kernel import choose_int4_kernels
from engine.layers.options import ModelOptions
from engine.layers.quantized import Int4Linear, gemv_weight
from kernels import quant as ref
from kernels.gemv import SMALL_M
from kernels.quant_dequant import dequantize_int4, dequantize_int4_tinygemm
from kernels.quant_tinygemm import (gpu_layout_ref, high_nibble_first, inner_k_tiles, pack_for_cpu, pack_for_gpu,
                                    scales_and_zeros, tinygemm_fits, tinygemm_mm, unpack_gpu_layout)

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def int4_layer(n: int, k: int, group: int, zero: bool, seed: int = 0, options: ModelOptions = ModelOptions()):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, k // group, generator=g) / 10 + 1e-3
    zp = torch.randint(-8, 8, scale.shape, generator=g).float() if zero else None
    return Int4Linear(codes, scale, zp, torch.randn(n, generator=g), options)


@pytest.mark.parametrize("zero", [False, True], ids=["sym", "zero_point"])
@pytest.mark.parametrize("n,k,group", [(32, 96, 32), (48, 192, 64), (16, 384, 128), (80, 256, 32), (16, 640, 128)])
def test_tinygemm_scales_and_zeros_compute_the_dequantized_weight(n, k, group, zero):
    """(The CPU op wants N % 16; the CUDA one N % 8.)"""
    layer = int4_layer(n, k, group, zero)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1))
    sz = scales_and_zeros(layer.scale, layer.zero, torch.float32)
    assert sz.shape == (k // group, n, 2)
    got = tinygemm_mm(x, pack_for_cpu(layer.packed), group, sz)
    torch.testing.assert_close(got, F.linear(x, layer.dequantized()), atol=1e-4, rtol=1e-4)


def test_high_nibble_first_puts_the_even_column_in_the_high_nibble():
    codes = torch.randint(-8, 8, (16, 64), generator=torch.Generator().manual_seed(2), dtype=torch.int8)
    swapped = high_nibble_first(ref.pack_int4(codes))
    unsigned = (codes.to(torch.int16) + 8).to(torch.uint8)
    assert torch.equal(swapped >> 4, unsigned[:, 0::2]) and torch.equal(swapped & 0xF, unsigned[:, 1::2])


def test_tinygemm_shape_rules():
    assert [inner_k_tiles(k) for k in (4096, 11008, 64, 96, 48)] == [8, 8, 4, 2, None]
    assert tinygemm_fits(4096, 11008, 64) and tinygemm_fits(11008, 4096, 128) and tinygemm_fits(24, 96, 32)
    assert not tinygemm_fits(20, 128, 32)  # N % 8
    assert not tinygemm_fits(16, 128, 16)  # group size
    assert not tinygemm_fits(16, 48, 16) and not tinygemm_fits(16, 80, 80)  # K % 32


def test_int4_kernel_option_is_checked_by_name():
    with pytest.raises(ValueError, match="int4_kernel: 'marlin'"):
        ModelOptions(int4_kernel="marlin")


def test_engine_config_refuses_an_unknown_int4_kernel(model_dir):
    path = model_dir("llama_gqa_untied")
    with pytest.raises(ValueError, match="int4_kernel"):
        EngineConfig(model=path, int4_kernel="tiny")
    assert EngineConfig(model=path, int4_kernel="tinygemm").model_options().int4_kernel == "tinygemm"


def test_cpu_int4_layers_keep_the_triton_path():
    """On the CPU "auto" keeps the reference / Triton path and builds no tinygemm layout;
    an explicit "tinygemm" there is one error naming the option."""
    auto = torch.nn.Sequential(int4_layer(16, 64, 32, False, options=ModelOptions(use_triton=True)))
    assert choose_int4_kernels(auto, torch.bfloat16) == "triton"
    assert auto[0].tinygemm_weight is None and gemv_weight(auto[0]) is not None
    forced = torch.nn.Sequential(int4_layer(16, 64, 32, False, options=ModelOptions(int4_kernel="tinygemm")))
    with pytest.raises(ValueError, match="int4_kernel: 'tinygemm' cannot run"):
        choose_int4_kernels(forced, torch.bfloat16)
    with pytest.raises(ValueError, match="int4_kernel: 'tinygemm' runs bfloat16"):
        choose_int4_kernels(forced, torch.float32)
    assert choose_int4_kernels(torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.bfloat16) is None


def cuda_conversion_transcribed(packed: torch.Tensor, tiles: int) -> torch.Tensor:
    """aten._convert_weight_to_int4pack's CUDA kernel (matrix_to_m16n8k16_Bint4_layout), loop by
    loop, on our packed codes: the independent check of gpu_layout_ref's tensor ops."""
    v_in = high_nibble_first(packed).tolist()
    n, half = packed.shape
    out = [[[[0] * (tiles // 2) for _ in range(32)] for _ in range(half * 2 // (tiles * 16))] for _ in range(n // 8)]
    for n_tile in range(n // 8):
        for k_outer in range(half * 2 // (tiles * 16)):
            for t in range(32):
                for inner in range(0, tiles, 2):
                    n0 = n_tile * 8 + t // 4
                    k0 = (k_outer * tiles + inner) * 16 // 2
                    ks = [k0 + t % 4, k0 + t % 4 + 4, k0 + 8 + t % 4, k0 + 8 + t % 4 + 4]
                    v = [v_in[n0][kk] for kk in ks]
                    word = (((v[3] & 0xF) << 28) | ((v[2] & 0xF) << 24) | ((v[1] & 0xF) << 20) | ((v[0] & 0xF) << 16)
                            | ((v[3] & 0xF0) << 8) | ((v[2] & 0xF0) << 4) | (v[1] & 0xF0) | ((v[0] & 0xF0) >> 4))
                    out[n_tile][k_outer][t][inner // 2] = word - (1 << 32) if word >= 1 << 31 else word
    return torch.tensor(out, dtype=torch.int32)


@pytest.mark.parametrize("n,k", [(16, 128), (24, 64), (8, 96), (32, 256)])
def test_gpu_layout_ref_is_the_cuda_conversion_and_inverts(n, k):
    codes = torch.randint(-8, 8, (n, k), generator=torch.Generator().manual_seed(n + k), dtype=torch.int8)
    packed = ref.pack_int4(codes)
    tiles = inner_k_tiles(k)
    layout = gpu_layout_ref(packed, tiles)
    assert layout.shape == (n // 8, k // (tiles * 16), 32, tiles // 2)
    assert torch.equal(layout, cuda_conversion_transcribed(packed, tiles))
    assert torch.equal(unpack_gpu_layout(layout), packed)


@pytest.mark.parametrize("zero", [False, True], ids=["sym", "zero_point"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,group", [(24, 96, 32), (16, 256, 64), (40, 512, 128)])
def test_dequantize_from_tinygemm_layout_equals_ours(n, k, group, dtype, zero):
    layer = int4_layer(n, k, group, zero)
    layout = gpu_layout_ref(layer.packed, inner_k_tiles(k))
    got = dequantize_int4_tinygemm(layout, layer.scale, layer.zero, dtype)
    assert torch.equal(got, dequantize_int4(layer.packed, layer.scale, layer.zero, dtype))
    assert torch.equal(got, layer.dequantized().to(dtype))


def test_a_tinygemm_layer_leaves_the_fused_decode_kernels_and_keeps_one_layout():
    """A layer on tinygemm (its layout built by hand here: the CUDA op needs a GPU) drops `packed`,
    gives the fused decode kernels no weight, and computes inputs tinygemm does not take (not CUDA
    bf16) from its layout: dequantized, then the dense matmul."""
    layer = int4_layer(16, 64, 32, True, options=ModelOptions(use_triton=True))
    dense = layer.dequantized()
    assert gemv_weight(layer) is not None
    layer.tinygemm_weight = gpu_layout_ref(layer.packed, inner_k_tiles(64))
    layer.packed, layer.tinygemm_max_m = None, 16  # as use_tinygemm leaves it
    assert layer.gemv_args() is None and gemv_weight(layer) is None
    assert torch.equal(layer.dequantized(), dense)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(layer(x), F.linear(x, dense, layer.bias), atol=1e-4, rtol=1e-4)
    assert choose_int4_kernels(torch.nn.Sequential(layer), torch.bfloat16) == "tinygemm"  # decided once
    with pytest.raises(RuntimeError, match="tinygemm's layout only"):
        layer.drop_tinygemm()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("zero", [False, True], ids=["sym", "zero_point"])
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("n,k", [(4096, 11008), (11008, 4096)])
def test_tinygemm_layer_gpu_equals_dequantized_reference(n, k, group, zero):
    layer = int4_layer(n, k, group, zero, options=ModelOptions(use_triton=True, int4_kernel="tinygemm")).cuda()
    layer.bias.data = layer.bias.data.to(torch.bfloat16)
    dense = layer.dequantized()
    assert torch.equal(pack_for_gpu(layer.packed).cpu(), gpu_layout_ref(layer.packed.cpu(), inner_k_tiles(k)))
    layer.use_tinygemm(max_m=16)
    assert layer.tinygemm_weight.dtype == torch.int32 and layer.tinygemm_scales_zeros.dtype == torch.bfloat16
    assert layer.packed is None and torch.equal(layer.dequantized(), dense)
    for rows in (1, 7, 16, 17, 300):  # past max_m: dequantized from tinygemm's layout + the dense GEMM
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        out = layer(x)
        assert out.shape == (rows, n) and out.dtype == torch.bfloat16 and out.is_contiguous()
        err = _rel(out, F.linear(x.float(), dense, layer.bias.float()))
        assert err < 1e-2, (rows, n, k, group, zero, err)


@pytest.mark.gpu
@GPU
def test_tinygemm_layer_captures_in_a_cuda_graph():
    layer = int4_layer(256, 512, 64, True, options=ModelOptions(use_triton=True)).cuda()
    layer.bias.data = layer.bias.data.to(torch.bfloat16)
    layer.use_tinygemm()
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    eager = layer(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x)
    graph.replay()
    torch.testing.assert_close(out, eager, atol=0, rtol=0)


# bf16 logits of this model are a few units wide: 0.25 is 2-4 bf16 ulps there, what two kernels' roundings
# of the same bf16 activations can move a logit by (tinygemm and the Triton GEMVs sum in other orders)
NEAR_TIE = 0.25


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("scheme", ["int4_g32", "int4_g32_asym"])
def test_engine_greedy_tokens_tinygemm_equal_triton(scheme, tmp_path):
    """bf16 (tinygemm's activation dtype) engines on one int4 artifact: tinygemm (unfused) and the
    Triton GEMVs (fused decode) produce the same greedy tokens, or leave each other only at a near-tie
    of both (two kernels, two bf16 roundings); "auto" picks one of them and produces exactly that
    engine's tokens."""
    pytest.importorskip("compressed_tensors")
    from compressed_artifacts import make_artifact

    from engine import LLM
    from engine.layers.quantized import Int4Linear

    path = make_artifact(scheme, tmp_path / scheme)
    prompts = [[5, 17, 99, 3, 250, 42, 8], [300, 12], list(range(40, 80))]
    greedy_with_margins = load_experiment("spec_bench").greedy_with_margins  # tokens, top-1 minus top-2 logit
    tokens, margins, fused = {}, {}, {}
    chosen, auto_max_m = None, None
    for kernel in ("auto", "triton", "tinygemm"):
        # fused_decode_rows pinned: the Triton engines' decode stays fused, whatever timing would choose.
        # compressed_weights "keep": the int4 kernels are the subject (a tiny model's might be served dense).
        llm = LLM(str(path), device="cuda", dtype="bfloat16", max_model_len=128, int4_kernel=kernel,
                  fused_decode_rows=SMALL_M, compressed_weights="keep")
        model = llm.engine.runner.model
        layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
        assert layers
        if kernel == "auto":
            chosen = "tinygemm" if layers[0].tinygemm_max_m > 0 else "triton"
            auto_max_m = layers[0].tinygemm_max_m
            assert all(m.tinygemm_max_m == auto_max_m for m in layers)
        else:
            assert all((m.tinygemm_max_m > 0) == (kernel == "tinygemm") for m in layers)
        if kernel == "tinygemm" and chosen == "tinygemm":
            # tinygemm's prefill rows are timed at load (int4_kernel._tinygemm_max_rows), so two engines can
            # split the 49-row prefill differently (tinygemm, or dequantize + GEMM: other bf16 roundings). The
            # decode rows (<= SMALL_M <= max_m) always run tinygemm; the prefill runs eager: the limit is set here.
            for m in layers:
                m.tinygemm_max_m = auto_max_m
        fused[kernel] = model.model.fusable
        tokens[kernel], margins[kernel] = greedy_with_margins(llm, prompts, 10)
        del llm, model, layers
        torch.cuda.empty_cache()
    print(f"[{scheme}] auto chose {chosen} (tinygemm rows {auto_max_m}); margins (triton): {margins['triton']}")
    assert fused["triton"] and not fused["tinygemm"]
    assert fused["auto"] == (chosen == "triton")
    assert tokens["auto"] == tokens[chosen], f"auto ({chosen}, {auto_max_m} rows) is not the {chosen} engine"
    for seq, (a, b) in enumerate(zip(tokens["tinygemm"], tokens["triton"], strict=True)):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is not None:
            tie = max(margins["tinygemm"][seq][first], margins["triton"][seq][first])
            assert tie <= NEAR_TIE, f"sequence {seq}: tinygemm leaves triton at token {first}, margins {tie:.3f}"


@pytest.mark.gpu
@GPU
def test_auto_times_both_kernels_and_keeps_one_layout(caplog):
    layers = torch.nn.Sequential(*(int4_layer(1024, 2048, 128, zero, seed=i, options=ModelOptions(use_triton=True))
                                   for i, zero in enumerate([False, False, True]))).cuda()
    for m in layers:
        m.bias.data = m.bias.data.to(torch.bfloat16)
    with caplog.at_level("INFO", logger="engine.int4"):
        kernel = choose_int4_kernels(layers, torch.bfloat16)
    assert "int4_kernel auto: " + kernel in caplog.text
    for m in layers:
        if kernel == "tinygemm":
            assert m.tinygemm_max_m >= 16 and m.gemv_args() is None
        else:
            assert m.tinygemm_weight is None and m.tinygemm_max_m == 0 and m.gemv_args() is not None
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    for m in layers:
        assert _rel(m(x), F.linear(x.float(), m.dequantized(), m.bias.float())) < 1e-2
    # fp16 activations: tinygemm cannot take them, "auto" keeps the Triton path without timing
    fp16 = torch.nn.Sequential(int4_layer(256, 512, 64, False, options=ModelOptions(use_triton=True))).cuda()
    assert choose_int4_kernels(fp16, torch.float16) == "triton" and fp16[0].tinygemm_weight is None

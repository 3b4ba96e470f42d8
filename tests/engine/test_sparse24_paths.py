"""Sparse24Linear's paths (engine/layers/sparse24.py): the 2:4 decode GEMV, torch's
semi-structured kernels and a dense matmul, chosen per layer shape and batch size by timing
(an injected timer here: gpu_seconds is monkeypatched), or forced by ModelOptions.sparse24_path."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import engine.layers.sparse24 as sparse24
from engine.layers.options import ModelOptions
from engine.layers.sparse24 import Sparse24Linear, m_bucket
from kernels import quant as ref

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def _pruned(w: torch.Tensor) -> torch.Tensor:
    g = w.reshape(-1, 4).clone()
    g.scatter_(1, g.abs().topk(2, dim=1, largest=False).indices, 0.0)
    return g.reshape(w.shape)


def layer(kind: str, n: int = 48, k: int = 128, path: str = "auto", seed: int = 0,
          timing: str = "eager", **options) -> Sparse24Linear:
    """A Triton 2:4 layer with 16-bit kept values ("bf16") or int4 codes g32 with zero points;
    ``options``: more ModelOptions."""
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(n, generator=g)
    options = ModelOptions(use_triton=True, sparse24_path=path, sparse24_timing=timing, **options)
    if kind == "bf16":
        return Sparse24Linear(_pruned(torch.randn(n, k, generator=g) / k**0.5).to(torch.bfloat16), bias, options=options)
    codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, k // 32, generator=g) / 10 + 1e-3
    zero = torch.randint(-3, 4, scale.shape, generator=g).float()
    dense = _pruned(ref.dequantize_grouped(codes, scale, zero))
    return Sparse24Linear(dense, bias, codes=codes, scale=scale, zero=zero, options=options)


@pytest.fixture(autouse=True)
def fresh_measurements(monkeypatch):
    monkeypatch.setattr(sparse24, "_MEASURED", {})


def fake_timer(winners: dict[int, str], calls: list | None = None):
    """gpu_seconds stand-in: runs the candidate (a partial of run_path(path, x)) and says the
    path winners[m] takes 1 s, the others 2 s."""
    def seconds(run) -> float:
        path, x = run.args
        run()
        if calls is not None:
            calls.append((path, x.shape[0]))
        return 1.0 if winners.get(x.shape[0]) == path else 2.0
    return seconds


def test_batch_buckets():
    assert [m_bucket(m) for m in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert [m_bucket(m) for m in (17, 900, 1100, 4000, 4100, 20000)] == [512, 512, 2048, 2048, 8192, 8192]


@pytest.mark.parametrize("kind", ["bf16", "int4"])
def test_timing_picks_each_buckets_faster_path_and_never_keeps_two_forms(kind, monkeypatch, caplog):
    """Sparse wins every decode bucket: the layer keeps only its 2:4 form (no dense weight beside
    it); the decode buckets' dense candidate was timed with a kept dense weight for 16-bit kept
    values, rebuilt from the codes per call for int4 (never kept there). (The prefill buckets,
    timed on a GPU only where cuSPARSELt is a candidate, time dense rebuilt per call.)"""
    module = layer(kind)
    winners = {1: "gemv", 2: "gemv", 4: "gemv", 8: "gemv", 16: "gemv"}
    calls: list = []
    kept_while_timing: dict[int, bool] = {}
    timer = fake_timer(winners, calls)

    def seconds(run):
        kept_while_timing[run.args[1].shape[0]] = module.weight is not None
        return timer(run)

    monkeypatch.setattr(sparse24, "gpu_seconds", seconds)
    with caplog.at_level(logging.INFO, logger="engine.layers.sparse24"):
        module.time_paths(torch.float32, CPU)
    assert module.paths == winners
    assert {(p, m) for p, m in calls} == {(p, m) for m in winners for p in ("gemv", "dense")}
    assert len(calls) == 2 * len(winners) * sparse24.TIMING_REPS  # the warm-up call of each is not timed
    assert kept_while_timing == {m: kind == "bf16" for m in sparse24.DECODE_BUCKETS}, \
        "decode: dense timed with a kept weight (bf16), rebuilt per call (int4)"
    assert module.weight is None and module.kept is not None, "the 2:4 form alone"
    assert "[48, 128]" in caplog.text and "gemv" in caplog.text
    # a second layer of the same shape reuses the measurement: no timing
    other = layer(kind, seed=1)
    monkeypatch.setattr(sparse24, "gpu_seconds", lambda run: pytest.fail("timed twice for one shape"))
    other.time_paths(torch.float32, CPU)
    assert other.paths == winners


@pytest.mark.parametrize("kind", ["bf16"])  # int4: test_int4_codes_are_never_replaced_by_a_dense_weight
def test_dense_winning_batch_1_keeps_only_the_dense_weight(kind, monkeypatch, caplog):
    """Dense wins batch 1 (and 2), the GEMV the larger batches: one dense weight and nothing else,
    never both forms."""
    module = layer(kind)
    monkeypatch.setattr(sparse24, "gpu_seconds",
                        fake_timer({1: "dense", 2: "dense", 4: "gemv", 8: "gemv", 16: "gemv"}))
    with caplog.at_level(logging.INFO, logger="engine.layers.sparse24"):
        module.time_paths(torch.float32, CPU)
    assert module.kept is None and module.meta is None and module.weight is not None
    assert "dense wins at decode" in caplog.text and "MB more" not in caplog.text


@pytest.mark.parametrize("kind", ["bf16"])  # int4: test_int4_codes_are_never_replaced_by_a_dense_weight
def test_dense_everywhere_keeps_only_the_dense_weight(kind, monkeypatch, caplog):
    module = layer(kind)
    dense = module.dequantized()
    monkeypatch.setattr(sparse24, "gpu_seconds", fake_timer({m: "dense" for m in sparse24.DECODE_BUCKETS}))
    with caplog.at_level(logging.INFO, logger="engine.layers.sparse24"):
        module.time_paths(torch.float32, CPU)
    assert module.kept is None and module.meta is None and module.weight is not None
    assert all(getattr(module, name, None) is None for name in ("values", "packed", "scale", "zero"))
    assert "dense wins at decode" in caplog.text and "[48, 128]" in caplog.text
    assert module.paths == {m: "dense" for m in sparse24.DECODE_BUCKETS}, "the choice stays on record"
    assert module.timings[1] == {"gemv": 2.0, "dense": 1.0}
    torch.testing.assert_close(module.dequantized(), dense)
    x = torch.randn(3, 128)
    torch.testing.assert_close(module(x), F.linear(x, dense, module.bias), rtol=1e-5, atol=1e-5)
    assert module.candidates(1, torch.float32, CPU) == ["dense"]


@pytest.mark.parametrize("kind", ["bf16", "int4"])
def test_chosen_paths_run_and_equal_the_reference(kind, monkeypatch):
    """On a device (CUDA here faked by choose's arguments: the chosen path runs) each path
    computes the layer's dense linear."""
    module = layer(kind)
    dense = module.dequantized()
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(3))
    for path in ("gemv", "dense"):
        torch.testing.assert_close(module.run_path(path, x), F.linear(x, dense, module.bias), rtol=1e-5, atol=1e-5)


def test_choose_times_once_on_a_gpu_and_follows_the_table(monkeypatch):
    module = layer("int4")
    timed = []
    monkeypatch.setattr(Sparse24Linear, "time_paths",
                        lambda self, dtype, device: (timed.append(dtype), setattr(self, "paths", {1: "dense", 16: "gemv"})))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert module.choose(1, torch.bfloat16, CUDA) == "dense"
    assert module.choose(11, torch.bfloat16, CUDA) == "gemv"
    assert timed == [torch.bfloat16]
    assert module.choose(1, torch.bfloat16, CPU) == "gemv", "off a GPU: no timing, the sparse path"


def test_choose_does_not_time_while_capturing(monkeypatch):
    module = layer("int4")
    monkeypatch.setattr(Sparse24Linear, "time_paths", lambda *a: pytest.fail("timed inside a capture"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert module.choose(1, torch.bfloat16, CUDA) == "gemv"


def test_forced_paths(monkeypatch):
    monkeypatch.setattr(Sparse24Linear, "time_paths", lambda *a: pytest.fail("a forced path is not timed"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    sparse = layer("int4", path="sparse")
    assert sparse.choose(1, torch.bfloat16, CUDA) == "gemv"
    assert sparse.choose(4096, torch.bfloat16, CUDA) == "dense", "48 rows: no semi-structured kernel"
    big = layer("bf16", n=64, k=128, path="sparse")
    assert big.choose(4096, torch.bfloat16, CUDA) == "cusparselt"
    dense = layer("int4", path="dense")
    want = dense.dequantized()
    x = torch.randn(2, 128)
    torch.testing.assert_close(dense(x), F.linear(x, want, dense.bias), rtol=1e-5, atol=1e-5)
    assert dense.meta is None and dense.weight is not None, "forced dense keeps only the dense weight"
    with pytest.raises(ValueError, match="sparse24_path"):
        layer("int4", path="fast")


def test_gemv_not_offered_where_it_cannot_run():
    """fp32 kept values, K not whole meta words, int4 groups of 16, non-integral zero points:
    the decode batch runs the dense matmul (rebuilt for the call)."""
    options = ModelOptions(use_triton=True)
    w = _pruned(torch.randn(16, 64))
    assert Sparse24Linear(w, options=options).candidates(1, torch.float32, CPU) == ["dense"]
    assert Sparse24Linear(w.bfloat16(), options=options).candidates(1, torch.float32, CPU) == ["gemv", "dense"]
    assert Sparse24Linear(_pruned(torch.randn(16, 72)).bfloat16(), options=options).candidates(
        1, torch.float32, CPU) == ["dense"]
    codes = torch.randint(-8, 8, (16, 64), dtype=torch.int8)
    for group, zero in ((16, None), (32, torch.full((16, 2), 0.5))):
        scale = torch.rand(16, 64 // group) + 0.1
        dense = _pruned(ref.dequantize_grouped(codes, scale, zero))
        module = Sparse24Linear(dense, codes=codes, scale=scale, zero=zero, options=options)
        assert module.candidates(1, torch.float32, CPU) == ["dense"], (group, zero)
        x = torch.randn(1, 64)
        torch.testing.assert_close(module(x), F.linear(x, module.dequantized()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["bf16", "int4"])
@pytest.mark.parametrize("m", [1, 5])
def test_cpu_triton_decode_runs_the_gemv(kind, m, monkeypatch):
    module = layer(kind)
    calls = []
    real = sparse24.sparse24_gemv
    monkeypatch.setattr(sparse24, "sparse24_gemv", lambda *a, **kw: (calls.append(a[0].shape[0]), real(*a, **kw))[1])
    x = torch.randn(m, 128)
    torch.testing.assert_close(module(x), F.linear(x, module.dequantized(), module.bias), rtol=1e-5, atol=1e-5)
    assert calls == [m]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_triton_int4_decode_takes_the_fast_path(dtype, monkeypatch):
    """A 16-bit decode row on int4 codes runs kernels/quant_gemv.py's fast M == 1 kernel (not the
    select one) and computes the fp32 dequantized weight's product, rounded once."""
    import kernels.quant_gemv as qg

    module = layer("int4")
    module.bias.data = module.bias.data.to(dtype)
    launched = []
    for name in ("_sparse24_int4_fast_kernel", "_sparse24_select_kernel"):
        kernel = getattr(qg, name)
        monkeypatch.setattr(qg, name, type("Spy", (), {"__getitem__": lambda self, grid, k=kernel, n=name: (
            launched.append(n), k[grid])[1]})())
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(3)).to(dtype)
    want = ref.fp32_weight_linear_ref(x, module.dequantized(), module.bias)
    torch.testing.assert_close(module(x), want, rtol=1e-2, atol=1e-2)
    assert launched == ["_sparse24_int4_fast_kernel"]


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("kind", ["bf16", "int4"])
def test_gpu_timing_then_capture(kind):
    """On the GPU: the first eager call times the paths (real CUDA events), every bucket has a
    path, and a capture after it replays what eager computes."""
    module = layer(kind, n=256, k=512).cuda()
    module.bias.data = module.bias.data.bfloat16()
    dense = module.dequantized().cuda()
    for m in (1, 16, 600):
        x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
        out = module(x)
        err = ((out.float() - F.linear(x.float(), dense, module.bias.float())).norm() / out.float().norm()).item()
        assert err < 2e-2 and out.is_contiguous(), (m, err)
    assert set(module.paths) >= {1, 2, 4, 8, 16, 512}
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = module(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, module(x))


def test_capture_never_takes_the_semi_structured_kernels(monkeypatch):
    module = layer("bf16", n=64, k=128)
    module.paths = {512: "cusparselt"}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert module.choose(600, torch.bfloat16, CUDA) == "dense"
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert module.choose(600, torch.bfloat16, CUDA) == "cusparselt"


def test_a_layer_that_became_dense_during_timing_never_takes_a_sparse_path(monkeypatch):
    """The first call on a GPU times the paths; when that leaves the layer dense only, the call that
    triggered it must take the dense path, not the table's cuSPARSELt entry for its bucket (a
    prefill of 1,024 rows hit `self.meta.device` on None: H200, eval.bench.quant sparse24)."""
    module = layer("bf16", n=64, k=128)

    def timing(self, dtype, device):
        self.paths = {1: "dense", 512: "cusparselt"}
        self.keep_dense_only(dtype, torch.device("cpu"))

    monkeypatch.setattr(Sparse24Linear, "time_paths", timing)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert module.candidates(600, torch.bfloat16, CUDA) == ["cusparselt", "dense"]
    assert module.choose(600, torch.bfloat16, CUDA) == "dense"
    assert module.choose(1, torch.bfloat16, CUDA) == "dense"


@pytest.mark.parametrize("kind", ["bf16"])  # int4 (dense rebuilt, no weight beside): test_int4_codes_are_never_...
def test_dense_winning_only_larger_decode_batches_keeps_the_2_4_form(kind, monkeypatch, caplog):
    """The sparse GEMV wins batch 1 (where reading fewer bytes pays) and dense wins batch 16 (compute):
    the layer keeps its 2:4 form and decodes every batch with the GEMV: a dense weight for batch 16
    would have to sit beside the 2:4 form (more memory than bf16 itself)."""
    module = layer(kind)
    monkeypatch.setattr(sparse24, "gpu_seconds",
                        fake_timer({1: "gemv", 2: "gemv", 4: "gemv", 8: "dense", 16: "dense"}))
    with caplog.at_level(logging.INFO, logger="engine.layers.sparse24"):
        module.time_paths(torch.float32, CPU)
    assert module.weight is None and module.kept is not None
    assert module.paths == {m: "gemv" for m in sparse24.DECODE_BUCKETS}
    assert module.timings[16] == {"gemv": 2.0, "dense": 1.0}, "the measurement stays on record"
    assert "dense faster at" in caplog.text


@pytest.mark.parametrize("kind", ["bf16"])  # int4: test_int4_codes_are_never_replaced_by_a_dense_weight
def test_a_gemv_winning_batch_1_by_little_but_losing_the_other_decode_batches_by_much_keeps_dense(
        kind, monkeypatch, caplog):
    """The H200's 7B MLP shape (22016x4096, 2026-11-29, benchmarks/2026-11-29-h200-s8/quant_24.jsonl):
    the GEMV 56.5 us against dense 76.6 at one row, 334-381 us against 76-80 at 2-16 rows. Keeping the
    2:4 form alone made every multi-row decode step 4-6x slower there (batch 16 at 0.25x bf16): the
    decode buckets taken together decide, and here dense wins them."""
    module = layer(kind)
    us = {1: (56.5, 76.6), 2: (334.3, 77.8), 4: (341.2, 79.3), 8: (354.8, 79.8), 16: (381.1, 75.7)}

    def seconds(run) -> float:
        path, x = run.args
        run()
        return us[x.shape[0]][0 if path == "gemv" else 1] * 1e-6

    monkeypatch.setattr(sparse24, "gpu_seconds", seconds)
    with caplog.at_level(logging.INFO, logger="engine.layers.sparse24"):
        module.time_paths(torch.float32, CPU)
    assert module.kept is None and module.meta is None and module.weight is not None
    assert module.paths[1] == "gemv", "batch 1 alone still prefers the GEMV: the record says so"
    assert "dense wins at decode" in caplog.text
    assert module.candidates(1, torch.float32, CPU) == ["dense"]


def test_sparse24_path_is_an_engine_setting_checked_by_name(model_dir):
    """LLM(path, sparse24_path=...) reaches every 2:4 layer through ModelOptions; a wrong value is
    one error naming the setting, when the config is made (before any loading)."""
    from engine.config import EngineConfig

    path = model_dir("llama_gqa_untied")
    with pytest.raises(ValueError, match="sparse24_path: 'fast'"):
        EngineConfig(model=path, sparse24_path="fast")
    with pytest.raises(ValueError, match="sparse24_path"):
        ModelOptions(sparse24_path="cusparselt")
    assert EngineConfig(model=path, sparse24_path="dense").model_options().sparse24_path == "dense"


def test_int4_codes_are_never_replaced_by_a_dense_weight(monkeypatch, caplog):
    """The H200 (2026-11-30, benchmarks/2026-11-30-h200x2-s12/bg/g1b/quant_24.jsonl, sparse24_int4_g128 at
    22016x4096): the fast GEMV 26.2 us at one row against a kept bf16 weight's 49.6, 455-505 us against
    49-73 at 2-16 rows. The decode buckets taken together went to dense, the layer kept only a bf16
    weight, and the variant was served as bf16 (13.2 GB a step, 0.85x bf16's tok/s). int4 codes keep
    their form: dense is timed rebuilt from the codes (never a kept weight), taken only where it timed
    faster, and rebuilt per call there."""
    module = layer("int4")
    want = module.dequantized()
    us = {1: (26.2, 49.6), 2: (455.5, 48.7), 4: (461.9, 49.0), 8: (475.1, 73.4), 16: (505.2, 52.1)}
    kept_while_timing = []

    def seconds(run) -> float:
        path, x = run.args
        kept_while_timing.append(module.weight is not None)
        run()
        return us[x.shape[0]][0 if path == "gemv" else 1] * 1e-6

    monkeypatch.setattr(sparse24, "gpu_seconds", seconds)
    with caplog.at_level(logging.INFO, logger="engine.layers.sparse24"):
        module.time_paths(torch.float32, CPU)
    assert kept_while_timing and not any(kept_while_timing), "dense timed rebuilt per call"
    assert module.weight is None and all(getattr(module, b) is not None for b in ("packed", "meta", "scale", "zero"))
    assert module.paths == {1: "gemv", 2: "dense", 4: "dense", 8: "dense", 16: "dense"}
    assert "2:4 int4 layer [48, 128]" in caplog.text and "dense wins at decode" not in caplog.text
    assert module.candidates(1, torch.float32, CPU) == ["gemv", "dense"]
    x = torch.randn(4, 128)
    torch.testing.assert_close(module.run_path("dense", x), F.linear(x, want, module.bias), rtol=1e-5, atol=1e-5)
    assert module.weight is None, "the rebuilt weight is not kept"
    # dense faster everywhere: still the 2:4 form alone
    other = layer("int4", n=32)
    monkeypatch.setattr(sparse24, "gpu_seconds", fake_timer({m: "dense" for m in sparse24.DECODE_BUCKETS}))
    other.time_paths(torch.float32, CPU)
    assert other.weight is None and other.kept is not None
    assert other.paths == {m: "dense" for m in sparse24.DECODE_BUCKETS}


def test_int4_decode_batches_also_time_the_fast_kernel_row_by_row(monkeypatch):
    """16-bit rows on int4 codes: at 2-16 rows the M == 1 fast kernel once a row ("gemv_rows") is a
    candidate beside the tensor-core dot path and dense, timed and taken where faster; it computes
    the fp32 weight's product per row. Not for 16-bit kept values, fp32 rows, exact_dequant."""
    module = layer("int4")
    assert module.candidates(1, torch.bfloat16, CPU) == ["gemv", "dense"]
    assert module.candidates(4, torch.bfloat16, CPU) == ["mma", "gemv", "gemv_rows", "dense"]
    assert module.candidates(4, torch.float32, CPU) == ["gemv", "dense"]
    assert layer("bf16").candidates(4, torch.bfloat16, CPU) == ["gemv", "dense"]
    exact = Sparse24Linear(module.dequantized(), codes=torch.randint(-8, 8, (48, 128), dtype=torch.int8),
                           scale=torch.rand(48, 4) + 0.1, options=ModelOptions(use_triton=True, exact_dequant=True))
    assert exact.candidates(4, torch.bfloat16, CPU) == ["gemv", "dense"]
    timed = []
    module.run_path = lambda path, x: torch.zeros(x.shape[0], 48, dtype=x.dtype)  # timing only: nothing to run
    monkeypatch.setattr(sparse24, "gpu_seconds",
                        lambda run: (timed.append(run.args[0]), 1.0 if run.args[0] == "gemv_rows" else 2.0)[1])
    module.time_paths(torch.bfloat16, CPU)
    assert module.paths == {1: "gemv", 2: "gemv_rows", 4: "gemv_rows", 8: "gemv_rows", 16: "gemv_rows"}
    assert timed.count("gemv_rows") == 4 * sparse24.TIMING_REPS
    del module.run_path
    module.bias.data = module.bias.data.bfloat16()
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(5)).bfloat16()
    want = ref.fp32_weight_linear_ref(x, module.dequantized(), module.bias)
    torch.testing.assert_close(module.run_path("gemv_rows", x), want, rtol=1e-2, atol=1e-2)


def test_sparse24_timing_is_an_engine_setting_checked_by_name(model_dir, monkeypatch):
    """LLM(path, sparse24_timing=...) reaches the 2:4 layers; a wrong value is one error naming it.
    Off a GPU "graph" times as "eager" does (no graph to capture), and a measurement is kept per
    timing: a second engine in the process with the other timing measures again."""
    from engine.config import EngineConfig

    path = model_dir("llama_gqa_untied")
    with pytest.raises(ValueError, match="sparse24_timing: 'cuda'"):
        EngineConfig(model=path, sparse24_timing="cuda")
    assert EngineConfig(model=path, sparse24_timing="graph").model_options().sparse24_timing == "graph"
    assert EngineConfig(model=path).model_options().sparse24_timing == "eager"
    timed = []
    monkeypatch.setattr(sparse24, "gpu_seconds", lambda run: (timed.append(run.args[0]), 1.0)[1])
    for timing in ("graph", "eager"):
        module = layer("int4", timing=timing)
        module.run_path = lambda path, x: torch.zeros(x.shape[0], 48)
        module.time_paths(torch.float32, CPU)
    assert len(timed) == 2 * 2 * len(sparse24.DECODE_BUCKETS) * sparse24.TIMING_REPS


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("kind", ["bf16", "int4"])
def test_gpu_graph_timing(kind):
    """sparse24_timing "graph" on the GPU: the decode buckets' candidates timed as CUDA graph
    replays, every bucket settled, the chosen paths computing the layer."""
    module = layer(kind, n=256, k=512, timing="graph").cuda()
    module.bias.data = module.bias.data.bfloat16()
    dense = module.dequantized().cuda()
    x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    out = module(x)
    assert set(module.paths) >= set(sparse24.DECODE_BUCKETS)
    assert all(s > 0 for t in module.timings.values() for s in t.values())
    err = ((out.float() - F.linear(x.float(), dense, module.bias.float())).norm() / out.float().norm()).item()
    assert err < 2e-2



def test_fused_decode_reads_int4_layers_on_their_fast_gemv_only():
    """gemv_weight hands the fused decode kernels a 2:4 + int4 layer (quant "sparse24_int4", its
    codes, positions, scales, zero points) where its batch-1 path is the fast GEMV; 16-bit kept
    values, exact_dequant, sparse24_path "dense", batch-invariant mode and Triton off keep the
    unfused path. fused_decode_rows: one row with such a layer, none for fp32 activations."""
    from engine.layers.quantized import fused_decode_rows, gemv_weight
    from kernels.gemv import SMALL_M

    int4 = layer("int4")
    weight, args = gemv_weight(int4)
    assert weight is int4.packed and args == {"quant": "sparse24_int4", "meta": int4.meta, "scale": int4.scale,
                                              "zero": int4.zero, "fast": True}
    assert gemv_weight(layer("bf16")) is None
    assert gemv_weight(layer("int4", exact_dequant=True)) is None
    assert gemv_weight(layer("int4", path="dense")) is None
    assert gemv_weight(layer("int4", batch_invariant=True)) is None
    off = layer("int4")
    off.use_triton = False
    assert gemv_weight(off) is None
    dense = torch.nn.Linear(128, 48)
    assert fused_decode_rows([dense], torch.float32) == SMALL_M
    assert fused_decode_rows([dense, int4], torch.bfloat16) == 1
    assert fused_decode_rows([dense, int4], torch.float16) == 1
    assert fused_decode_rows([dense, int4], torch.float32) == 0
    assert fused_decode_rows([dense, layer("bf16")], torch.bfloat16) == 0


def test_int4_decode_batches_take_the_tensor_core_gemm_first(monkeypatch):
    """16-bit rows on int4 codes at 2-16 rows: kernels/sparse24_mma.py's tensor-core GEMM ("mma") is
    the first candidate (what "sparse", and a device without timing, take), timed beside the others
    and taken where faster; it computes the fp32 weight's product. Not at one row (the fused fast
    GEMV's), for fp32 rows, 16-bit kept values, exact_dequant, or zero points outside int4's range;
    a layer left with only a dense weight has none."""
    module = layer("int4")
    assert module.candidates(1, torch.bfloat16, CPU) == ["gemv", "dense"]
    for m in (2, 9, 16):
        assert module.candidates(m, torch.float16, CPU)[0] == "mma"
    assert "mma" not in module.candidates(4, torch.float32, CPU)
    assert "mma" not in layer("bf16").candidates(4, torch.bfloat16, CPU)
    assert "mma" not in layer("int4", exact_dequant=True).candidates(4, torch.bfloat16, CPU)
    codes = torch.randint(-8, 8, (16, 64), dtype=torch.int8)
    scale, far = torch.rand(16, 2) + 0.1, torch.full((16, 2), 9.0)  # integral (the GEMV takes it), not int4's
    wide = Sparse24Linear(_pruned(ref.dequantize_grouped(codes, scale, far)), codes=codes, scale=scale, zero=far,
                          options=ModelOptions(use_triton=True))
    assert wide.candidates(4, torch.bfloat16, CPU) == ["gemv", "gemv_rows", "dense"]
    module.bias.data = module.bias.data.bfloat16()
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(6)).bfloat16()
    want = ref.fp32_weight_linear_ref(x, module.dequantized(), module.bias)
    torch.testing.assert_close(module.run_path("mma", x), want, rtol=1e-2, atol=1e-2)
    calls = []
    real = sparse24.sparse24_mma
    monkeypatch.setattr(sparse24, "sparse24_mma", lambda *a, **kw: (calls.append(a[0].shape[0]), real(*a, **kw))[1])
    torch.testing.assert_close(module(x), want, rtol=1e-2, atol=1e-2)  # off a GPU: the first candidate
    assert calls == [5]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert layer("int4", path="sparse").choose(3, torch.bfloat16, CUDA) == "mma"
    timed = []
    module.run_path = lambda path, x: torch.zeros(x.shape[0], 48, dtype=x.dtype)  # timing only: nothing to run
    monkeypatch.setattr(sparse24, "gpu_seconds",
                        lambda run: (timed.append(run.args[0]), 1.0 if run.args[0] == "mma" else 2.0)[1])
    module.time_paths(torch.bfloat16, CPU)
    assert module.paths == {1: "gemv", 2: "mma", 4: "mma", 8: "mma", 16: "mma"}
    assert timed.count("mma") == 4 * sparse24.TIMING_REPS
    del module.run_path
    module.keep_dense_only(torch.bfloat16, CPU)
    assert module.mma_weight() is None
    assert module.candidates(4, torch.bfloat16, CPU) == ["dense"]

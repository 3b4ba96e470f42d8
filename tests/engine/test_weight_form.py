"""Weight-only compressed linears served as codes or dense (EngineConfig.compressed_weights,
engine/weight_form.py): "keep" and "dequantize" on the CPU, and "auto"'s timed choice, run on the
CPU with the GPU's gate, timer and memory replaced by the test's (the forwards it times still run)."""

from __future__ import annotations

import logging

import pytest
import torch
from compressed_artifacts import make_artifact
from torch import nn

import engine.weight_form as weight_form
from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.layers.options import ModelOptions
from engine.layers.quantized import CompressedLinear, Int4Linear, Int8Linear
from engine.layers.sparse24 import Sparse24Linear
from engine.weight_form import MIN_GAIN, compressed_layers
from kernels.gemv import SMALL_M

pytest.importorskip("compressed_tensors")

# per decoder layer: qkv_proj, o_proj, gate_up_proj, down_proj (the tiny Llama's two layers)
DECODER_LINEARS = 8
PROMPTS = [[5, 17, 99, 3, 250, 42, 8], [300, 12], list(range(40, 80))]
PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
ENGINE = dict(device="cpu", max_model_len=128, block_size=4, max_num_seqs=SMALL_M)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("weight_form")
    return lambda scheme: make_artifact(scheme, root / scheme)


class FakeGPU:
    """"auto" on the CPU as on a GPU: the gate open, the device's memory (free, total) and the forward
    timer the test's. The timer runs the forward it is asked to time (so each form really runs) and
    answers per form: "codes" where compressed decoder linears are in place, else "dense"."""

    def __init__(self, monkeypatch, times: dict[tuple[str, int], float], memory: tuple[int, int] = (1 << 40, 1 << 41)):
        self.times, self.calls = times, []
        monkeypatch.setattr(weight_form, "_can_time", lambda device: True)
        monkeypatch.setattr(weight_form, "_memory", lambda device: memory)
        monkeypatch.setattr(weight_form, "_forward_us", self.forward_us)

    def forward_us(self, runner, rows: int, graphed: bool) -> float:
        runner.eager_decode_forward(rows)
        form = "codes" if compressed_layers(runner.model) else "dense"
        self.calls.append((form, rows))
        return self.times[form, rows]


def times(one: float, many: float) -> dict[tuple[str, int], float]:
    """Forward us per form and rows, dense `one` / `many` times the codes' at 1 / SMALL_M rows."""
    return {("codes", 1): 100.0, ("dense", 1): one * 100.0, ("codes", SMALL_M): 200.0, ("dense", SMALL_M): many * 200.0}


def tokens(llm: LLM) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]


def test_the_option_is_checked_by_name(model_dir):
    with pytest.raises(ValueError, match="compressed_weights: 'fast' is not one of auto, keep, dequantize"):
        ModelOptions(compressed_weights="fast")
    with pytest.raises(ValueError, match="compressed_weights"):
        EngineConfig(model=model_dir("llama_gqa_untied"), compressed_weights="dense")
    config = EngineConfig(model=model_dir("llama_gqa_untied"), compressed_weights="keep")
    assert config.model_options().compressed_weights == "keep"


@pytest.mark.parametrize("scheme,module", [("int4_g32_asym", Int4Linear), ("int8", Int8Linear),
                                           ("sparse24", Sparse24Linear), ("sparse24_int4", Sparse24Linear)])
def test_keep_serves_the_codes_and_auto_dequantizes_on_the_cpu(artifacts, scheme, module):
    """On the CPU "auto" is the dequantized serving path (as before the option), nothing timed; "keep"
    keeps the codes and computes with their torch references; "dequantize" is the dense path asked for
    by name. Greedy tokens agree (the logits differ by summation order only)."""
    path = artifacts(scheme)
    outputs = {}
    for form in ("auto", "keep", "dequantize"):
        llm = LLM(str(path), compressed_weights=form, **ENGINE)
        kept = compressed_layers(llm.engine.runner.model)
        assert len(kept) == (DECODER_LINEARS if form == "keep" else 0), form
        assert all(isinstance(m, module) for m in kept.values())
        assert llm.engine.runner.weight_form_us == {}
        outputs[form] = tokens(llm)
    assert outputs["auto"] == outputs["dequantize"] == outputs["keep"]


@pytest.mark.parametrize("scheme", ["int4_g32", "int4_g32_asym", "int8", "sparse24", "sparse24_int4"])
def test_auto_serves_dense_weights_where_the_forward_times_faster(artifacts, monkeypatch, caplog, scheme):
    """Dense faster at 1 and SMALL_M rows: every decoder linear becomes an nn.Linear holding exactly the
    weight the dequantizing loader makes (bias with it), the lm_head untouched; the engine's tokens are
    the "dequantize" engine's."""
    path = artifacts(scheme)
    gpu = FakeGPU(monkeypatch, times(0.5, 0.9))
    with caplog.at_level(logging.INFO, logger="engine.weights"):
        auto = LLM(str(path), **ENGINE)
    runner = auto.engine.runner
    assert sorted(set(gpu.calls)) == [("codes", 1), ("codes", SMALL_M), ("dense", 1), ("dense", SMALL_M)]
    assert runner.weight_form_us == {"codes": {1: 100.0, SMALL_M: 200.0}, "dense": {1: 50.0, SMALL_M: 180.0}}
    assert "compressed_weights auto: dense" in caplog.text
    assert not compressed_layers(runner.model)
    reference = LLM(str(path), compressed_weights="dequantize", **ENGINE)
    dense = dict(reference.engine.runner.model.named_modules())
    for name, m in runner.model.named_modules():
        if isinstance(m, (nn.Linear, CompressedLinear)):
            assert isinstance(m, nn.Linear) and isinstance(dense[name], nn.Linear), name  # (nn.Linear for the
            # row-parallel o_proj / down_proj: one rank, where the two compute the same)
            torch.testing.assert_close(m.weight, dense[name].weight, rtol=0, atol=0)
            assert not m.weight.is_inference()  # update_weights copies into it in place
            assert (m.bias is None) == (dense[name].bias is None)
    assert tokens(auto) == tokens(reference)


@pytest.mark.parametrize("one,many,why", [
    (0.5, 1.1, "dense slower at SMALL_M rows"),
    (1 / MIN_GAIN + 0.005, 0.5, "dense faster at one row by less than MIN_GAIN"),
    (1.2, 0.5, "dense slower at one row"),
])
def test_auto_puts_the_same_modules_back_unless_dense_wins_both(artifacts, monkeypatch, caplog, one, many, why):
    path = artifacts("int4_g32")
    FakeGPU(monkeypatch, times(one, many))
    with caplog.at_level(logging.INFO, logger="engine.weights"):
        auto = LLM(str(path), **ENGINE)
    assert "compressed_weights auto: codes" in caplog.text, why
    model = auto.engine.runner.model
    assert len(compressed_layers(model)) == DECODER_LINEARS, why
    keep = LLM(str(path), compressed_weights="keep", **ENGINE)
    assert tokens(auto) == tokens(keep)
    assert model.model.fused_rows == keep.engine.runner.model.model.fused_rows


@pytest.mark.parametrize("memory", [(1 << 40, 1000), (1000, 1 << 40)], ids=["device_too_small", "too_little_free"])
def test_auto_keeps_the_codes_untimed_where_dense_would_not_fit(artifacts, monkeypatch, caplog, memory):
    """The dense weights over MAX_DENSE_FRACTION of the device, or over a quarter of what the KV cache
    left free: the codes stay, nothing timed, and the log says why."""
    gpu = FakeGPU(monkeypatch, times(0.1, 0.1), memory=memory)
    with caplog.at_level(logging.INFO, logger="engine.weights"):
        auto = LLM(str(artifacts("int4_g32")), **ENGINE)
    assert len(compressed_layers(auto.engine.runner.model)) == DECODER_LINEARS and gpu.calls == []
    assert "codes kept, untimed" in caplog.text and auto.engine.runner.weight_form_us == {}


def test_a_failed_timing_serves_the_codes(artifacts, monkeypatch, caplog):
    """The choice is an optimisation: a timing that fails (here the dense form's forward) leaves the
    codes in place, says so, and the engine serves them as "keep" does."""
    path = artifacts("int4_g32")
    gpu = FakeGPU(monkeypatch, times(0.5, 0.5))
    timed = gpu.forward_us

    def failing(runner, rows, graphed):
        if not compressed_layers(runner.model):
            raise RuntimeError("CUDA error: out of resources")
        return timed(runner, rows, graphed)

    monkeypatch.setattr(weight_form, "_forward_us", failing)
    with caplog.at_level(logging.WARNING, logger="engine.weights"):
        auto = LLM(str(path), **ENGINE)
    assert "codes kept, the timing failed (RuntimeError: CUDA error: out of resources)" in caplog.text
    assert len(compressed_layers(auto.engine.runner.model)) == DECODER_LINEARS
    assert auto.engine.runner.weight_form_us == {}
    assert tokens(auto) == tokens(LLM(str(path), compressed_weights="keep", **ENGINE))


def test_keep_and_dense_models_are_not_timed(artifacts, model_dir, monkeypatch):
    gpu = FakeGPU(monkeypatch, times(0.1, 0.1))
    keep = LLM(str(artifacts("int4_g32")), compressed_weights="keep", **ENGINE)
    assert len(compressed_layers(keep.engine.runner.model)) == DECODER_LINEARS
    LLM(model_dir("llama_gqa_untied"), **ENGINE)  # nothing compressed
    assert gpu.calls == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", ["int4_g32_asym", "int8", "sparse24_int4"])
def test_gpu_auto_serves_what_the_form_it_chose_serves(artifacts, caplog, scheme):
    """bf16 graphs on the GPU: "auto" times the decode forward both ways (logged), and its greedy tokens
    equal an engine forced to the form it chose ("dequantize" for dense, "keep" for the codes), the
    fused decode rows, the int4 kernel and the 2:4 paths pinned so that both run the same kernels."""
    path = artifacts(scheme)
    engine = dict(max_model_len=128, fused_decode_rows=SMALL_M, enable_prefix_caching=False, int4_kernel="triton",
                  sparse24_path="sparse")  # 2:4: no per-linear timing either (it could differ between two engines)
    with caplog.at_level(logging.INFO, logger="engine.weights"):
        auto = LLM(str(path), **engine)
    assert "compressed_weights auto:" in caplog.text
    dense = not compressed_layers(auto.engine.runner.model)
    print(f"[{scheme}] auto served {'dense' if dense else 'the codes'}: {caplog.text.strip()}", flush=True)
    got = tokens(auto)
    del auto
    forced = LLM(str(path), compressed_weights="dequantize" if dense else "keep", **engine)
    assert len(compressed_layers(forced.engine.runner.model)) == (0 if dense else DECODER_LINEARS)
    assert got == tokens(forced)

"""Weight-only compressed linears kept or served dense (EngineConfig.compressed_weights,
engine/layers/weight_form.py): "keep" and "dequantize" on the CPU, and "auto"'s choice on a
model loaded compressed, with the GPU's timer and memory size replaced by the test's."""

from __future__ import annotations

import logging

import pytest
import torch
from compressed_artifacts import make_artifact
from torch import nn

import engine.layers.weight_form as weight_form
from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.layers.options import ModelOptions
from engine.layers.quantized import CompressedLinear, Int4Linear, Int8Linear
from engine.layers.weight_form import MIN_GAIN, choose_weight_form, compressed_layers
from engine.models.llama import LlamaForCausalLM
from kernels.gemv import SMALL_M

pytest.importorskip("compressed_tensors")

# per decoder layer: qkv_proj, o_proj, gate_up_proj, down_proj (the tiny Llama's two layers)
DECODER_LINEARS = 8


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("weight_form")
    return lambda scheme: make_artifact(scheme, root / scheme)


def model_of(path, **options) -> LlamaForCausalLM:
    """The engine's model of an artifact (fp32, CPU), loaded with its codes kept."""
    config = EngineConfig(model=str(path), device="cpu", max_model_len=128)
    model = LlamaForCausalLM(config.hf_config, max_position=128, options=ModelOptions(**options))
    model.load_weights(str(path), keep_compressed=True)
    return model


class FakeGPU:
    """The GPU's timer (seconds per form and row count) and memory size, and the calls made."""

    def __init__(self, monkeypatch, times: dict[tuple[str, int], float], memory: int = 1 << 40) -> None:
        self.times, self.calls = times, []
        monkeypatch.setattr(weight_form, "_seconds", self.seconds)
        monkeypatch.setattr(weight_form, "_device_bytes", lambda device: memory)
        monkeypatch.setattr(weight_form, "_can_time", lambda device: True)

    def seconds(self, run, form: str, rows: int) -> float:
        self.calls.append((form, rows))
        return self.times[form, rows]


def test_the_option_is_checked_by_name(model_dir):
    with pytest.raises(ValueError, match="compressed_weights: 'fast' is not one of auto, keep, dequantize"):
        ModelOptions(compressed_weights="fast")
    with pytest.raises(ValueError, match="compressed_weights"):
        EngineConfig(model=model_dir("llama_gqa_untied"), compressed_weights="dense")
    config = EngineConfig(model=model_dir("llama_gqa_untied"), compressed_weights="keep")
    assert config.model_options().compressed_weights == "keep"


@pytest.mark.parametrize("scheme,module", [("int4_g32_asym", Int4Linear), ("int8", Int8Linear)])
def test_keep_serves_the_codes_and_auto_dequantizes_on_the_cpu(artifacts, scheme, module):
    """On the CPU "auto" is the dequantized serving path (as before the option); "keep" keeps the codes
    and computes with their torch references; "dequantize" is the dense path asked for by name. Greedy
    tokens agree (the logits differ by summation order only)."""
    path = artifacts(scheme)
    outputs = {}
    for form in ("auto", "keep", "dequantize"):
        llm = LLM(str(path), device="cpu", max_model_len=128, block_size=4, compressed_weights=form)
        model = llm.engine.runner.model
        kept = compressed_layers(model)
        assert len(kept) == (DECODER_LINEARS if form == "keep" else 0), form
        assert all(isinstance(m, module) for m in kept.values())
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        outputs[form] = [o.token_ids for o in llm.generate([[5, 17, 99, 3], [300, 12, 7]], params)]
    assert outputs["auto"] == outputs["dequantize"] == outputs["keep"]


def dense_times(one: float, many: float) -> dict[tuple[str, int], float]:
    """Times per form and row count where dense is `one` and `many` times the compressed one's."""
    return {("compressed", 1): 1e-5, ("dense", 1): one * 1e-5,
            ("compressed", SMALL_M): 2e-5, ("dense", SMALL_M): many * 2e-5}


@pytest.mark.parametrize("scheme", ["int4_g32", "int4_g32_asym", "int8"])
def test_auto_serves_dense_weights_where_they_time_faster(artifacts, monkeypatch, caplog, scheme):
    """Dense faster at 1 and SMALL_M rows: every decoder linear becomes an nn.Linear holding exactly the
    weight the dequantizing loader makes, the bias with it; the lm_head and the fused decode follow."""
    path = artifacts(scheme)
    gpu = FakeGPU(monkeypatch, dense_times(0.5, 0.9))
    with caplog.at_level(logging.INFO, logger="engine.weights"):
        model = model_of(path, use_triton=True)
    assert not compressed_layers(model)
    assert sorted(set(gpu.calls)) == [("compressed", 1), ("compressed", SMALL_M), ("dense", 1), ("dense", SMALL_M)]
    assert "compressed_weights auto: dense" in caplog.text and "dequantized into" in caplog.text
    dense = LlamaForCausalLM(model.config, max_position=128, options=ModelOptions())
    dense.load_weights(str(path), keep_compressed=False)
    reference = dict(dense.named_modules())
    for name, m in model.model.layers.named_modules():
        if isinstance(m, (nn.Linear, CompressedLinear)):
            assert type(m) is nn.Linear, name
            torch.testing.assert_close(m.weight, reference[f"model.layers.{name}"].weight, rtol=0, atol=0)
            assert (m.bias is None) == (reference[f"model.layers.{name}"].bias is None)
    assert model.model.fusable  # recomputed on the dense linears


@pytest.mark.parametrize("one,many,why", [
    (0.5, 1.1, "dense slower at SMALL_M rows"),
    (1 / MIN_GAIN + 0.005, 0.5, "dense faster at one row by less than MIN_GAIN"),
    (1.2, 0.5, "dense slower at one row"),
])
def test_auto_keeps_the_codes_unless_dense_wins_both(artifacts, monkeypatch, one, many, why):
    FakeGPU(monkeypatch, dense_times(one, many))
    model = model_of(artifacts("int4_g32"), use_triton=True)
    assert len(compressed_layers(model)) == DECODER_LINEARS, why


def test_auto_keeps_the_codes_without_timing_where_dense_would_not_fit(artifacts, monkeypatch, caplog):
    """The dense weights over MAX_DENSE_FRACTION of the device's memory: kept, nothing timed, said so."""
    path = artifacts("int4_g32")
    gpu = FakeGPU(monkeypatch, dense_times(0.1, 0.1), memory=1000)
    with caplog.at_level(logging.INFO, logger="engine.weights"):
        model = model_of(path, use_triton=True)
    assert len(compressed_layers(model)) == DECODER_LINEARS and gpu.calls == []
    assert "keeping the codes" in caplog.text


@pytest.mark.parametrize("options", [{"use_triton": True, "compressed_weights": "keep"},
                                     {"use_triton": False}], ids=["keep", "torch_references"])
def test_nothing_is_timed_with_keep_or_without_the_triton_kernels(artifacts, monkeypatch, options):
    gpu = FakeGPU(monkeypatch, dense_times(0.1, 0.1))
    model = model_of(artifacts("int4_g32"), **options)
    assert len(compressed_layers(model)) == DECODER_LINEARS and gpu.calls == []
    assert choose_weight_form(model, torch.float32) == "compressed"


def test_the_cpu_is_not_timed(artifacts, monkeypatch):
    """Codes kept on the CPU (keep_compressed) under "auto": nothing timed there, the codes stay."""
    gpu = FakeGPU(monkeypatch, dense_times(0.1, 0.1))
    monkeypatch.setattr(weight_form, "_can_time", lambda device: device.type == "cuda")
    model = model_of(artifacts("int4_g32"), use_triton=True)
    assert len(compressed_layers(model)) == DECODER_LINEARS and gpu.calls == []


def test_no_weight_only_layers_is_no_choice(model_dir):
    config = EngineConfig(model=model_dir("llama_gqa_untied"), device="cpu")
    model = LlamaForCausalLM(config.hf_config, max_position=128, options=ModelOptions(use_triton=True))
    assert choose_weight_form(model, torch.float32) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", ["int4_g32_asym", "int8"])
def test_gpu_auto_serves_what_the_form_it_chose_serves(artifacts, caplog, scheme):
    """bf16 graphs on the GPU: "auto" times the real kernels (logged), and its greedy tokens equal an
    engine forced to the form it chose ("dequantize" for dense, "keep" for the codes), the fused decode
    rows and the int4 kernel pinned so that both run the same kernels."""
    path = artifacts(scheme)
    engine = dict(max_model_len=128, fused_decode_rows=SMALL_M, enable_prefix_caching=False, int4_kernel="triton")
    prompts = [[5, 17, 99, 3, 250, 42, 8], [300, 12], list(range(40, 80))]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with caplog.at_level(logging.INFO, logger="engine.weights"):
        auto = LLM(str(path), **engine)
    assert "compressed_weights auto:" in caplog.text
    dense = not compressed_layers(auto.engine.runner.model)
    print(f"[{scheme}] auto served {'dense' if dense else 'the codes'}: {caplog.text.strip()}", flush=True)
    got = [o.token_ids for o in auto.generate(prompts, params)]
    del auto
    forced = LLM(str(path), compressed_weights="dequantize" if dense else "keep", **engine)
    assert len(compressed_layers(forced.engine.runner.model)) == (0 if dense else DECODER_LINEARS)
    assert got == [o.token_ids for o in forced.generate(prompts, params)]

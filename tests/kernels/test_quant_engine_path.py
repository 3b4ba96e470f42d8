"""The engine's fused small-batch decode on compressed weights (Triton, interpreted on CPU): int8
and int4 linears are read by the fused kernels (dequantized in registers), W8A8 int8 with its
input quantized in their prologue; fp8 and 2:4 layers run on the unfused path. Greedy tokens equal
transformers' on the same artifact."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from compressed_artifacts import make_artifact  # noqa: E402

import engine.models.llama as llama_module  # noqa: E402
import kernels.gemv as gemv_module  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from kernels.gemv import FAST_BY_DEFAULT  # noqa: E402
from support import widen_m1_gemv_programs  # noqa: E402

pytest.importorskip("compressed_tensors")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROMPTS = [[5, 17, 99, 3, 250, 42, 8], [300, 12], list(range(40, 60))]


def engine_and_reference_greedy(path, scheme: str, prompts: list[list[int]], max_tokens: int = 4, **engine_kwargs):
    """The engine (Triton path, eager, fp32) on the artifact's compressed weights, its ``max_tokens``
    greedy tokens per prompt, and transformers' on the same artifact (int4 with zero points: the
    dequantized model)."""
    from transformers import AutoModelForCausalLM

    from compressed_artifacts import dequantized_reference, greedy

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = LLM(str(path), device=DEVICE, dtype="float32", use_triton=True, enforce_eager=True,
                  max_model_len=128, block_size=4, load_format="dummy", **engine_kwargs)
        llm.engine.runner.model.load_weights(str(path), keep_compressed=True)
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        ref = (dequantized_reference(path) if scheme == "int4_g32_asym"
               else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval())
        return llm, outs, greedy(ref, prompts, max_tokens)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("scheme,fused", [("int8", True), ("int4_g32_asym", True), ("w8a8_int8", True),
                                          ("w8a8_fp8", False), ("sparse24_int4", False)])
def test_fused_decode_on_compressed_weights(tmp_path, monkeypatch, scheme, fused):
    import engine.layers.quantized as quantized_module
    import engine.layers.sparse24 as sparse24_module

    formats, sparse_calls, dequant_calls = [], [], []
    gemv, sparse_gemv = llama_module.gemv_kernels.gemv, sparse24_module.sparse24_gemv
    dequant = quantized_module.dequantize_int4

    def counting_dequant(*args, **kwargs):
        dequant_calls.append(args[0].shape)
        return dequant(*args, **kwargs)

    def counting_gemv(*args, **kwargs):
        formats.append(kwargs.get("quant", "dense"))
        return gemv(*args, **kwargs)

    def counting_sparse_gemv(*args, **kwargs):
        sparse_calls.append(args[0].shape[0])
        return sparse_gemv(*args, **kwargs)

    monkeypatch.setattr(llama_module.gemv_kernels, "gemv", counting_gemv)
    monkeypatch.setattr(sparse24_module, "sparse24_gemv", counting_sparse_gemv)
    monkeypatch.setattr(quantized_module, "dequantize_int4", counting_dequant)
    llm, outs, want = engine_and_reference_greedy(make_artifact(scheme, tmp_path / scheme), scheme, PROMPTS)
    assert llm.engine.runner.model.model.fusable == fused
    assert [o.token_ids for o in outs] == want
    expected = {"int8": "int8", "int4_g32_asym": "int4", "w8a8_int8": "w8a8_int8"}.get(scheme)
    assert bool(dequant_calls) == (scheme == "int4_g32_asym")  # int4 prefill: Triton dequant + dense GEMM
    if fused:
        assert formats and set(formats) == {expected}  # o_proj, gate_up and down; qkv rides gemv_rope_store
    else:  # unfused path: the modules run themselves (2:4 + int4: its own decode GEMV)
        assert not formats
        assert bool(sparse_calls) == (scheme == "sparse24_int4") and max(sparse_calls, default=0) <= 3


# exact_dequant turns the fast path off in the layers' base class for every format alike
# (CompressedLinear._fast): once, on int4 with zero points (the exact M == 1 GEMV of every format
# is test_quant_gemv's; the exact path at M == 1 runs many one-column programs, interpreted one by one).
@pytest.mark.parametrize("scheme,exact", [("int8", False), ("int4_g32_asym", False), ("w8a8_int8", False),
                                          ("int4_g32_asym", True)])
def test_batch_one_decode_takes_the_fast_dequantization_unless_exact(tmp_path, monkeypatch, scheme, exact):
    """One sequence (M == 1 decode steps): the fused GEMVs get fast=True by default for the formats
    measured faster that way (FAST_BY_DEFAULT: int8, W8A8, int4) and False with
    exact_dequant=True; both give transformers' greedy tokens."""
    calls = []
    gemv = llama_module.gemv_kernels.gemv

    def recording_gemv(x, *args, **kwargs):
        calls.append((x.shape[0], kwargs.get("fast", False)))
        return gemv(x, *args, **kwargs)

    monkeypatch.setattr(llama_module.gemv_kernels, "gemv", recording_gemv)
    # FAST_MIN_PROGRAMS narrows the fast path's programs to fill an H200's SMs: on these tiny widths,
    # one column each, which the interpreter runs one Python loop at a time (tens of seconds a run).
    # The programs' default widths stay: the kernel at one column a program is test_quant_gemv_fast's.
    monkeypatch.setattr(gemv_module, "FAST_MIN_PROGRAMS", 1)
    # The exact path's M == 1 programs (gemv_config's: one column each at these widths, ~80% of the
    # exact case's time) at 16 columns; one column a program stays test_quant_gemv's.
    widen_m1_gemv_programs(monkeypatch)
    # Three tokens: the prefill's and two M == 1 decode steps (each interpreted step is most of this
    # test's time; it ran three): the second reads the K/V the first stored through the M == 1 path.
    _, outs, want = engine_and_reference_greedy(make_artifact(scheme, tmp_path / scheme), scheme, [PROMPTS[0]],
                                                max_tokens=3, exact_dequant=exact)
    assert [o.token_ids for o in outs] == want
    decode = [fast for m, fast in calls if m == 1]
    fast_default = FAST_BY_DEFAULT["int4" if scheme.startswith("int4") else scheme]
    assert decode and set(decode) == {not exact and fast_default}

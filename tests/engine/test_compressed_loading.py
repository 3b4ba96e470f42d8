"""The engine serves what the pipeline makes: every compressed-tensors scheme stage=quantize /
stage=prune write (and llm-compressor's layout of the same schemes) loads, and the engine's
greedy tokens equal transformers' on the same artifact (fp32, CPU), with logits within ATOL.

Two engine paths per scheme: the CPU serving path (weight-only schemes dequantized once into the
dense linears; W8A8 in its module) and the compressed modules (Int8Linear, Int4Linear, W8A8Linear,
Sparse24Linear) computing with their torch reference matmuls.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from compressed_artifacts import (SCHEMES, dequantized_reference, greedy, hf_cannot_load, make_artifact,
                                  make_llmc_artifact)

from engine import LLM, SamplingParams
from engine.context import Context, reset_context, set_context
from engine.layers.quantized import CompressedLinear, Int4Linear, Int8Linear, W8A8Linear
from engine.layers.sparse24 import Sparse24Linear

pytest.importorskip("compressed_tensors")

NEW_TOKENS = 10
# fp32 throughout: the same codes and scales on both sides, so logits differ by summation order
# only (~1e-6): every logit within ATOL. W8A8 also re-rounds activations at run time, where a 1e-7
# difference in a value on a rounding boundary moves its code by one, and through attention every
# later position moves with it: there, at least half the 40 positions stay within ATOL and no logit
# moves by more than W8A8_REL of the largest logit (measured: 65% and 2.5%).
ATOL = 1e-4
W8A8_REL = 0.05
PROMPTS = [[5, 17, 99, 3, 250, 42, 8], [300, 12], list(range(40, 80))]

EXPECTED_MODULE = {"int8": Int8Linear, "int4_g32": Int4Linear, "int4_g32_asym": Int4Linear,
                   "int4_g64_awq": Int4Linear, "w8a8_int8": W8A8Linear, "w8a8_fp8": W8A8Linear,
                   "sparse24": Sparse24Linear, "sparse24_int4": Sparse24Linear}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("compressed")
    return lambda scheme: make_artifact(scheme, root / scheme)


_REF: dict = {}


def reference(path: Path, scheme: str):
    """transformers on the artifact through compressed-tensors; the dequantized dense model where
    this transformers cannot load the scheme (hf_cannot_load)."""
    if path not in _REF:
        from transformers import AutoModelForCausalLM

        if hf_cannot_load(scheme):
            _REF[path] = dequantized_reference(path)
        else:
            _REF[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _REF[path]


def engine(path: Path, keep_compressed: bool) -> LLM:
    if not keep_compressed:
        return LLM(str(path), device="cpu", max_model_len=128, block_size=4)
    llm = LLM(str(path), device="cpu", max_model_len=128, block_size=4, load_format="dummy")
    llm.engine.runner.model.load_weights(str(path), keep_compressed=True)
    return llm


def engine_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    model = llm.engine.runner.model
    n = len(ids)
    set_context(Context(is_prefill=True, slot_mapping=torch.full((n,), -1), query_lens=[n], context_lens_host=[n]))
    try:
        with torch.no_grad():
            return model.compute_logits(model(torch.tensor(ids), torch.arange(n)))
    finally:
        reset_context()


def check_against_reference(llm: LLM, ref, scheme: str) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    got = [o.token_ids for o in llm.generate(PROMPTS, params)]
    assert got == greedy(ref, PROMPTS, NEW_TOKENS)
    ids = PROMPTS[2]
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0]
    ours = engine_logits(llm, ids)
    if not scheme.startswith("w8a8"):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
        return
    diff = (ours - theirs).abs()
    assert diff.max() <= W8A8_REL * theirs.abs().max()
    assert (diff.amax(dim=-1) <= ATOL).float().mean() >= 0.5


@pytest.mark.parametrize("keep_compressed", [False, True], ids=["cpu_dense", "modules"])
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_own_artifact_matches_transformers(scheme, keep_compressed, artifacts):
    path = artifacts(scheme)
    llm = engine(path, keep_compressed)
    model = llm.engine.runner.model
    swapped = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    if keep_compressed or scheme.startswith("w8a8"):
        assert swapped and all(isinstance(m, EXPECTED_MODULE[scheme]) for m in swapped)
        assert len(swapped) == 4 * len(model.model.layers)  # qkv, o, gate_up, down; lm_head stays dense
    else:
        assert not swapped
    check_against_reference(llm, reference(path, scheme), scheme)


def test_quantized_weights_really_differ_from_the_dense_model(artifacts):
    """Guards the comparison above: the int4 artifact's logits are not the unquantized model's."""
    from compressed_artifacts import tiny_llama

    llm = engine(artifacts("int4_g32"), keep_compressed=True)
    ids = PROMPTS[2]
    with torch.no_grad():
        dense = tiny_llama()(torch.tensor([ids])).logits[0]
    assert (engine_logits(llm, ids) - dense).abs().max() > 100 * ATOL


def test_unsupported_scheme_names_scheme_and_layer(artifacts, tmp_path):
    import shutil

    src = artifacts("int8")
    dst = tmp_path / "int3"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 3
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.self_attn\.q_proj.*num_bits=3"):
        LLM(str(dst), device="cpu", max_model_len=64, block_size=4)


def test_static_activation_scales_are_refused(artifacts, tmp_path):
    import shutil

    dst = tmp_path / "static"
    shutil.copytree(artifacts("w8a8_int8"), dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"]["dynamic"] = False
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="dynamic per-token"):
        LLM(str(dst), device="cpu", max_model_len=64, block_size=4)


def test_missing_scale_is_listed(artifacts, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from engine.loader import CheckpointMismatchError

    dst = tmp_path / "noscale"
    shutil.copytree(artifacts("int4_g32"), dst)
    file = str(dst / "model.safetensors")
    state = load_file(file)
    del state["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"1 missing: model\.layers\.1\.mlp\.up_proj\.weight_scale"):
        LLM(str(dst), device="cpu", max_model_len=64, block_size=4)


# -- llm-compressor's layout -------------------------------------------------------------------
# FP8_DYNAMIC is missing: compressed-tensors 0.20 cannot compress fp8 on a CPU ("round_vml_cpu" not
# implemented for Float8_e4m3fn); its layout is the one our writer's fp8 test above covers.

LLMC = {"W8A16": ("W8A16", False, Int8Linear), "W4A16": ("W4A16", False, Int4Linear),
        "W4A16_ASYM": ("W4A16_ASYM", False, Int4Linear), "W8A8": ("W8A8", False, W8A8Linear),
"W4A16_2of4": ("W4A16", True, Sparse24Linear)}


@pytest.mark.parametrize("case", sorted(LLMC))
def test_llm_compressor_layout_matches_transformers(case, tmp_path_factory):
    preset, sparse, module = LLMC[case]
    path = make_llmc_artifact(preset, tmp_path_factory.mktemp("llmc") / case, sparse24=sparse)
    llm = engine(path, keep_compressed=True)
    swapped = [m for m in llm.engine.runner.model.modules() if isinstance(m, CompressedLinear)]
    assert swapped and all(isinstance(m, module) for m in swapped)
    scheme = {"W8A8": "w8a8_int8"}.get(preset, preset)
    ref_scheme = "int4_g32_asym" if preset == "W4A16_ASYM" else scheme
    check_against_reference(llm, reference(path, ref_scheme), scheme)


@pytest.mark.parametrize("scheme", ["sparse24", "w8a8_int8"])
def test_legacy_sparse24_bitmask_layout(scheme, artifacts, tmp_path):
    """Older llm-compressor releases stored 2:4 weights compressed (`compressed` kept values,
    `bitmask` packed little-endian, `shape`) under sparsity_config format sparse-24-bitmask;
    compressed-tensors 0.20 reads it no more, so the reference is the same weights stored dense."""
    import shutil

    from compressed_tensors.utils import pack_bitmasks
    from safetensors.torch import load_file, save_file

    src = artifacts("sparse24")
    if scheme == "w8a8_int8":  # 2:4 over int8 codes: prune the W8A8 artifact's codes in place
        src = artifacts("w8a8_int8")
    dst = tmp_path / f"bitmask_{scheme}"
    shutil.copytree(src, dst)
    file = str(dst / "model.safetensors")
    state = load_file(file)
    cfg = json.loads((dst / "config.json").read_text())
    qcfg = cfg.setdefault("quantization_config", {"quant_method": "compressed-tensors", "config_groups": {}})
    targets, dense = [], {}
    for name in [k.removesuffix(".weight") for k in list(state) if k.startswith("model.layers.") and k.endswith("_proj.weight")]:
        w = state.pop(f"{name}.weight")
        if scheme == "w8a8_int8":  # keep the 2 largest codes of every 4
            groups = w.view(-1, 4)
            groups.scatter_(1, groups.float().abs().topk(2, dim=1, largest=False).indices, 0)
        mask = w != 0
        state[f"{name}.compressed"] = w[mask].reshape(w.shape[0], w.shape[1] // 2)
        state[f"{name}.bitmask"] = pack_bitmasks(mask)
        state[f"{name}.shape"] = torch.tensor(list(w.shape)).reshape(-1, 1)
        targets.append(name)
        dense[name] = w
    save_file(state, file, metadata={"format": "pt"})
    qcfg["sparsity_config"] = {"format": "sparse-24-bitmask", "sparsity_structure": "2:4", "global_sparsity": 0.5,
                               "targets": targets, "ignore": []}
    (dst / "config.json").write_text(json.dumps(cfg))
    # The reference: the same pruned tensors stored dense.
    ref_dir = tmp_path / f"dense_{scheme}"
    shutil.copytree(src, ref_dir)
    ref_state = load_file(str(ref_dir / "model.safetensors"))
    ref_state.update({f"{n}.weight": w for n, w in dense.items()})
    save_file(ref_state, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    llm = engine(dst, keep_compressed=True)
    if scheme == "sparse24":
        assert all(isinstance(m, Sparse24Linear) for m in llm.engine.runner.model.modules()
                   if isinstance(m, CompressedLinear))
    check_against_reference(llm, reference(ref_dir, scheme), scheme)


@pytest.mark.slow
@pytest.mark.parametrize("bits,group", [(4, 32), (8, None)])
def test_real_teacher_quantized_matches_transformers(smollm2_artifact, tmp_path, bits, group):
    """SmolLM2-135M (576 wide, 30 layers, GQA 9/3, tied) quantized by RTN: the engine's compressed
    modules give transformers' greedy tokens on the real model."""
    from transformers import AutoModelForCausalLM

    from compressed_artifacts import quantize_real_model

    path = quantize_real_model(smollm2_artifact, tmp_path / f"int{bits}", bits, group)
    llm = engine(path, keep_compressed=True)
    assert any(isinstance(m, Int4Linear if bits == 4 else Int8Linear) for m in llm.engine.runner.model.modules())
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [[1, 504, 3458, 282, 4706, 314], [1, 1780, 253, 1977]]
    got = [o.token_ids for o in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))]
    assert got == greedy(ref, prompts, 8)


def test_triton_engine_decodes_sparse24_int4_through_its_gemv(artifacts, monkeypatch):
    """2:4 + int4 modules on the Triton path (interpreted on the CPU): every decode row goes through
    the 2:4 GEMV (kernels/quant_gemv.py: one fp32 row the select path, three the dot path), never a
    dense weight, and the greedy tokens still equal transformers' on the same artifact."""
    import engine.layers.sparse24 as sparse24
    import kernels.quant_gemv as qg

    # The select path's 8 columns a program make 64 interpreted programs a layer and step at these
    # widths; at 32 every launch keeps two or more (o_proj / down 2, qkv 4, gate_up 8), the same
    # kernel and sums (each column's is the same at any BLOCK_N; test_quant_gemv_sparse24.py takes
    # the default config).
    monkeypatch.setattr(qg, "SELECT_CONFIG", (32,) + qg.SELECT_CONFIG[1:])
    path = artifacts("sparse24_int4")
    llm = LLM(str(path), device="cpu", max_model_len=128, block_size=4, load_format="dummy", use_triton=True)
    model = llm.engine.runner.model
    model.load_weights(str(path), keep_compressed=True)
    rows = []
    real = sparse24.sparse24_gemv
    monkeypatch.setattr(sparse24, "sparse24_gemv", lambda x, *a, **kw: (rows.append(x.shape[0]), real(x, *a, **kw))[1])
    ref = reference(path, "sparse24_int4")
    check_against_reference(llm, ref, "sparse24_int4")
    one = [o.token_ids for o in llm.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=4,
                                                                        ignore_eos=True))]
    assert one == greedy(ref, PROMPTS[:1], 4)
    assert {1, 3} <= set(rows) and max(rows) <= 3, rows
    layers = [m for m in model.modules() if isinstance(m, Sparse24Linear)]
    assert len(layers) == 8 and all(m.quantized and m.weight is None for m in layers)


def test_triton_engine_fuses_sparse24_int4_decode_at_one_row(artifacts, monkeypatch):
    """fp16 2:4 + int4 modules on the Triton path (interpreted): the model settles on the fused
    decode (what eval.bench.quant records as fused_decode) for batch 1 only; a one-row decode step
    runs the fused 2:4 kernels (qkv with rotary + KV store, o_proj and down with the residual add,
    gate_up with the norm and SwiGLU), a two-row one the unfused tensor-core 2:4 GEMM (sparse24_mma:
    Sparse24Linear's first candidate at 2..16 rows, off a GPU the one taken), and the greedy tokens
    equal transformers' (fp32) on the same artifact."""
    import engine.layers.sparse24 as sparse24
    import kernels.quant_gemv as qg

    # FAST_MIN_PROGRAMS (an H200's occupancy target) cuts the fused 2:4 kernels' programs to one
    # column each at these widths, which the interpreter runs one at a time (~90% of this test's time).
    # The kernels and calls are the same at their own BLOCK_N; one column a program stays covered by
    # tests/kernels/test_quant_gemv_sparse24.py's fast-path tests (the default config). FAST_CONFIG's
    # 8 columns a program (4 for SwiGLU / rotary pairs) still made 64 interpreted programs a layer
    # and step; at 32 (16) every launch keeps two programs or more (o_proj / down 2, rotary 4,
    # gate_up 8), and each column's sum is the same at any BLOCK_N.
    monkeypatch.setattr(qg, "FAST_MIN_PROGRAMS", 1)
    monkeypatch.setattr(qg, "FAST_CONFIG", (32,) + qg.FAST_CONFIG[1:])
    path = artifacts("sparse24_int4")
    llm = LLM(str(path), device="cpu", max_model_len=128, block_size=4, load_format="dummy", use_triton=True,
              dtype="float16")
    model = llm.engine.runner.model
    model.load_weights(str(path), keep_compressed=True)
    assert model.model.fusable and model.model.fused_rows == 1
    calls = []
    for module, name in ((qg, "sparse24_gemv_fused"), (qg, "sparse24_gemv_rope_store"), (sparse24, "sparse24_gemv"),
                         (sparse24, "sparse24_mma")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda x, *a, _real=real, _name=name, **kw: (
            calls.append((_name, x.shape[0], kw.get("swiglu", False), kw.get("residual") is not None)),
            _real(x, *a, **kw))[1])
    ref = reference(path, "sparse24_int4")
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    assert [o.token_ids for o in llm.generate(PROMPTS[:1], params)] == greedy(ref, PROMPTS[:1], 3)
    fused = [c for c in calls if c[0] not in ("sparse24_gemv", "sparse24_mma")]
    layers = model.config.num_hidden_layers
    # two one-row decode steps: per layer one rope_store launch, gate_up (SwiGLU) and two residual adds
    assert sorted(fused) == sorted(2 * layers * [("sparse24_gemv_rope_store", 1, False, False),
                                                 ("sparse24_gemv_fused", 1, True, False),
                                                 ("sparse24_gemv_fused", 1, False, True),
                                                 ("sparse24_gemv_fused", 1, False, True)])
    calls.clear()
    assert [o.token_ids for o in llm.generate(PROMPTS[:2], SamplingParams(
        temperature=0.0, max_tokens=2, ignore_eos=True))] == greedy(ref, PROMPTS[:2], 2)
    assert ("sparse24_mma", 2, False, False) in calls
    assert not [c for c in calls if c[0] not in ("sparse24_gemv", "sparse24_mma") and c[1] != 1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_gpu_engine_serves_compressed_artifact(scheme, artifacts):
    """On a GPU the compressed modules stay compressed ("keep": "auto" may serve a model this small
    dense, tests/engine/test_weight_form.py) and run their kernels:
    fused decode in CUDA graphs (int8, int4, W8A8 int8), _int_mm / _scaled_mm, 2:4 + int4 GEMV;
    fp32 so that greedy tokens equal transformers' (CPU) on the same artifact. Prints each phase's
    time and the modules' layouts, so that a failure or a hang on the GPU says where it was."""
    import time

    path = artifacts(scheme)
    t = time.perf_counter()
    print(f"[{scheme}] building the engine (graph capture included)", flush=True)
    llm = LLM(str(path), device="cuda", dtype="float32", max_model_len=128, block_size=16, compressed_weights="keep")
    print(f"[{scheme}] built in {time.perf_counter() - t:.1f}s", flush=True)
    modules = [m for m in llm.engine.runner.model.modules() if isinstance(m, CompressedLinear)]
    layouts = sorted({f"{type(m).__name__}({m.extra_repr()})" for m in modules})
    print(f"[{scheme}] fused decode: {llm.engine.runner.model.model.fusable}; modules: {layouts}", flush=True)
    assert modules and all(isinstance(m, EXPECTED_MODULE[scheme]) for m in modules), layouts
    t = time.perf_counter()
    got = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS,
                                                                     ignore_eos=True))]
    print(f"[{scheme}] generated in {time.perf_counter() - t:.1f}s", flush=True)
    expected = greedy(reference(path, scheme), PROMPTS, NEW_TOKENS)
    assert got == expected, f"{scheme}: engine (cuda, fp32) {got} != transformers (cpu, fp32) {expected}"

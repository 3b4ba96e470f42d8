"""Compression methods as registered classes and quantization recipes: building them from the
config sections, the order a recipe must follow, and SmoothQuant + GPTQ in one calibration pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import shrink.compress.calibration as calibration
from common.errors import ShrinkError, config_section
from shrink.compress.calibration import compress_model
from shrink.compress.methods.gptq import GPTQ
from shrink.compress.methods.smoothquant import SmoothQuant
from shrink.compress.modules import QuantLinear
from shrink.compress.quant import QuantSpec
from shrink.compress.recipe import quantization_recipe
from shrink.compress.settings import prune_settings, quantize_settings
from support import REPO, tiny_llama_config

SKIP = ["lm_head", "*embed_tokens"]


def section(stage: str, **overrides):
    cfg = OmegaConf.load(Path(REPO) / "conf" / stage / "default.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def test_the_default_config_builds_a_gptq_recipe_with_its_section():
    settings = quantize_settings(section("quantize", **{"gptq.damp": 0.05}))
    (gptq,) = settings.recipe
    assert isinstance(gptq, GPTQ) and gptq.damp == 0.05 and gptq.scheme == QuantSpec(4, 64, True)
    assert quantize_settings(section("quantize", recipe="rtn")).names == ["rtn"]
    assert prune_settings(section("prune", **{"sparsegpt.block_size": 64})).recipe[0].block_size == 64


@pytest.mark.parametrize("overrides,message", [
    ({"recipe": ["gptq", "smoothquant"]}, "quantize.recipe: .*expected transforms"),
    ({"recipe": ["smoothquant"], "bits": 8, "group_size": None}, "quantize.recipe: .*one weight quantizer"),
    ({"recipe": ["smoothquant", "fp8"], "bits": 8, "group_size": None}, "quantize.recipe: smoothquant is W8A8"),
    ({"recipe": ["smoothquant", "rtn"]}, "quantize.bits: smoothquant is W8A8"),
    ({"recipe": ["sparsegpt"]}, "quantize.recipe: not a transform or quantize method: 'sparsegpt'"),
    ({"recipe": ["obq"]}, "quantize.recipe: unknown 'obq'; known: awq, fp8, gptq, rtn, smoothquant"),
    ({"recipe": ["gptq", "gptq"]}, "quantize.recipe: .*twice"),
    ({"recipe": []}, "quantize.recipe: must be a method name or a list"),
    ({"gptq.dampp": 0.1}, "quantize.gptq.dampp: not a setting of gptq; known: damp, act_order, block_size"),
    ({"gptq.damp": "abc"}, "quantize.gptq.damp: expected a finite float"),
    ({"gptq.act_order": 1}, "quantize.gptq.act_order: expected a bool"),
    ({"group_size": 2.5}, "quantize.group_size: expected an int"),
    ({"on_indivisible": "warn"}, "quantize.on_indivisible: must be skip or error"),
    ({"calibration.num_samples": 0}, "quantize.calibration.num_samples: must be an integer >= 1"),
    ({"save_dtype": "fp12"}, "quantize.save_dtype"),
])
def test_bad_quantize_settings_name_the_key(overrides, message):
    with pytest.raises(ShrinkError, match=message), config_section("quantize"):
        quantize_settings(section("quantize", **overrides))


def test_prune_takes_one_pruning_method():
    with pytest.raises(ShrinkError, match="prune.method: not a prune method: 'gptq'; known: magnitude, "
                                         "sparsegpt, wanda"), config_section("prune"):
        prune_settings(section("prune", method="gptq"))
    with pytest.raises(ShrinkError, match="prune.sparsegpt.damp: must be >= 0"), config_section("prune"):
        prune_settings(section("prune", **{"sparsegpt.damp": -1.0}))


def tiny(seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_llama_config()).eval()


def test_smoothquant_then_gptq_is_w8a8_with_gptq_weights_in_one_pass(monkeypatch):
    ids = torch.randint(3, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    passes = []
    capture = calibration.capture_block_inputs
    monkeypatch.setattr(calibration, "capture_block_inputs", lambda *a, **k: passes.append(1) or capture(*a, **k))
    w8 = QuantSpec(8, None, True)

    def run(names: list[str]) -> torch.nn.Module:
        model = tiny()
        compress_model(model, quantization_recipe(names, {}, w8), ids, torch.device("cpu"), skip=SKIP,
                       batch_size=2, log=lambda s: None)
        return model

    sq_gptq, sq_rtn = run(["smoothquant", "gptq"]), run(["smoothquant", "rtn"])
    assert passes == [1, 1]  # one calibration pass per recipe, however many methods
    name = "model.layers.2.mlp.down_proj"
    ours = sq_gptq.get_submodule(name)
    assert isinstance(ours, QuantLinear) and ours.act == "int8" and ours.spec == w8
    assert all(m.act == "int8" for m in sq_gptq.modules() if isinstance(m, QuantLinear))
    # The same smoothing (it runs first on the same inputs), then different weight rounding.
    torch.testing.assert_close(sq_gptq.model.layers[0].input_layernorm.weight,
                               sq_rtn.model.layers[0].input_layernorm.weight)
    assert not torch.equal(ours.codes, sq_rtn.get_submodule(name).codes)
    # GPTQ's rounding reconstructs the block's output better than RTN's on the calibration data.
    dense = tiny()
    with torch.no_grad():
        ref = dense(ids).logits
        err = {k: (m(ids).logits - ref).pow(2).mean() for k, m in (("gptq", sq_gptq), ("rtn", sq_rtn))}
    assert err["gptq"] < err["rtn"]


def test_recipe_methods_are_dataclasses_with_their_own_settings():
    sq, gptq = quantization_recipe(["smoothquant", "gptq"], {"smoothquant": {"alpha": 0.8}}, QuantSpec(8, None))
    assert isinstance(sq, SmoothQuant) and sq.alpha == 0.8 and not sq.true_sequential
    assert gptq.activations == "int8" and gptq.true_sequential

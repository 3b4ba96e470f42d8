"""Compressed tiny Llama checkpoints for the engine's loading tests, made by the project's own
compression code (the functions stage=prune / stage=quantize run) and saved by its
compressed-tensors writer; plus the same schemes in llm-compressor's layout, written through the
compressed-tensors package's own compressor.

The only place the engine tests reach into shrink/: if the compression API moves, this file moves
with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1,
            eos_token_id=2, pad_token_id=2, rms_norm_eps=1e-5,
            # Wide weights spread the logits: greedy argmax stays far from ties.
            initializer_range=0.25)
SKIP = ["lm_head", "*embed_tokens"]

# scheme -> (quantization recipe, bits, group size, symmetric) or None, and whether 2:4 pruned first
SCHEMES: dict[str, tuple[tuple[list[str], int, int | None, bool] | None, bool]] = {
    "int8": ((["rtn"], 8, None, True), False),
    "int4_g32": ((["gptq"], 4, 32, True), False),
    "int4_g32_asym": ((["rtn"], 4, 32, False), False),
    "int4_g64_awq": ((["awq", "rtn"], 4, 64, True), False),
    "w8a8_int8": ((["smoothquant", "rtn"], 8, None, True), False),
    "w8a8_fp8": ((["fp8"], 8, None, True), False),
    "sparse24": (None, True),
    "sparse24_int4": ((["gptq"], 4, 32, True), True),
}
# transformers 5.24 + compressed-tensors 0.20 cannot load asymmetric pack-quantized files (an
# upstream meta-init bug, see tests/shrink/test_compressed_tensors_roundtrip.py): those compare
# against the dequantized dense model instead.
HF_CANNOT_LOAD = {"int4_g32_asym"}


def hf_cannot_load(scheme: str) -> bool:
    """Whether this transformers cannot load the scheme's artifact through compressed-tensors:
    HF_CANNOT_LOAD, and sparsity-only (2:4, no quantization) checkpoints before transformers 5.24
    (5.17's quantizer reads ``quantization_config.config_groups`` of a config that has none:
    AttributeError, seen on the H200 machine; 5.24 loads them)."""
    import transformers
    from packaging.version import Version

    old = Version(transformers.__version__) < Version("5.24")
    return scheme in HF_CANNOT_LOAD or (scheme == "sparse24" and old)


def tiny_llama(seed: int = 0, biases: bool = False):
    """``biases``: attention and MLP biases, random (transformers initialises biases to zero)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(**TINY, attention_bias=biases, mlp_bias=biases)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.25)
    return model


def calibration_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, TINY["vocab_size"], (4, 48), generator=torch.Generator().manual_seed(seed))


def make_artifact(scheme: str, directory: Path, biases: bool = False) -> Path:
    """Our own stages' compression of a tiny Llama (``biases``: tiny_llama's), saved as
    stage=quantize / stage=prune do."""
    from shrink.compress.calibration import compress_model
    from shrink.compress.compressed_tensors_io import save_compressed, sparsity_metadata
    from shrink.compress.quant import QuantSpec
    from shrink.compress.recipe import pruning_method, quantization_recipe
    from shrink.compress.sparsity import SparsitySpec

    if (directory / "config.json").exists():
        return directory
    quant, sparse = SCHEMES[scheme]
    model = tiny_llama(biases=biases)
    cpu, quiet = torch.device("cpu"), (lambda s: None)
    masks, meta = {}, None
    if sparse:
        rep = compress_model(model, [pruning_method("sparsegpt", {}, SparsitySpec("2:4"))], calibration_ids(), cpu,
                             skip=SKIP, batch_size=2, log=quiet)
        masks = rep.masks
        meta = sparsity_metadata(masks, "2:4")
    if quant:
        recipe, bits, group, symmetric = quant
        compress_model(model, quantization_recipe(recipe, {}, QuantSpec(bits, group, symmetric)), calibration_ids(),
                       cpu, skip=SKIP, batch_size=2, masks=masks, log=quiet)
    save_compressed(model, directory, dtype=torch.float32, sparsity=meta)
    return directory


def dequantized_reference(directory: Path):
    """The artifact as a dense transformers model (our compressed-tensors reader)."""
    from shrink.compress.compressed_tensors_io import load_compressed

    return load_compressed(directory, dtype=torch.float32)


def greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers generate, one prompt at a time, greedy, no EOS stop."""
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return outs


# -- llm-compressor's layout -------------------------------------------------------------------

# The preset schemes llm-compressor applies (compressed_tensors.quantization.preset_name_to_scheme)
LLMC_PRESETS = {"W8A16": "int-quantized", "W4A16": "pack-quantized", "W4A16_ASYM": "pack-quantized",
                "W8A8": "int-quantized"}


def make_llmc_artifact(preset: str, directory: Path, group_size: int = 32, sparse24: bool = False,
                       quantize_lm_head: bool = False) -> Path:
    """What llm-compressor's oneshot + save_pretrained write for `preset` (RTN min/max scales):
    the compressed-tensors package attaches the scheme, computes the scales with its own
    formulas, compresses the weights with its own compressor, and writes the config. The lm_head
    is ignored, as llm-compressor's recipes do, unless ``quantize_lm_head``."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationStatus, apply_quantization_config,
                                                 preset_name_to_scheme)
    from compressed_tensors.quantization.utils import calculate_qparams

    if (directory / "config.json").exists():
        return directory
    model = tiny_llama(seed=3)
    if sparse24:  # magnitude 2:4 on every decoder linear, zeros kept dense (compressed-tensors 0.20)
        with torch.no_grad():
            for name, mod in model.named_modules():
                if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
                    w = mod.weight.view(-1, 4)
                    drop = w.abs().topk(2, dim=1, largest=False).indices
                    w.scatter_(1, drop, 0.0)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    if scheme.weights.group_size is not None:
        scheme.weights.group_size = group_size
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, ignore=[] if quantize_lm_head else ["lm_head"],
                                 format=LLMC_PRESETS[preset])
    apply_quantization_config(model, qconfig)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if getattr(mod, "quantization_scheme", None) is None:
                continue
            args = mod.quantization_scheme.weights
            w = mod.weight.float()
            if args.group_size:
                w = w.reshape(w.shape[0], -1, args.group_size)
            lo = w.amin(dim=-1, keepdim=args.group_size is None)
            hi = w.amax(dim=-1, keepdim=args.group_size is None)
            scale, zero = calculate_qparams(lo, hi, args)
            mod.weight_scale.data.copy_(scale.reshape(mod.weight_scale.shape))
            if hasattr(mod, "weight_zero_point"):
                mod.weight_zero_point.data.copy_(zero.round().reshape(mod.weight_zero_point.shape))
            mod.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=LLMC_PRESETS[preset])
    compressor.compress_model(model)
    model.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = compressor.quantization_config.model_dump(exclude_none=False)
    if sparse24:
        config["quantization_config"]["sparsity_config"] = {
            "format": "dense", "sparsity_structure": "2:4", "global_sparsity": 0.5, "targets": ["Linear"],
            "ignore": ["lm_head"], "registry_requires_subclass": False}
    (directory / "config.json").write_text(json.dumps(config, indent=2, default=str))
    return directory


def quantize_real_model(source: Path, directory: Path, bits: int, group: int | None) -> Path:
    """RTN (no calibration data) of a real checkpoint, saved as stage=quantize does, fp32."""
    from transformers import AutoModelForCausalLM

    from shrink.compress.calibration import compress_model
    from shrink.compress.compressed_tensors_io import save_compressed
    from shrink.compress.quant import QuantSpec
    from shrink.compress.recipe import quantization_recipe

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    compress_model(model, quantization_recipe(["rtn"], {}, QuantSpec(bits, group, True)), None, torch.device("cpu"), skip=SKIP,
                   batch_size=2, log=lambda s: None)
    save_compressed(model, directory, dtype=torch.float32)
    return directory

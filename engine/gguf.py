"""GGUF files: transformers dequantizes them on load, but flags the model as quantized (no
``.to(dtype)``, no ``save_pretrained``), so a plain model is rebuilt from its config with the
dequantized weights. ``gguf_model_dir`` keeps it in the cache as a Hugging Face directory (the
engine loads a ``.gguf`` path through it, and so does the pipeline's import); ``convert_gguf``
writes one where the caller asks."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from common.dirs import replace_dir_atomically
from common.errors import ShrinkError
from common.files import sha256_file


def _plain_copy(quantized: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A plain (unquantized-flagged) model with the same config and weights."""
    from transformers import AutoModelForCausalLM

    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.to(dtype) for k, v in quantized.state_dict().items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ShrinkError(f"GGUF weights lack tensors for {missing[:3]}...")
    model.config.dtype = dtype
    return model.eval()


def load_gguf(path: Path | str, dtype: torch.dtype = torch.float32):
    """(plain transformers model, tokenizer) of a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise ShrinkError(f"GGUF file not found: {path}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, OSError, KeyError, IndexError, EOFError, RuntimeError) as e:
        raise ShrinkError(f"corrupt or truncated GGUF file {path}: {type(e).__name__}: {e}") from None
    return _plain_copy(quantized, dtype), tokenizer


def convert_gguf(path: Path | str, out_dir: Path | str, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write the GGUF file's model as a Hugging Face directory (config, safetensors, tokenizer,
    generation config) in ``dtype``."""
    from transformers import GenerationConfig

    model, tokenizer = load_gguf(path, dtype)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    GenerationConfig.from_model_config(model.config).save_pretrained(out_dir)


# Marks a directory of the cache as a conversion this code wrote (common/dirs.py replaces only such).
CONVERTED_MARKER = ".shrink-converted"


def gguf_model_dir(path: Path | str, cache_dir: Path | str) -> Path:
    """The GGUF file as a Hugging Face directory (fp32 weights, tokenizer) in
    ``cache_dir/converted/<sha256>``: dequantizing takes ~45 s on a CPU, so it is done once per
    file content, written to a temporary directory and renamed into place."""
    path = Path(path)
    if not path.is_file():
        raise ShrinkError(f"GGUF file not found: {path}")
    converted = Path(cache_dir) / "converted" / sha256_file(path)[:32]
    if (converted / "model.safetensors").is_file():
        return converted
    model, tokenizer = load_gguf(path, torch.float32)
    tmp = converted.parent / f".{converted.name}.tmp-{os.getpid()}"
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / CONVERTED_MARKER).write_text(str(path))
    replace_dir_atomically(tmp, converted, CONVERTED_MARKER)
    return converted

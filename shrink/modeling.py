"""Load and save Hugging Face causal LMs as artifacts."""

from __future__ import annotations

import copy

import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from shrink.artifacts import Artifact, write_artifact
from common.errors import ShrinkError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise ShrinkError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ShrinkError(f"device={name} asked for but no CUDA GPU is available")
    return torch.device(name)


def load_model(path: str | os.PathLike | Artifact, dtype: str | torch.dtype = "fp32",
               device: str | torch.device = "cpu") -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    path = path.path if isinstance(path, Artifact) else Path(path)
    if not (path / "config.json").is_file():
        raise ShrinkError(f"not a model directory (no config.json): {path}")
    config = AutoConfig.from_pretrained(path)
    if sparsity_only(getattr(config, "quantization_config", None)):
        # Its weights are plain dense tensors (zeros kept): no quantizer is needed to read them, and
        # transformers 5.17's compressed-tensors quantizer fails on a config without config_groups
        # (AttributeError on `config_groups` of None; the default pipeline's gate after prune, H200).
        del config.quantization_config
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=resolve_dtype(dtype))
    return model.to(device).eval()


def sparsity_only(qcfg: Any) -> bool:
    """Whether a compressed-tensors `quantization_config` describes sparsity alone with its weights
    stored dense (our prune stage's artifacts): no quantization groups, dense formats."""
    if hasattr(qcfg, "to_dict"):
        qcfg = qcfg.to_dict()
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != "compressed-tensors":
        return False
    sparsity = qcfg.get("sparsity_config") or {}
    return (not qcfg.get("config_groups") and qcfg.get("format", "dense") == "dense"
            and sparsity.get("format", "dense") == "dense")


def load_tokenizer(path: str | os.PathLike | Artifact):
    from transformers import AutoTokenizer

    path = path.path if isinstance(path, Artifact) else Path(path)
    return AutoTokenizer.from_pretrained(path)


def save_model_artifact(dest: str | os.PathLike, model: torch.nn.Module, tokenizer: Any, *, stage: str,
                        config: dict | None = None, inputs: list[Artifact] | None = None,
                        metrics: dict | None = None, started: float | None = None,
                        dtype: str | torch.dtype | None = None,
                        extra: Callable[[Path], None] | None = None) -> Artifact:
    """Save model (optionally cast to `dtype`), tokenizer and generation config as an artifact;
    ``extra(dir)`` writes more files into it before its content is hashed."""

    def save(tmp: Path) -> None:
        to_save = model
        if dtype is not None and resolve_dtype(dtype) != next(model.parameters()).dtype:
            # A cast copy, so the caller's model keeps its training dtype; saved by transformers
            # itself, so tied weights are written once and config.json names the saved dtype (an
            # explicit state_dict wrote a tied embedding twice and left the config at float32).
            to_save = copy.deepcopy(model).to("cpu", resolve_dtype(dtype))
        to_save.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)

    return write_artifact(dest, stage=stage, save=save, config=config, inputs=inputs, metrics=metrics,
                          started=started or time.time())


def num_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def dir_size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())

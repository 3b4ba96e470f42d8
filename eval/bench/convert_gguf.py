"""GGUF file -> plain Hugging Face directory (bf16) that the engine and transformers load."""

from __future__ import annotations

from eval.bench.common import log


def convert_gguf(args) -> None:
    from engine.gguf import convert_gguf as convert

    convert(args.gguf, args.out)
    log(f"converted {args.gguf} -> {args.out}")

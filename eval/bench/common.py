"""What the benchmarks share: model shapes, the results table, logging, timing, prompts and
engine overrides."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    # TinyLlama-1.1B (intermediate 5632, 22 layers, GQA 32/4) and Llama-2-7B shapes, random weights.
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    # Llama-2-7B's dims with 16,384 positions (RoPE past its trained 4,096): prefill timing past 4k tokens only.
    "llama2-7b-16k": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32000, max_position_embeddings=16384, rms_norm_eps=1e-5),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, rope_theta=100000.0),
    # The same with one KV head (the `gqa` stage's 3 -> 1): its 15-layer student decoded 20% slower at batch 1
    # than with three (BENCHMARKS.md, twenty-fifth session); profile both to see which kernel pays.
    "smollm2-135m-mqa": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                             num_key_value_heads=1, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                             tie_word_embeddings=True, rope_theta=100000.0),
}

RESULTS: dict[str, Any] = {}

def log(msg: str) -> None:
    print(msg, flush=True)


def shape_dir(name: str) -> str:
    """A directory holding only config.json: the engine loads it with load_format='dummy'."""
    from transformers import LlamaConfig

    path = os.path.join(tempfile.gettempdir(), f"shape-{name}")
    os.makedirs(path, exist_ok=True)
    cfg = LlamaConfig(**SHAPES[name], bos_token_id=1, eos_token_id=2)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(path)
    return path


def weight_bytes(config: Any, dtype_bytes: int = 2) -> int:
    """Bytes of weights one decode step reads (embedding rows are gathered, not read whole)."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    hd = getattr(config, "head_dim", None) or h // heads
    per_layer = h * (heads * hd + 2 * kv * hd) + heads * hd * h + 3 * h * i + 2 * h
    return dtype_bytes * (layers * per_layer + config.vocab_size * h + h)


def timed(fn):
    """(fn(), seconds), the device synchronised before and after when there is one."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - t


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(vocab, 30000), (batch, length), generator=g).tolist()


def engine_options(pairs: list[str] | None) -> dict[str, Any]:
    """`--engine key=value ...` -> EngineConfig overrides (ints, floats, true/false parsed)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--engine: expected key=value, got {pair!r}")
        low = raw.lower()
        if low in ("true", "false"):
            value: Any = low == "true"
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw
        out[key] = value
    return out


def graph_seconds(run, reps: int = 10, before_timing=None) -> float:
    """Seconds per replay of a CUDA graph that captures ``run()``, after one untimed replay (the
    GEMV sweeps time every weight copy in one graph, so launch gaps and L2 hits stay out).
    ``before_timing()``: called between that replay and the timed ones (ranks meet at a barrier).
    ``run()`` runs once eagerly first: a library's first call (cuBLAS creating its handle and
    workspace) cannot be captured, and a failed capture poisons the CUDA context for the process."""
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    torch.cuda.synchronize()
    if before_timing is not None:
        before_timing()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps

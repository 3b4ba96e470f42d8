"""Compressed weights on the GPU, every figure against the engine's own bf16 in the same process:
decode tok/s at batch 1 and 16 (256 new tokens after a 16-token prompt, prefill included, as
eval/bench/decode.py) for bf16, int8, int4 g64, int4 g128 (symmetric and with zero
points), 2:4 (bf16 kept values), 2:4 + int4 g128 (g64 at SmolLM2's width) and W8A8 int8, with the GB/s each achieves
against the measured copy ceiling; and prefill tok/s of one prompt per --prefill-tokens count
(default 1024 and 8192, or as many as the shape has positions for: Llama-2-7B has 4,096, so 8,192
tokens take --shape llama2-7b-16k, its dims with 16,384 positions) for bf16, W8A8 int8, W8A8 fp8,
2:4 and int4 g128 on either int4 kernel; with --prefill-workload, also the prefill tok/s of
nano-vllm's 256 prompts (100..1024 tokens, one output token each) per prefill variant. 2:4
records name the path each layer shape took per batch size and one layer's bytes per buffer
(sparse24_paths: timed per shape at first use, ModelOptions.sparse24_path "auto", eagerly or as CUDA
graph replays: --sparse24-timing); 2:4 + int4 layers keep their codes (a dense path rebuilds the
weight per call), so their weight_bytes are codes + positions + scales.
An int4 variant names the engine's int4_kernel after "@": int4_g128@triton (our GEMVs, fused
decode), int4_g128@tinygemm (torch's tinygemm, unfused), int4_g128@auto (the engine times both at
startup; the record has its choice and the times it logged).

    python -m eval.bench.quant [--shape llama2-7b] [--out quant_bench.jsonl] [--only int4_g64@tinygemm ...]
    python -m eval.bench.quant --shape llama2-7b-16k --only bf16 w8a8_fp8 --prefill-only --prefill-workload

Random weights (load_format="dummy"), compressed by round-to-nearest on the GPU into the engine's
compressed linears (engine/layers/quantized.py) before the KV cache is sized and the CUDA graphs
are captured. Each variant runs in its own try/except: a failure is recorded as an error line and
the others still run. One JSON object per line, to stdout and --out.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import time
import traceback
from typing import Any, Callable

import torch
from torch import nn

from eval.bench.ceilings import ceilings
from eval.bench.common import prompts as _prompts, shape_dir, timed

DECODE_VARIANTS = ["bf16", "int8", "int4_g64@triton", "int4_g64@tinygemm", "int4_g64@auto",
                   "int4_g128@triton", "int4_g128@tinygemm", "int4_g128@auto",
                   "int4_g128_zero@triton", "int4_g128_zero@tinygemm", "int4_g128_zero@auto", "sparse24",
                   "sparse24_int4_g128", "sparse24_int4_g64", "w8a8_int8"]
PREFILL_VARIANTS = ["bf16", "w8a8_int8", "w8a8_fp8", "sparse24", "int4_g128@triton", "int4_g128@tinygemm"]


# -- round-to-nearest compression of random weights, on the GPU -------------------------------------
def _int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.float().abs().amax(dim=1).clamp(min=1e-8) / 127.0
    return torch.round(w.float() / scale[:, None]).clamp(-128, 127).to(torch.int8), scale


def _int4(w: torch.Tensor, group: int, zero: bool):
    """(codes int8 [N, K] in [-8, 7], scale [N, G], zero [N, G] or None), min/max per group."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    if zero:
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        zp = torch.round(-8 - lo / scale).clamp(-8, 7)
    else:
        scale = (torch.maximum(-lo, hi) / 7.5).clamp(min=1e-8)
        zp = torch.zeros_like(scale)
    codes = (torch.round(g / scale[..., None]) + zp[..., None]).clamp(-8, 7).reshape(n, k).to(torch.int8)
    return codes, scale, (zp if zero else None)


def _prune_24(w: torch.Tensor) -> torch.Tensor:
    g = w.reshape(-1, 4).clone()
    g.scatter_(1, g.abs().topk(2, dim=1, largest=False).indices, 0)
    return g.reshape(w.shape)


def compressor(variant: str, options) -> Callable[[str, nn.Linear], nn.Module | None]:
    """make(name, linear) for replace_linears: the variant's module for a decoder linear (an int4
    kernel after "@" in the name is the engine's choice, not the compression's)."""
    from engine.layers.quantized import Int4Linear, Int8Linear, W8A8Linear
    from engine.layers.sparse24 import Sparse24Linear

    variant = variant.partition("@")[0]

    def make(name: str, linear: nn.Linear) -> nn.Module | None:
        if not name.startswith("model.layers."):
            return None  # lm_head stays bf16
        w, bias = linear.weight.data, linear.bias
        if variant == "int8":
            return Int8Linear(*_int8(w), bias, options)
        if variant.startswith("int4_g"):
            group = int(variant.split("_g")[1].split("_")[0])
            return Int4Linear(*_int4(w, group, variant.endswith("zero")), bias, options)
        if variant.startswith("sparse24_int4_g"):  # g64 for SmolLM2's 576-wide inputs, which 128 does not divide
            group = int(variant.split("_g")[1])
            codes, scale, zero = _int4(_prune_24(w), group, False)
            dense = (codes.float() * scale.repeat_interleave(group, dim=1))
            return Sparse24Linear(dense, bias, codes=codes, scale=scale, zero=zero, options=options)
        if variant == "sparse24":
            return Sparse24Linear(_prune_24(w), bias, options=options)
        if variant == "w8a8_int8":
            return W8A8Linear(*_int8(w), "int8", bias, options)
        if variant == "w8a8_fp8":
            scale = w.float().abs().amax(dim=1).clamp(min=1e-8) / 448.0
            return W8A8Linear((w.float() / scale[:, None]).to(torch.float8_e4m3fn), scale, "fp8", bias, options)
        raise ValueError(f"unknown variant {variant!r}")

    return make


@contextlib.contextmanager
def compressed_dummy_weights(variant: str):
    """While open, the engine's random (dummy) weights come compressed as `variant`: the swap
    happens inside init_dummy_weights, before the runner sizes the KV cache and captures graphs."""
    from engine.layers.quantized import replace_linears
    from engine.models.llama import LlamaForCausalLM

    original = LlamaForCausalLM.init_dummy_weights

    def init(self, std: float = 0.02) -> None:
        original(self, std)
        if variant != "bf16":
            with torch.no_grad():
                replace_linears(self, compressor(variant, self.options))
            self.update_fusable()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    LlamaForCausalLM.init_dummy_weights = init
    try:
        yield
    finally:
        LlamaForCausalLM.init_dummy_weights = original


def sparse24_paths(model: nn.Module) -> dict[str, dict]:
    """Per 2:4 layer shape "NxK": the path each timed batch size took (Sparse24Linear.paths, "auto"
    on a GPU; empty where nothing was timed) and the timings behind it (us), whether only a dense
    weight is left, whether a dense weight is kept (then alone: a layer never holds both forms),
    whether the kept half is int4 codes, and one layer's bytes per buffer (kept values or codes,
    positions, scales, zero points, a kept dense weight)."""
    from engine.layers.sparse24 import Sparse24Linear

    return {f"{m.out_features}x{m.in_features}": {
        "paths": {str(b): p for b, p in m.paths.items()},
        "us": {str(b): {p: s * 1e6 for p, s in t.items()} for b, t in m.timings.items()},
        "dense_only": m.meta is None, "dense_kept": m.weight is not None, "int4": m.quantized,
        "bytes": {name: t.numel() * t.element_size() for name, t in m.named_buffers()}}
        for m in model.modules() if isinstance(m, Sparse24Linear)}


def fused_rows(runner: Any) -> dict[str, Any]:
    """The most decode rows the engine runs fused (EngineConfig.fused_decode_rows: timed at startup
    on a GPU, engine/fused_rows.py) and the timings behind it: per decode bucket, the fused and
    unfused forward's device us (empty where nothing was timed)."""
    return {"fused_rows": runner.model.model.fused_rows,
            "fused_rows_us": {str(b): t for b, t in runner.fused_rows_us.items()}}


def streamed_bytes(model: nn.Module) -> int:
    """Bytes a decode step reads: every parameter and buffer but the embedding (rows are
    gathered), the rotary tables, the KV cache and the fp32 scales / zero points of int4 layers on
    tinygemm (kept for the prefill path: decode reads tinygemm's bf16 copy)."""
    from engine.layers.quantized import Int4Linear

    seen = {t.data_ptr() for m in model.modules() if isinstance(m, Int4Linear) and m.tinygemm_max_m
            for t in (m.scale, m.zero) if t is not None}
    total = 0
    embed = model.model.embed_tokens.weight
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.data_ptr() in seen or "rotary" in name or name.endswith(("k_cache", "v_cache")):
            continue
        seen.add(t.data_ptr())
        if t is embed and not getattr(model, "tie_word_embeddings", False):
            continue
        total += t.numel() * t.element_size()
    return total


def emit(record: dict[str, Any], out) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        out.write(line + "\n")
        out.flush()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Lines(logging.Handler):
    """Keeps the messages logged while it is attached."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def engine_options(variant: str, compressed_weights: str = "keep") -> dict[str, str]:
    """The engine keywords a variant's rows run with: int4_kernel after "@", and compressed_weights ("keep":
    the variant's compressed kernels are what a row measures; the engine's default "auto" may serve them
    dense on a GPU, engine/weight_form.py)."""
    kernel = variant.partition("@")[2]
    return {"compressed_weights": compressed_weights, **({"int4_kernel": kernel} if kernel else {})}


def int4_kernel_used(model: nn.Module) -> dict[str, Any]:
    """The int4 kernel the loaded model runs (and the most rows tinygemm takes), {} without int4."""
    from engine.layers.quantized import Int4Linear

    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    if not layers:
        return {}
    max_m = max(m.tinygemm_max_m for m in layers)
    return {"int4_kernel_used": "tinygemm" if max_m else "triton", "tinygemm_max_m": max_m}


def weight_only_linears(model: nn.Module) -> int:
    """How many int8 / int4 decoder linears the loaded model serves compressed (0 where compressed_weights
    "auto" served a weight-only variant dense)."""
    from engine.weight_form import compressed_layers

    return len(compressed_layers(model))


def decode(shape: str, variant: str, batches: list[int], new_tokens: int, prompt_len: int, ceiling_tbps: float,
           exact_dequant: bool = False, sparse24_timing: str = "eager", compressed_weights: str = "keep") -> dict:
    """One engine of `variant` ("int4_g128@tinygemm": the compression, then the int4_kernel);
    sparse24_timing: how the engine times 2:4 layers' decode candidates (engine/layers/options.py);
    compressed_weights: "keep" (the compressed kernels, what this bench measures), "auto" (the engine may
    serve dense weights where they decode faster: engine/weight_form.py; the record says which) or
    "dequantize" (the variant's weights served dense)."""
    from engine import LLM, SamplingParams

    choice_log = _Lines()
    for name in ("engine.int4", "engine.weights"):
        logging.getLogger(name).addHandler(choice_log)
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        with compressed_dummy_weights(variant):
            t = time.perf_counter()
            llm = LLM(shape_dir(shape), load_format="dummy", max_num_seqs=max(batches),
                      cuda_graph_max_bs=max(batches), exact_dequant=exact_dequant,
                      max_model_len=prompt_len + new_tokens + 16, enable_prefix_caching=False,
                      sparse24_timing=sparse24_timing, **engine_options(variant, compressed_weights))
            setup_s = time.perf_counter() - t
    finally:
        for name in ("engine.int4", "engine.weights"):
            logging.getLogger(name).removeHandler(choice_log)
    model = llm.engine.runner.model
    nbytes = streamed_bytes(model)
    record: dict[str, Any] = {"kind": "decode", "shape": shape, "variant": variant, "weight_bytes": nbytes,
                              "exact_dequant": exact_dequant, **int4_kernel_used(model),
                              "compressed_weights": compressed_weights,
                              "weight_only_linears": weight_only_linears(model),
                              "weight_form_us": {f: {str(b): t for b, t in us.items()}
                                                 for f, us in llm.engine.runner.weight_form_us.items()},
                              "fused_decode": bool(model.model.fusable), **fused_rows(llm.engine.runner),
                              "setup_s": setup_s,
                              "sparse24_paths": sparse24_paths(model)}
    if record["sparse24_paths"]:
        record["sparse24_timing"] = sparse24_timing
    if choice_log.lines:
        record["int4_kernel_log"] = choice_log.lines  # and compressed_weights "auto"'s choice
    vocab = llm.engine.vocab_size
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for bs in batches:
        llm.generate(_prompts(bs, prompt_len, vocab, 1000 + bs), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        res, dt = timed(lambda: llm.generate(_prompts(bs, prompt_len, vocab, bs), params))
        assert all(len(r.token_ids) == new_tokens for r in res)
        tok_s = bs * new_tokens / dt
        gbps = nbytes * (tok_s / bs) / 1e9  # one weight read per step
        record[f"b{bs}_tok_s"] = tok_s
        record[f"b{bs}_weight_GBps"] = gbps
        record[f"b{bs}_of_copy_ceiling"] = gbps / (ceiling_tbps * 1e3)
    del llm, model
    _free()
    return record


PREFILL_MARGIN = 16  # max_model_len = prompt + this (the one generated token and slack)


def prefill_tokens(shape: str, requested: int) -> int:
    """The prompt length a prefill run uses: the requested one, capped so that prompt +
    PREFILL_MARGIN fits the shape's positions (Llama-2-7B has 4096: 8192 tokens cannot be)."""
    from eval.bench.common import SHAPES

    positions = int(SHAPES[shape].get("max_position_embeddings", requested + PREFILL_MARGIN))
    return min(requested, positions - PREFILL_MARGIN)


def prefill(shape: str, variant: str, tokens: int, compressed_weights: str = "keep") -> dict:
    """One prompt of prefill_tokens(shape, tokens) tokens; the record names the count used.
    compressed_weights: as decode()'s (the engine's "auto" would time its decode forward, whatever prefill is
    measured here: "keep" measures the compressed paths)."""
    from engine import LLM, SamplingParams

    tokens = prefill_tokens(shape, tokens)
    with compressed_dummy_weights(variant):
        llm = LLM(shape_dir(shape), load_format="dummy", max_num_seqs=1, max_model_len=tokens + PREFILL_MARGIN,
                  max_num_batched_tokens=tokens, enable_prefix_caching=False, enforce_eager=True,
                  **engine_options(variant, compressed_weights))
    vocab = llm.engine.vocab_size
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate(_prompts(1, tokens, vocab, 7), one)  # warm-up (and the 2:4 weights' conversion)
    times = []
    for seed in range(3):
        _, dt = timed(lambda: llm.generate(_prompts(1, tokens, vocab, seed), one))
        times.append(dt)
    paths = sparse24_paths(llm.engine.runner.model)
    del llm
    _free()
    best = min(times)
    return {"kind": "prefill", "shape": shape, "variant": variant, "tokens": tokens, "seconds": best,
            "tok_s": tokens / best, "sparse24_paths": paths, "compressed_weights": compressed_weights}


def prefill_workload(shape: str, variant: str, num_seqs: int = 256, max_input: int = 1024,
                     compressed_weights: str = "keep") -> dict:
    """The prompts of nano-vllm's workload (eval/bench/throughput.py: 256 of 100..1024 tokens), one
    output token each: prefill only, in the engine's default steps (up to max_num_batched_tokens
    tokens of several prompts: ragged row counts). Token ids are taken modulo the vocabulary."""
    from engine import LLM, SamplingParams
    from eval.bench.throughput import nano_vllm_workload

    with compressed_dummy_weights(variant):
        llm = LLM(shape_dir(shape), load_format="dummy", max_model_len=max_input + PREFILL_MARGIN,
                  enable_prefix_caching=False, enforce_eager=True, **engine_options(variant, compressed_weights))
    vocab = llm.engine.vocab_size
    prompts = [[t % vocab for t in p] for p in nano_vllm_workload(num_seqs, max_input)[0]]
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate(prompts[:8], one)  # warm-up
    _, dt = timed(lambda: llm.generate(prompts, one))
    del llm
    _free()
    tokens = sum(len(p) for p in prompts)
    return {"kind": "prefill_workload", "shape": shape, "variant": variant, "prompts": len(prompts),
            "tokens": tokens, "seconds": dt, "tok_s": tokens / dt, "compressed_weights": compressed_weights}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--out", default="quant_bench.jsonl")
    ap.add_argument("--only", nargs="*", help="variants to run (default: all)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--prefill-tokens", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--prefill-only", action="store_true", help="skip the decode runs")
    ap.add_argument("--prefill-workload", action="store_true",
                    help="also prefill nano-vllm's 256 prompts (one output token each) per prefill variant")
    ap.add_argument("--sparse24-timing", choices=["eager", "graph"], default="eager",
                    help="how the engine times 2:4 layers' decode-size paths (EngineConfig.sparse24_timing)")
    ap.add_argument("--compressed-weights", choices=["keep", "auto", "dequantize"], default="keep",
                    help="keep: time the compressed kernels; auto: as the engine serves by default (dense where "
                         "it decodes faster, engine/weight_form.py); dequantize: the variants served dense")
    ap.add_argument("--exact-dequant", action="store_true",
                    help="decode the compressed variants with the exact dequantization (default: the fast one)")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.only or ()) - set(DECODE_VARIANTS) - set(PREFILL_VARIANTS))
    if unknown:
        ap.error(f"--only: unknown variant(s) {', '.join(unknown)}; "
                 f"choose from {', '.join(dict.fromkeys(DECODE_VARIANTS + PREFILL_VARIANTS))}")
    if not torch.cuda.is_available():
        raise SystemExit("eval.quant_bench needs a CUDA GPU")
    started = time.perf_counter()
    with open(args.out, "a") as out:
        ceiling = ceilings()
        emit({"kind": "ceilings", "device": torch.cuda.get_device_name(), **ceiling}, out)
        base: dict[str, float] = {}
        for variant in DECODE_VARIANTS:
            if args.prefill_only or (args.only and variant not in args.only):
                continue
            try:
                rec = decode(args.shape, variant, args.batch, args.new_tokens, args.prompt_len,
                             ceiling["copy_bandwidth_TBps"], args.exact_dequant, args.sparse24_timing,
                             args.compressed_weights)
                if variant == "bf16":
                    base = {bs: rec[f"b{bs}_tok_s"] for bs in args.batch}
                for bs in args.batch:
                    if bs in base:
                        rec[f"b{bs}_vs_bf16"] = rec[f"b{bs}_tok_s"] / base[bs]
            except Exception as e:  # recorded; the next variant still runs
                rec = {"kind": "decode", "shape": args.shape, "variant": variant, "error": repr(e),
                       "traceback": traceback.format_exc(limit=-12)}
                _free()
            emit(rec, out)
        base_prefill: dict[int | str, float] = {}
        for variant in PREFILL_VARIANTS:
            if args.only and variant not in args.only:
                continue
            for tokens in args.prefill_tokens:
                try:
                    rec = prefill(args.shape, variant, tokens, args.compressed_weights)
                    if variant == "bf16":
                        base_prefill[tokens] = rec["tok_s"]
                    if tokens in base_prefill:
                        rec["vs_bf16"] = rec["tok_s"] / base_prefill[tokens]
                except Exception as e:
                    rec = {"kind": "prefill", "shape": args.shape, "variant": variant, "tokens": tokens,
                           "error": repr(e), "traceback": traceback.format_exc(limit=-12)}
                    _free()
                emit(rec, out)
            if args.prefill_workload:
                try:
                    rec = prefill_workload(args.shape, variant, compressed_weights=args.compressed_weights)
                    if variant == "bf16":
                        base_prefill["workload"] = rec["tok_s"]
                    if "workload" in base_prefill:
                        rec["vs_bf16"] = rec["tok_s"] / base_prefill["workload"]
                except Exception as e:
                    rec = {"kind": "prefill_workload", "shape": args.shape, "variant": variant, "error": repr(e),
                           "traceback": traceback.format_exc(limit=-12)}
                    _free()
                emit(rec, out)
        emit({"kind": "done", "wall_s": time.perf_counter() - started}, out)


if __name__ == "__main__":
    main()

"""The benchmarks' command line: one subcommand per module of eval/bench/."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from eval.bench.agreement import agreement
from eval.bench.capacity import capacity
from eval.bench.ceilings import ceilings
from eval.bench.common import RESULTS, SHAPES, log
from eval.bench.convert_gguf import convert_gguf
from eval.bench.decode import decode
from eval.bench.decode_profile import profile
from eval.bench.host import host_overhead
from eval.bench.quant import compressed_dummy_weights, engine_options as variant_options
from eval.bench.throughput import throughput


def _profile(args) -> None:
    """profile, with --variant's compressed random weights (a --shape's only)."""
    if args.variant != "bf16" and not args.shape:
        raise SystemExit(f"profile: --variant {args.variant} compresses a --shape's random weights, not --model's")
    # The variant's compressed kernels are profiled (compressed_weights "keep"); --engine compressed_weights=...
    # overrides it.
    options = {} if args.variant == "bf16" else variant_options(args.variant)
    with compressed_dummy_weights(args.variant):
        profile(args, options)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m eval.bench")
    ap.add_argument("--json", help="also write all results to this file")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("ceilings")
    d = sub.add_parser("decode")
    d.add_argument("--model")
    d.add_argument("--shape", choices=sorted(SHAPES))
    d.add_argument("--batch", type=int, nargs="+", default=[1])
    d.add_argument("--new-tokens", type=int, default=256)
    d.add_argument("--prompt-len", type=int, default=16)
    d.add_argument("--hf", action="store_true", help="measure transformers generate with a static cache first")
    d.add_argument("--hf-compile", action="store_true", help="let transformers torch.compile its static-cache decode")
    d.add_argument("--roofline", action="store_true")
    d.add_argument("--engine", nargs="*", metavar="KEY=VALUE", help="EngineConfig overrides, e.g. num_decode_steps=1")
    t = sub.add_parser("throughput")
    t.add_argument("--shape", default="tinyllama", choices=sorted(SHAPES))
    t.add_argument("--max-num-seqs", type=int, default=256)
    t.add_argument("--max-num-batched-tokens", type=int, default=8192)
    t.add_argument("--prefill-attention", default="triton", choices=["sdpa", "triton"])
    t.add_argument("--profile-steps", default=None, metavar="FIRST:LAST",
                   help="trace engine steps FIRST..LAST-1 with torch.profiler: GPU busy fraction there")
    c = sub.add_parser("capacity")
    c.add_argument("--shape", default="tinyllama", choices=sorted(SHAPES))
    c.add_argument("--kv-tokens", type=int, help="pool size in tokens (default: what the engine sizes on this GPU)")
    a = sub.add_parser("agreement")
    a.add_argument("--model", required=True)
    a.add_argument("--new-tokens", type=int, default=64)
    h = sub.add_parser("host", help="host time per decode step, by phase (CPU, tiny model)")
    h.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    h.add_argument("--steps", type=int, default=512)
    h.add_argument("--prompt-len", type=int, default=16)
    h.add_argument("--vocab", type=int, default=512, help="small: the LM head and argmax stay negligible")
    h.add_argument("--repeat", type=int, default=3)
    h.add_argument("--device", default="cpu")
    h.add_argument("--forward", default="stub", choices=["stub", "real"],
                   help="stub: the model returns fixed hidden states and logits (the default); real: the tiny model runs")
    h.add_argument("--spec", type=int, default=0, metavar="K",
                   help="time speculative rounds instead (n-gram drafter, K tokens, a stub model it mostly predicts)")
    h.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: this thread's CPU time (steadier on a machine shared with other work)")
    pr = sub.add_parser("profile", help="decode step time: whole step, graph replay alone, kernels by name")
    pr.add_argument("--model")
    pr.add_argument("--shape", choices=sorted(SHAPES))
    pr.add_argument("--batch", type=int, nargs="+", default=[1])
    pr.add_argument("--steps", type=int, default=256)
    pr.add_argument("--prompt-len", type=int, default=16)
    pr.add_argument("--top", type=int, default=25)
    pr.add_argument("--eager", action="store_true", help="no CUDA graphs")
    pr.add_argument("--engine", nargs="*", metavar="KEY=VALUE", help="EngineConfig overrides, e.g. fused_decode=false")
    pr.add_argument("--variant", default="bf16",
                    help="with --shape: its random weights compressed as eval.bench.quant's decode variants "
                    "(int8, int4_g128@triton, ...)")
    g = sub.add_parser("convert-gguf")
    g.add_argument("--gguf", required=True)
    g.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.cmd in ("decode", "profile") and not (args.model or args.shape):
        ap.error(f"{args.cmd} needs --model or --shape")
    log(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} torch {torch.__version__} "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}: {' '.join(sys.argv)}")
    {"ceilings": lambda: ceilings(), "decode": lambda: decode(args), "throughput": lambda: throughput(args),
     "capacity": lambda: capacity(args), "agreement": lambda: agreement(args),
     "convert-gguf": lambda: convert_gguf(args), "host": lambda: host_overhead(args),
     "profile": lambda: _profile(args)}[args.cmd]()
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({args.cmd: RESULTS}, default=str) + "\n")


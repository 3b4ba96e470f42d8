"""Is the model already on a 4-bit grid, and what does putting it on another int4 grid cost? (issue 16)

The default teacher comes from a GGUF whose linears are all Q4_1: per group of 32 inputs,
w = min + d * q with q in 0..15 and a float min and step d. Dequantized into the artifact (bf16), every
linear still sits on that grid. Re-quantizing it to int4 then rounds a second time, onto a grid that
does not line up with the first: symmetric (zero point 0), or asymmetric with an integer zero point
(compressed-tensors' convention, shrink/compress/quant.py), at group 32 or 64. This measures, per
variant, the weights' relative error and WikiText-2 perplexity (the project's protocol, the first
--windows non-overlapping 2048-token windows, fp32 on the CPU or GPU), each a round-to-nearest of the
same weights:
- "q4_1_g32": the Q4_1 grid itself (float min and step per group of 32), which reproduces a Q4_1 model;
- "asym_g32", "asym_g64": ours, integer zero point; "sym_g32", "sym_g64" (the presets' int4), "sym_g128"
  where 128 divides the inputs; "int8": per channel, for scale.
It also reports how far each linear is from the Q4_1 grid: the largest |(w - min) / d - q| over all
weights, in steps (0: exactly on it; bf16 storage leaves a few hundredths).

    python experiments/int4_grid.py --model ARTIFACT --data-dir ../shared/data --windows 8 --json out.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.perplexity import encode, perplexity, wikitext2_text  # noqa: E402
from shrink.compress.quant import QuantSpec, rtn  # noqa: E402


def q4_1(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, float]:
    """w [out, in] rounded onto GGUF Q4_1's grid (per group of ``group`` inputs: min + d * q, q in
    0..15, float min and d = (max - min) / 15), and the largest distance of w from it, in steps."""
    out, inp = w.shape
    if inp % group:
        raise ValueError(f"q4_1: group {group} does not divide in_features {inp}")
    x = w.float().reshape(out, inp // group, group)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    d = torch.where(d == 0, torch.ones_like(d), d)
    steps = (x - lo) / d
    q = torch.clamp(torch.round(steps), 0, 15)
    return (lo + q * d).reshape(out, inp).to(w.dtype), float((steps - q).abs().amax())


def _rtn(bits: int, group: int | None, symmetric: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    spec = QuantSpec(bits, group, symmetric)
    return lambda w: rtn(w.float(), spec).dequantize(torch.float32).to(w.dtype)


VARIANTS: dict[str, tuple[int | None, Callable[[torch.Tensor], torch.Tensor]]] = {
    "q4_1_g32": (32, lambda w: q4_1(w)[0]),
    "asym_g32": (32, _rtn(4, 32, False)),
    "sym_g32": (32, _rtn(4, 32, True)),
    "asym_g64": (64, _rtn(4, 64, False)),
    "sym_g64": (64, _rtn(4, 64, True)),
    "sym_g128": (128, _rtn(4, 128, True)),
    "int8": (None, _rtn(8, None, True)),
}


def linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The decoder's linears (the quantize stage's targets: lm_head and embeddings stay dense)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}


def grid_distance(model: torch.nn.Module) -> float:
    """The largest distance, in Q4_1 steps, of any linear's weight from its group-32 Q4_1 grid."""
    return max(q4_1(m.weight.data)[1] for m in linears(model).values() if m.in_features % 32 == 0)


def run(model: torch.nn.Module, ids: torch.Tensor, windows: int, variants: list[str], emit) -> None:
    """Each variant's relative weight error and perplexity, the model restored after each."""
    lin = linears(model)
    original = {n: m.weight.data.clone() for n, m in lin.items()}
    started = time.perf_counter()
    base = perplexity(model, ids, context=2048, stride=2048, max_windows=windows, full_windows_only=True)
    emit({"variant": "original", "ppl": base.ppl, "tokens": base.tokens, "windows": base.windows,
          "q4_1_grid_distance_steps": grid_distance(model), "seconds": time.perf_counter() - started})
    for name in variants:
        group, fn = VARIANTS[name]
        fits = [n for n, m in lin.items() if group is None or m.in_features % group == 0]
        if len(fits) < len(lin):
            emit({"variant": name, "skipped": f"group {group} divides {len(fits)} of {len(lin)} linears' inputs"})
            continue
        started = time.perf_counter()
        err = total = 0.0
        with torch.no_grad():
            for n, m in lin.items():
                wq = fn(original[n])
                err += float((wq.float() - original[n].float()).pow(2).sum())
                total += float(original[n].float().pow(2).sum())
                m.weight.data.copy_(wq)
            res = perplexity(model, ids, context=2048, stride=2048, max_windows=windows, full_windows_only=True)
            for n, m in lin.items():
                m.weight.data.copy_(original[n])
        emit({"variant": name, "rel_weight_error": math.sqrt(err / total), "ppl": res.ppl,
              "ppl_ratio": res.ppl / base.ppl, "seconds": time.perf_counter() - started})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="an artifact directory (or a hub id)")
    ap.add_argument("--data-dir", required=True, type=Path)
    ap.add_argument("--windows", type=int, default=8, help="2048-token WikiText-2 windows scored (148 is all)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--json", default=None, help="also write the JSON lines to this file")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device).eval()
    ids = encode(tok, wikitext2_text(args.data_dir))
    sink = open(args.json, "w") if args.json else None

    def emit(rec: dict) -> None:
        line = json.dumps({"model": str(args.model), "device": device, **rec})
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()

    with torch.no_grad():
        run(model, ids, args.windows, args.variants, emit)
    if sink:
        sink.close()


if __name__ == "__main__":
    main()

"""Where batch-invariant mode leaves the right answer on a GPU (issue 14: on the H200 the real SmolLM2
teacher drafting for itself accepted 51% of its drafts and left plain greedy at the first token).

    python experiments/batch_invariant_diag.py --model DIR [--prompts 4] [--prompt-len 128] [--json out.jsonl]

One process. A transformers forward (bf16 and fp32) of --prompts random prompts of --prompt-len tokens
plus their first 32 greedy tokens is the reference. Each engine variant then scores the same token
sequences (prompt logprobs: every position's log-probability of the next token) and generates 32
greedy tokens; per variant: the largest |logprob - transformers fp32| over each 16-position stretch
(the pseudo-row forwards' granularity at max_num_seqs 16), the first position past 0.25, and whether its
greedy tokens equal fp32 transformers'. Variants: the mode off; on at max_num_seqs 16 and 80; on without
CUDA graphs; on with pdl off; on with num_decode_steps 1; and a draft = target speculative run's
acceptance. Which variant departs first names the part of the mode that is wrong.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NEW = 32
DEVICE = "cuda"
EXTRA: dict = {}  # --engine: settings for every variant
STRETCH = 16


def reference(model_dir: str, seqs: list[list[int]], dtype: torch.dtype) -> list[torch.Tensor]:
    """Per sequence, transformers' log-probability of each next token (positions 1..)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).to(DEVICE).eval()
    out = []
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s], device=DEVICE)
            lp = torch.log_softmax(m(ids).logits[0].float(), -1)
            out.append(lp[:-1].gather(1, ids[0, 1:, None])[:, 0].cpu())
    del m
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def hf_greedy(model_dir: str, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).to(DEVICE).eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            g = m.generate(torch.tensor([p], device=DEVICE), max_new_tokens=NEW, do_sample=False)
            outs.append(g[0, len(p):].tolist())
    del m
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return outs


def engine_run(model_dir: str, prompts: list[list[int]], full: list[list[int]], **kw) -> dict:
    from engine import LLM, SamplingParams

    max_len = max(len(s) for s in full) + NEW + 16
    kw = {"device": DEVICE, "dtype": "bfloat16", **EXTRA, "max_model_len": max_len, "kv_cache_tokens": 20 * max_len,
          "enable_prefix_caching": False, **kw}
    llm = LLM(model_dir, **kw)
    score = llm.generate([{"prompt_token_ids": s} for s in full],
                         SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))
    lps = [torch.tensor([entry[tok].logprob for entry, tok in zip(o.prompt_logprobs[1:], s[1:])])
           for o, s in zip(score, full)]
    gen = llm.generate([{"prompt_token_ids": p} for p in prompts],
                       SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
    m = llm.engine.spec_metrics
    acc = None if m is None else [m.num_accepted, m.num_proposed]
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"logprobs": lps, "greedy": [o.token_ids for o in gen], "accepted_proposed": acc}


def compare(lps: list[torch.Tensor], ref: list[torch.Tensor]) -> dict:
    worst = [max((a - b).abs()[i : i + STRETCH].max().item() for a, b in zip(lps, ref) if i < len(a))
             for i in range(0, max(len(r) for r in ref), STRETCH)]
    firsts = [next((i for i, d in enumerate((a - b).abs().tolist()) if d > 0.25), None) for a, b in zip(lps, ref)]
    return {"max_abs_per_16": [round(w, 4) for w in worst], "first_pos_over_0.25": firsts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--engine", default=None, help="JSON of engine settings for every variant")
    args = ap.parse_args()
    global DEVICE, EXTRA
    DEVICE, EXTRA = args.device, json.loads(args.engine) if args.engine else {}
    g = torch.Generator().manual_seed(0)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    prompts = [torch.randint(3, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    greedy32 = hf_greedy(args.model, prompts)
    full = [p + t for p, t in zip(prompts, greedy32)]
    ref32, ref16 = reference(args.model, full, torch.float32), reference(args.model, full, torch.bfloat16)
    rows = [{"variant": "transformers bf16", **compare(ref16, ref32)}]
    variants = {
        "off": {},
        "on, max_num_seqs 16": {"batch_invariant": True, "max_num_seqs": 16},
        "on, max_num_seqs 80": {"batch_invariant": True, "max_num_seqs": 80},
        "on, 16, eager": {"batch_invariant": True, "max_num_seqs": 16, "enforce_eager": True},
        "on, 16, pdl off": {"batch_invariant": True, "max_num_seqs": 16, "pdl": False},
        "on, 16, 1 decode step": {"batch_invariant": True, "max_num_seqs": 16, "num_decode_steps": 1},
        "on, 16, self-draft k 4": {"batch_invariant": True, "max_num_seqs": 16,
                                   "speculative_config": {"model": args.model, "num_speculative_tokens": 4}},
    }
    for name, kw in variants.items():
        try:
            r = engine_run(args.model, prompts, full, **kw)
        except Exception as e:  # one variant failing must not hide the others
            rows.append({"variant": name, "error": f"{type(e).__name__}: {e}"[:400]})
            print(rows[-1], flush=True)
            continue
        firsts = [next((j for j, (a, b) in enumerate(zip(o, h)) if a != b), None) for o, h in zip(r["greedy"], greedy32)]
        rows.append({"variant": name, **compare(r["logprobs"], ref32), "greedy_first_divergence_vs_hf32": firsts,
                     "accepted_proposed": r["accepted_proposed"]})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps({"bench": "batch_invariant_diag", "model": args.model, **row}) + "\n")


if __name__ == "__main__":
    main()

"""Greedy agreement with transformers on a real model, and where the two diverge."""

from __future__ import annotations

import torch

from eval.bench.common import RESULTS, log

AGREEMENT_PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
    "The three laws of thermodynamics are", "To make a cup of tea, first", "In 1969, the Apollo 11 mission",
    "Photosynthesis is the process by which", "The quick brown fox", "import numpy as np\n\n",
    "Here is a list of healthy breakfast ideas:\n1.", "The difference between a list and a tuple in Python is",
    "Q: What is 12 times 7?\nA:", "Dear hiring manager,", "The mitochondria is", "Translate to French: Good morning",
    "A haiku about autumn:\n", "The best way to learn a language is", "SELECT name FROM users WHERE",
    "Water boils at", "The theory of relativity states that", "My favourite book is", "Climate change is caused by",
    "How do airplanes fly?", "The history of the Roman Empire", "Write a short poem about the sea.",
    "The main ingredients of bread are", "Machine learning is a field that", "The largest planet in our solar system",
    "Steps to change a flat tire:", "Once the sun had set,", "A good night's sleep helps", "Explain recursion to a child:",
]


def agreement(args) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(args.model)
    n_new = args.new_tokens
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).cuda().eval()
    ref_tokens, ref_scores = [], []
    with torch.no_grad():
        for p in AGREEMENT_PROMPTS:
            ids = torch.tensor([tok.encode(p)], device="cuda")
            g = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                            do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
            ref_tokens.append(g.sequences[0, ids.shape[1]:].tolist())
            ref_scores.append(torch.stack([s[0].float() for s in g.scores]))
    del hf
    torch.cuda.empty_cache()
    llm = LLM(args.model, max_model_len=512, max_num_seqs=64)
    outs = llm.generate([tok.encode(p) for p in AGREEMENT_PROMPTS],
                        SamplingParams(temperature=0, max_tokens=n_new, min_tokens=n_new, logprobs=5))
    same_seq, same_tok, total, divergences = 0, 0, 0, []
    for i, (o, ref, scores) in enumerate(zip(outs, ref_tokens, ref_scores)):
        total += n_new
        if o.token_ids == ref:
            same_seq += 1
            same_tok += n_new
            continue
        j = next(k for k in range(n_new) if o.token_ids[k] != ref[k])
        same_tok += j
        row = scores[j]
        hf_gap = (row[ref[j]] - row[o.token_ids[j]]).item()  # HF's logit margin for its own choice
        lp = o.logprobs[j]
        # nan: transformers' token is not among the engine's top 5 there (a tie of several tokens).
        eng_gap = lp[o.token_ids[j]].logprob - lp.get(ref[j]).logprob if ref[j] in lp else float("nan")
        ulp = 2.0 ** (torch.floor(torch.log2(row[ref[j]].abs())).item() - 7)  # bf16 spacing at that logit
        divergences.append(dict(prompt=i, position=j, hf_logit_gap=hf_gap, engine_logprob_gap=eng_gap, bf16_ulp=ulp))
    out = dict(sequences=len(outs), identical_sequences=same_seq, tokens_before_divergence=same_tok,
               tokens_total=total, divergences=divergences)
    RESULTS["agreement"] = out
    log(f"greedy agreement, {args.model} bf16, {len(outs)} prompts x {n_new} tokens vs transformers bf16 (one prompt at a time; "
        f"EOS masked on both sides: min_new_tokens / min_tokens):")
    log(f"  identical sequences {same_seq}/{len(outs)}; divergence rate {100 * (len(outs) - same_seq) / len(outs):.1f}% "
        f"of sequences; tokens matching up to the first divergence {same_tok}/{total}")
    for d in divergences:
        log(f"  prompt {d['prompt']:2d} diverges at token {d['position']:3d}: transformers' top-1 leads the engine's token "
            f"by {d['hf_logit_gap']:.4f} logits (bf16 ulp there {d['bf16_ulp']:.4f}); engine's margin the other way "
            + (f"{d['engine_logprob_gap']:.4f} nats" if d["engine_logprob_gap"] == d["engine_logprob_gap"]
               else "not measured (transformers' token is not in the engine's top 5)"))

"""Issue 14: what Medusa heads (`distill=medusa`) accept when they draft for their teacher in our engine,
greedy, on WikiText-2 paragraphs, and that the output equals plain greedy decoding (the engine's own
acceptance counters; on any device, e.g. the CPU where no GPU is at hand).

    python experiments/medusa_acceptance.py --teacher RUN/teacher --heads RUN/distill --data-dir ../shared/data \
        [--device cpu] [--prompts 6] [--prompt-tokens 64] [--new-tokens 48] [--ks 1 2 4]

One JSON line per k: greedy_equal, the acceptance rate and the accepted / proposed drafts per position.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import LLM, SamplingParams  # noqa: E402
from eval.perplexity import wikitext2_text  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="the heads' teacher (a model directory)")
    p.add_argument("--heads", required=True, help="a Medusa artifact (common/medusa.py)")
    p.add_argument("--data-dir", required=True, help="shared data with wikitext-2-raw/")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompts", type=int, default=6, help="WikiText-2 test paragraphs of over 300 characters")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    args = p.parse_args(argv)
    paragraphs = [t.strip() for t in wikitext2_text(Path(args.data_dir)).split("\n") if len(t.strip()) > 300]
    plain = LLM(args.teacher, device=args.device, dtype=args.dtype)
    prompts = [{"prompt_token_ids": plain.tokenizer.encode(t)[: args.prompt_tokens]} for t in paragraphs[: args.prompts]]
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    base = [o.token_ids for o in plain.generate(prompts, params)]
    for k in args.ks:
        spec = {"method": "medusa", "model": args.heads, "num_speculative_tokens": k}
        llm = LLM(args.teacher, device=args.device, dtype=args.dtype, speculative_config=spec)
        out = [o.token_ids for o in llm.generate(prompts, params)]
        m = llm.engine.spec_metrics
        print(json.dumps({"bench": "medusa_acceptance", "heads": args.heads, "k": k, "greedy_equal": out == base,
                          "acceptance_rate": round(m.acceptance_rate, 4), "accepted_per_position": m.accepted_per_position,
                          "proposed_per_position": m.proposed_per_position}), flush=True)


if __name__ == "__main__":
    main()

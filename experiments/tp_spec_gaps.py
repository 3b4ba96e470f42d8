"""Issue 17: the top-1/top-2 logit gap (fp32, transformers on the CPU) at every greedy token of the two
failing cases of test_two_gpus_with_speculation_give_the_tokens_of_one, to tell a rounding-level
near-tie (a flip any change of reduction order may cause) from a real divergence. Prints JSON."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "engine"))
from conftest import ARCHS  # noqa: E402
from tiny_models import looping_model_dir, make_model_dir, prompts  # noqa: E402

LENGTHS = (5, 17, 9, 30, 3, 12, 23, 2, 14, 8, 26, 11)


def spec_prompts(n: int) -> list[list[int]]:
    ps = prompts(n, seed=3, lo=2, hi=40)
    return [p + p[: len(p) // 2] if i % 2 else p for i, p in enumerate(ps)]


def gaps(path: str, n: int) -> list[list[tuple[int, float]]]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p, m in zip(spec_prompts(n), LENGTHS[:n]):
            ids, rows = torch.tensor([p]), []
            for _ in range(m):
                logits = model(ids).logits[0, -1]
                top = logits.topk(2)
                rows.append((int(top.indices[0]), float(top.values[0] - top.values[1])))
                ids = torch.cat([ids, top.indices[:1][None]], dim=1)
            out.append(rows)
    return out


def summary(case: str, g, seq: int, tok: int, seen: tuple[int, int]) -> dict:
    flat = sorted(gap for rows in g for _, gap in rows)
    return {"case": case, "tokens": len(flat), "min_gap": flat[0], "gaps_below_1e-4": sum(x < 1e-4 for x in flat),
            "gaps_below_1e-5": sum(x < 1e-5 for x in flat), "divergent": {"seq": seq, "index": tok,
            "token": g[seq][tok][0], "gap": g[seq][tok][1], "one_gpu_vs_two": seen},
            "smallest": sorted(((gap, i, j) for i, rows in enumerate(g) for j, (_, gap) in enumerate(rows)))[:5]}


if __name__ == "__main__":
    root = Path(tempfile.mkdtemp())
    ngram = gaps(looping_model_dir(root / "looping"), 12)
    target = make_model_dir("llama_gqa_untied", str(root / "tok"), seed=sorted(ARCHS).index("llama_gqa_untied"),
                            with_tokenizer=True)
    draft = gaps(target, 8)
    print(json.dumps([summary("ngram", ngram, 9, 7, (108, 86)), summary("draft_model", draft, 1, 14, (139, 19))]))

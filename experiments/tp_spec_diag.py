"""Issue 17: where two GPUs with speculation leave one GPU without it (the [ngram] and [draft_model]
cases of tests/engine/test_tensor_parallel.py::test_two_gpus_with_speculation_give_the_tokens_of_one).

    NCCL_NVLS_ENABLE=0 python experiments/tp_spec_diag.py [--case ngram draft_model] [--variants ...]
        [--device cuda] [--json out.jsonl]

The test's models, requests and engine settings (fp32, max_model_len 160, 256 KV blocks on the GPU).
Per case the reference is the one-rank engine without speculation. Each variant then generates with
speculation, and every verify forward is checked where it happens: rank 0's gathered fp32 logits of each
verify row against transformers (fp32, on the CPU) on the same tokens (the sequence so far plus the
chunk, a model drafter's device tokens included). One JSON line per variant (written as it ends):

- ``tokens_equal``: the test's assertion; ``first_divergence``: (sequence, index, got, want);
- ``paths``: how many verifies took each path, and rank 0's timed table (``table``, ``ragged``);
- ``bad_steps``: the first verify steps with a row off transformers by more than 1e-3 (step number,
  path, tokens, sequences, the largest error, and each bad row as (chunk, row in chunk, start, error)),
  with the path of the step before;
- ``max_error``: over every verify row.

Variants: ``tp{1,2}_{timed,pseudo_rows,prefill}`` (the path table as timed, or forced to one path:
prefill past the pseudo-rows whatever is forced), with ``_eager`` for enforce_eager (no graphs: nothing
timed) and ``_nopdl`` for pdl=False (no programmatic dependent launch). A variant that is right at tp1 and wrong at tp2 names tensor parallelism; one path wrong and
the other right names that path; the first bad step (its path, the path before it, the row) names the
forward that left transformers, before any token flipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "engine"), str(ROOT / "tests" / "engine" / "spec_decode")]

THRESHOLD = 1e-3
DEFAULT_VARIANTS = ["tp2_timed", "tp2_pseudo_rows", "tp2_pseudo_rows_nopdl", "tp2_prefill", "tp1_pseudo_rows",
                    "tp1_pseudo_rows_nopdl", "tp2_timed_eager"]


def case_inputs(case: str, root: Path):
    """(model dir, speculative config, prompts, params), as the test builds them."""
    import test_tensor_parallel as T
    from conftest import ARCHS
    from drafts import perturbed_copy
    from tiny_models import looping_model_dir, make_model_dir

    if case == "ngram":
        return (looping_model_dir(root / "looping"), T.NGRAM, *T._spec_requests(12))
    path = make_model_dir(T.SPEC_TARGET, str(root / "tok"), seed=sorted(ARCHS).index(T.SPEC_TARGET),
                          with_tokenizer=True)
    spec = {"model": perturbed_copy(path, str(root / "draft"), 0.008), "num_speculative_tokens": 3}
    return (path, spec, *T._spec_requests(8))


def force(paths, name: str) -> None:
    """Every verify through ``name`` (prefill past the pseudo-rows)."""
    rows = range(2, paths.max_pseudo_rows + 1)
    paths.path = {**{n: name for n in rows}, 0: "prefill"}
    paths.ragged = {}


class VerifyRecorder:
    """Wraps rank 0's spec worker: per verify step, the sequences' tokens, the chunks, the path, and
    a device copy of the logits (no sync added: the copy is queued behind the forward)."""

    def __init__(self, engine) -> None:
        self.steps: list[dict] = []
        worker, paths = engine.spec_worker, engine.runner.verify_paths
        inputs, all_logits, choose = worker._verify_inputs, paths.all_logits, paths.choose

        def verify_inputs(seqs, proposal, k):
            chunks, ids = inputs(seqs, proposal, k)
            self.steps.append({"tokens": [list(s.token_ids) for s in seqs], "seq_ids": [s.seq_id for s in seqs],
                               "chunks": [(list(c[0]), c[1]) for c in chunks],
                               "ids": None if ids is None else ids.clone()})
            return chunks, ids

        def logged_all_logits(chunks, ids=None):
            flat = all_logits(chunks, ids)
            self.steps[-1]["logits"] = flat.clone()
            return flat

        def logged_choose(chunks):
            name = choose(chunks)
            self.steps[-1]["path"] = name
            return name

        worker._verify_inputs = verify_inputs
        paths.all_logits = logged_all_logits
        paths.choose = logged_choose

    def check(self, model) -> tuple[list[dict], float]:
        """Each step's rows against transformers: the bad steps (first 6) and the largest error."""
        bad, worst = [], 0.0
        for number, step in enumerate(self.steps):
            ids = step["ids"].cpu().tolist() if step["ids"] is not None else None
            logits, row, first = step["logits"].float().cpu(), 0, 0
            rows_bad, step_worst = [], 0.0
            for c, ((tokens, start), seq) in enumerate(zip(step["chunks"], step["tokens"])):
                n = len(tokens)
                chunk = ids[first : first + n] if ids is not None else tokens
                first += n
                with torch.no_grad():
                    ref = model(torch.tensor([seq[:start] + chunk])).logits[0, start : start + n].float()
                err = (logits[row : row + n] - ref).abs().amax(dim=-1)
                step_worst = max(step_worst, float(err.max()))
                rows_bad += [(c, j, start, round(float(e), 5)) for j, e in enumerate(err) if e > THRESHOLD]
                row += n
            worst = max(worst, step_worst)
            if rows_bad and len(bad) < 6:
                bad.append({"step": number, "path": step["path"], "tokens": row, "seqs": len(step["chunks"]),
                            "path_before": self.steps[number - 1]["path"] if number else None,
                            "max_error": round(step_worst, 5), "rows": rows_bad[:8],
                            "seq_ids": [step["seq_ids"][r[0]] for r in rows_bad[:8]]})
        return bad, worst


def first_divergence(outs, ref):
    for i, (a, b) in enumerate(zip(outs, ref)):
        for j, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
            if x != y:
                return {"seq": i, "index": j, "got": x, "want": y}
    return None


def run_variant(case: str, variant: str, inputs, ref, device: str) -> dict:
    from collections import Counter

    import test_tensor_parallel as T
    from transformers import AutoModelForCausalLM

    from engine import LLM

    path, spec, ps, params = inputs
    tp = int(variant[2])
    eager, nopdl = "_eager" in variant, "_nopdl" in variant
    mode = variant[4:].replace("_eager", "").replace("_nopdl", "")
    kw = dict(T.ENGINE, device=device, **({"num_kv_blocks": 256} if device == "cuda" else {}))
    llm = LLM(path, tensor_parallel_size=tp, speculative_config=spec, enforce_eager=eager, pdl=not nopdl, **kw)
    try:
        paths = llm.engine.runner.verify_paths
        table, ragged = dict(paths.path), dict(paths.ragged)
        if mode != "timed":
            force(paths, mode)
        recorder = VerifyRecorder(llm.engine)
        outs = llm.generate(ps, params)
    finally:
        llm.close()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    bad, worst = recorder.check(model)
    result = {"case": case, "variant": variant, "tokens_equal": [o.token_ids for o in outs] == [o.token_ids for o in ref],
              "first_divergence": first_divergence(outs, ref),
              "paths": dict(Counter(s["path"] for s in recorder.steps)),
              "table": {str(k): v for k, v in sorted(table.items())}, "ragged": {str(k): v for k, v in ragged.items()},
              "verify_steps": len(recorder.steps), "bad_steps": bad, "max_error": worst}
    del llm, recorder
    gc.collect()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", nargs="+", default=["ngram", "draft_model"], choices=["ngram", "draft_model"])
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import test_tensor_parallel as T

    from engine import LLM

    root = Path(tempfile.mkdtemp())
    for case in args.case:
        inputs = case_inputs(case, root)
        path, _, ps, params = inputs
        kw = dict(T.ENGINE, device=args.device, **({"num_kv_blocks": 256} if args.device == "cuda" else {}))
        llm = LLM(path, **kw)
        try:
            ref = llm.generate(ps, params)
        finally:
            llm.close()
        del llm
        for variant in args.variants:
            try:
                line = run_variant(case, variant, inputs, ref, args.device)
            except Exception as e:  # one variant's failure must not lose the others
                line = {"case": case, "variant": variant, "error": f"{type(e).__name__}: {e}"}
            text = json.dumps(line)
            print(text, flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(text + "\n")


if __name__ == "__main__":
    main()

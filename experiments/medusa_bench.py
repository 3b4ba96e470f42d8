"""Issue 14: Medusa heads (`distill=medusa`, common/medusa.py) trained on the teacher's own samples, and what
a greedy verify of them would accept, from the stage's validation on held-out teacher samples.

    python experiments/medusa_bench.py --teacher TEACHER.gguf|HF_DIR|ARTIFACT --data-dir ../shared/data \
        --out outputs/medusa_bench --device cuda [--tokens 4000000] [--losses tvd,forward_kl] [--json results.jsonl]
    python experiments/medusa_bench.py --teacher TINY --data-dir ../shared/data --out DIR --smoke

1. the teacher is imported once (`stage=import`) unless it is already an artifact;
2. for each loss (`--losses`: tvd, the preset's; forward_kl, `distill/losses=forward_kl`), `python -m shrink
   stage=distill distill=medusa` trains `--num-heads` heads of `--num-layers` blocks for `--tokens` tokens on
   the teacher's samples, the drafter bench's (experiments/drafter_bench.py: half corpus continuations, half
   GSM8K train answers, generated once with the engine at temperature 1 and cached by lineage, so both
   benches and both losses train on the same text), a seeded 5% of them held out;
3. one JSON line per run (`medusa_train`): per head, top-1 agreement with the teacher's argmax at its
   position, and the mean accepted length of a greedy verify at k = 1..num_heads (the target's token plus
   the leading heads that agree), untrained (`init_*`: zero heads are the LM head, predicting token t + 1)
   and trained, with the step's throughput. On sampled text the teacher's argmax at t + 1 + i is
   conditioned on the sampled tokens between, not on greedy ones: the engine's own acceptance counters
   (`LLM(teacher, speculative_config={"method": "medusa", ...})`, engine/spec_decode/medusa.py) are the
   real measure, and the speed-up needs the heads' cost per round measured in the engine.

Estimated GPU time (one H200, not yet run), from BENCHMARKS.md's measured step costs: the 4-layer TVD drafter
trained at 141k tok/s (issue 14, 6 M tokens), the 15-layer KD step at 141k tok/s against 190k for CE without
the teacher (so the 30-layer teacher forward plus one LM head and the loss cost ~1.8 us per token). A Medusa
step keeps that teacher forward and drops the student; per head it adds two LM-head GEMMs of 576 x 49,152
(the head's, the teacher's at t + 1 + i) and the gradient one, with the fp32 loss over each chunk: ~1-1.5 us
per token and head, so ~5-8 us per token at 4 heads, ~120-200k tok/s; at the default 4 M tokens ~20-35 s of
steps, ~30 s of compile, the teacher samples (4,096 x 256 tokens, ~20-30 s, or none when the drafter bench's
are cached) and ~30 s of start-up: about 2 minutes per loss, 4-5 minutes with `--losses tvd,forward_kl`.
`engine_session.sh medusa` gives it 420 s (MEDUSA_S).

CPU-scale only (one core, OMP_NUM_THREADS=1, 2026-11-30), the real SmolLM2-135M-Instruct teacher, the
preset with these overrides (teacher samples of 96 tokens after 32-token corpus prefixes, no instruction
answers; validation on 16 held-out blocks of 128 = 1,968 positions):

    python -m shrink stage=distill distill=medusa input=RUN/teacher run=R device=cpu data_dir=../shared/data \
        data.max_docs=200 data.block_size=128 distill.batch_size=4 distill.tokens=65536 distill.warmup_steps=4 \
        distill.lr=3e-3 distill.val_batches=4 distill.chunk_size=256 data.teacher_generated.num_samples=256 \
        data.teacher_generated.max_tokens=96 distill.medusa.val_fraction=0.1

    heads (4 x 1 block)   agreement per head          mean accepted length k=1..4    val TVD
    untrained             0.083 0.074 0.056 0.057     1.083 1.098 1.103 1.104        0.861
    128 steps, 65k tok    0.177 0.117 0.084 0.083     1.177 1.206 1.217 1.218        0.811

(32 steps of 8 x 128 at the preset's lr 1e-3 on 64 samples: head 0 0.080 -> 0.118, k=4 1.098 -> 1.139.)
Head 0 doubles its agreement in 65k tokens and every head rises, still far from trained (the validation
TVD falls slowly; ~52 tok/s); the preset's 4 M tokens on the GPU decide what the heads reach.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

from drafter_bench import log, shrink_cli, teacher_artifact, teacher_data_overrides  # noqa: E402
from spec_bench import emit  # noqa: E402

LOSS_SETS = {"tvd": "tvd", "forward_kl": "forward_kl"}  # --losses -> conf/distill/losses option
T0 = time.time()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="a .gguf file, an HF model directory or a shrink artifact")
    p.add_argument("--data-dir", required=True, help="shared data laid out as ../shared/data")
    p.add_argument("--out", required=True, help="run directories of the heads (created)")
    p.add_argument("--cache-dir", default=None, help="teacher samples and tokenized data (default ~/.cache/shrink)")
    p.add_argument("--device", default="cuda", help="cuda | cpu")
    p.add_argument("--tokens", type=int, default=None, help="training tokens per run (default 4M; smoke 1024)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 16; smoke 2)")
    p.add_argument("--block-size", type=int, default=None, help="default 512 (smoke 32)")
    p.add_argument("--num-samples", type=int, default=None, help="teacher samples (default 4096; smoke 12)")
    p.add_argument("--sample-tokens", type=int, default=None, help="tokens per teacher sample (default 256; smoke 24)")
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--losses", default="tvd", help=f"comma-separated, of {sorted(LOSS_SETS)}")
    p.add_argument("--smoke", action="store_true", help="tiny settings: a CPU run in seconds")
    p.add_argument("--json", default=None, help="append every result line to this file")
    p.add_argument("overrides", nargs="*", help="more Hydra overrides for every distill run (key=value)")
    args = p.parse_args(argv)
    defaults = {"tokens": (4_000_000, 1024), "batch_size": (16, 2), "block_size": (512, 32),
                "num_samples": (4096, 12), "sample_tokens": (256, 24)}
    for key, (full, small) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if args.smoke else full)
    args.losses = [x for x in args.losses.split(",") if x]
    unknown = [x for x in args.losses if x not in LOSS_SETS]
    if unknown or not args.losses:
        p.error(f"--losses: {unknown or 'none'} not in {sorted(LOSS_SETS)}")
    return args


def medusa_overrides(args, teacher: Path, run: Path, loss: str) -> list[str]:
    over = teacher_data_overrides(args, teacher, run, "medusa") + [
        f"distill/losses={LOSS_SETS[loss]}", f"distill.medusa.num_heads={args.num_heads}",
        f"distill.medusa.num_layers={args.num_layers}"]
    if args.smoke:  # a quarter of 12 samples held out: enough to fill one validation block
        over.append("distill.medusa.val_fraction=0.25")
    return over + list(args.overrides)


def train_heads(args, teacher: Path, loss: str) -> dict:
    """One `distill=medusa` run; its `medusa_train` row."""
    run = Path(args.out) / f"medusa_{loss}"
    log(f"training Medusa heads ({loss}) in {run}")
    started = time.time()
    shrink_cli(*medusa_overrides(args, teacher, run, loss))
    process_s = time.time() - started
    info = json.loads((run / "distill" / "shrink.json").read_text())
    m = info["metrics"]
    keys = ("head_agreement", "mean_accepted_length", "init_head_agreement", "init_mean_accepted_length",
            "val_loss", "init_val_loss", "val_positions", "num_heads", "num_layers", "params", "train_tokens",
            "tokens_per_s", "steady_tokens_per_s", "first_step_s", "final_loss", "val_source", "data_source",
            "teacher_data")
    row = {"bench": "medusa_train", "loss": loss, "path": str(run / "distill"), **{k: m.get(k) for k in keys},
           "stage_wall_s": info.get("wall_time_s"), "process_s": process_s}
    emit(row, args.json)
    return row


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    teacher = teacher_artifact(args)
    log(f"teacher: {teacher}")
    rows = [train_heads(args, teacher, loss) for loss in args.losses]
    emit({"bench": "medusa_bench_total", "wall_s": time.time() - T0, "tokens": args.tokens, "device": args.device,
          "runs": len(rows)}, args.json)


if __name__ == "__main__":
    main()

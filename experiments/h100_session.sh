#!/usr/bin/env bash
# The batched GPU session whose numbers are in BENCHMARKS.md (device tool; 64 MiB per call, so the
# teacher GGUF and the data travel in parts). Usage, one call each, back to back on a warm machine:
#   experiments/h100_session.sh part1|part2   # carry .gpu/t3/p0X + data/wheels; stash them in $HOME
#   experiments/h100_session.sh teacher       # join the GGUF, import the teacher, its perplexity, distill experiments
#   experiments/h100_session.sh prune_quant | gqa
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$HOME/site:$PWD" HF_HUB_OFFLINE=1 WANDB_MODE=disabled
H=$HOME; D=$H/data; RUN=$H/run; OUTDIR=${OUT:-$H/out}
case "${1:?part}" in
  part1)
    mkdir -p "$H/t" "$D"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$H/site" .gpu/wheels/*.whl
    cp .gpu/t3/p00 "$H/t/"; cp -r .gpu/data1/* "$D/"; ls -la "$H/t" "$D";;
  part2)
    cp .gpu/t3/p01 "$H/t/"; cp -r .gpu/data2/* "$D/"; ls -la "$H/t" "$D";;
  teacher)
    cp .gpu/t3/p02 "$H/t/" && cat "$H/t"/p0? > "$H/t/SmolLM2-135M-Instruct.Q4_1.gguf" && sha256sum "$H/t/SmolLM2-135M-Instruct.Q4_1.gguf"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python3 -m shrink stage=import teacher=custom teacher.source="$H/t/SmolLM2-135M-Instruct.Q4_1.gguf" \
      teacher.dtype=fp32 run="$RUN" cache_dir="$H/cache" logging=none device=cuda || exit 1
    python3 -m shrink stage=eval run="$RUN" data_dir="$D" cache_dir="$H/cache" device=cuda logging=none \
      'eval.datasets=[wikitext2]' eval.context=2048 eval.stride=512 eval.dtype=fp32 | tee "$OUTDIR/teacher_ppl.txt"
    cp "$RUN/eval/report.md" "$OUTDIR/teacher_report.md"
    timeout "${DISTILL_TIMEOUT:-400}" python3 experiments/distill.py --teacher "$RUN/teacher" --data-dir "$D" \
      --out "$OUTDIR/distill" --tokens "${DISTILL_TOKENS:-3000000}" --save-student "$H/student15";;
  prune_quant)
    timeout "${PQ_TIMEOUT:-560}" python3 experiments/prune_quant.py --model "$RUN/teacher" "$H/student15" \
      --data-dir "$D" --out "$OUTDIR/prune_quant" --ft-steps "${FT_STEPS:-100}" --tf32 \
      --group-size "${PQ_GROUP:-64}" ${PQ_VARIANTS:+--variants "$PQ_VARIANTS"};;
  gqa)
    timeout "${GQA_TIMEOUT:-560}" python3 experiments/gqa.py --model "$RUN/teacher" "$H/student15" --data-dir "$D" \
      --out "$OUTDIR/gqa" --tokens "${GQA_TOKENS:-1500000}";;
esac

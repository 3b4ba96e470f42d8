#!/usr/bin/env bash
# The batched GPU session whose numbers are in BENCHMARKS.md (device tool; 64 MiB per call, so the
# teacher GGUF and the data travel in parts). Usage, one call each, back to back on a warm machine:
#   experiments/h100_session.sh part1|part2   # carry .gpu/t3/p0X + data/wheels; stash them in $HOME
#   experiments/h100_session.sh teacher       # join the GGUF, import the teacher, its perplexity, distill experiments
#   experiments/h100_session.sh prune_quant | gqa
# or, for the 20M-token distillation and prune/quantize of the teacher and the student in one lease:
#   experiments/h100_session.sh part1; ... part2; ... launch   # import the teacher, start `pipeline` detached
#   experiments/h100_session.sh wait                             # repeat until it prints DONE; packs $OUT/res.tgz
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$HOME/site:$PWD" HF_HUB_OFFLINE=1 WANDB_MODE=disabled
H=$HOME; D=$H/data; RUN=$H/run; OUTDIR=${OUT:-$H/out}

import_teacher() {  # join the GGUF's last part to the stashed ones; the fp32 teacher artifact in $RUN
  cp .gpu/t3/p02 "$H/t/" && cat "$H/t"/p0? > "$H/t/SmolLM2-135M-Instruct.Q4_1.gguf" && sha256sum "$H/t/SmolLM2-135M-Instruct.Q4_1.gguf"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -m shrink stage=import teacher=custom teacher.source="$H/t/SmolLM2-135M-Instruct.Q4_1.gguf" \
    teacher.dtype=fp32 run="$RUN" cache_dir="$H/cache" logging=none device=cuda || exit 1
}

case "${1:?part}" in
  part1)
    mkdir -p "$H/t" "$D"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$H/site" .gpu/wheels/*.whl
    cp .gpu/t3/p00 "$H/t/"; cp -r .gpu/data1/* "$D/"; ls -la "$H/t" "$D";;
  part2)
    cp .gpu/t3/p01 "$H/t/"; cp -r .gpu/data2/* "$D/"; ls -la "$H/t" "$D";;
  teacher)
    import_teacher
    python3 -m shrink stage=eval run="$RUN" data_dir="$D" cache_dir="$H/cache" device=cuda logging=none \
      'eval.datasets=[wikitext2]' eval.context=2048 eval.stride=512 eval.dtype=fp32 | tee "$OUTDIR/teacher_ppl.txt"
    cp "$RUN/eval/report.md" "$OUTDIR/teacher_report.md"
    timeout "${DISTILL_TIMEOUT:-400}" python3 experiments/distill.py --teacher "$RUN/teacher" --data-dir "$D" \
      --out "$OUTDIR/distill" --tokens "${DISTILL_TOKENS:-3000000}" --save-student "$H/student15";;
  prune_quant)
    timeout "${PQ_TIMEOUT:-560}" python3 experiments/prune_quant.py --model "$RUN/teacher" "$H/student15" \
      --data-dir "$D" --out "$OUTDIR/prune_quant" --ft-steps "${FT_STEPS:-100}" --tf32 \
      --group-size "${PQ_GROUP:-64}" ${PQ_VARIANTS:+--variants "$PQ_VARIANTS"};;
  launch)
    import_teacher
    cp -r . "$H/repo"  # the detached pipeline outlives this call's working tree
    # Detached, and with every inherited descriptor above 2 closed: a daemon holding the device
    # tool's output pipe made this call wait out its whole time limit (2026-11-26).
    (cd "$H/repo" && setsid nohup bash -c 'for fd in /proc/$$/fd/*; do n=${fd##*/}; [ "$n" -gt 2 ] && eval "exec $n>&-"; done
      exec bash experiments/h100_session.sh pipeline' > "$H/pipeline.log" 2>&1 < /dev/null &)
    sleep 5; cat "$H/pipeline.log";;
  pipeline)  # detached: speed bench alone, then KD runs with the prune/quantize runs beside them
    R=$H/res; L=$R/logs; mkdir -p "$L"
    PQ="python3 experiments/prune_quant.py --data-dir $D --ft-steps ${FT_STEPS:-60} --tf32 --group-size ${PQ_GROUP:-64} ${PQ_ARGS:-}"
    python3 experiments/distill.py --teacher "$RUN/teacher" --data-dir "$D" --out "$R/distill_speed" --tokens 1 \
      --parts speed ${DISTILL_ARGS:-} > "$L/speed.log" 2>&1
    $PQ --model "$RUN/teacher" --out "$R/pq_teacher" --variants "${PQ_TEACHER_VARIANTS:-dense,int4_g64_rtn,int4_g64_gptq,int4_g64_awq,sparsegpt_2:4,sparsegpt_2:4+int4_g64_gptq}" > "$L/pq_teacher.log" 2>&1 &
    python3 experiments/distill.py --teacher "$RUN/teacher" --data-dir "$D" --out "$R/distill" --parts importance,kd \
      --runs "${DISTILL_RUNS:-fkl_layers,fkl,jsd,ce}" --tokens "${DISTILL_TOKENS:-20000000}" --save-student "$H/student15" \
      ${DISTILL_ARGS:-} > "$L/distill.log" 2>&1 &
    DPID=$!
    # The first run's student (saved atomically) is compressed while the other runs train.
    while kill -0 $DPID 2>/dev/null && [ ! -f "$H/student15/shrink.json" ]; do sleep 10; done
    if [ -f "$H/student15/shrink.json" ]; then
      mkdir -p "$H/pq_models" && cp -r "$H/student15" "$H/pq_models/student15"
      $PQ --model "$H/pq_models/student15" --out "$R/pq_student" > "$L/pq_student.log" 2>&1
    fi
    wait; echo DONE > "$R/DONE";;
  wait)  # keeps the lease busy while the pipeline runs; packs what exists so far
    end=$((SECONDS + ${WAIT_S:-540}))
    while [ $SECONDS -lt $end ] && [ ! -f "$H/res/DONE" ]; do sleep 10; done
    for f in "$H"/res/logs/*.log; do echo "== $f"; grep -v -E "it/s\]|s/it\]" "$f" | tail -n 6; done
    (cd "$H/res" && find . -maxdepth 2 \( -name '*.json' -o -name '*.md' -o -name '*.log' -o -name '*.jsonl' -o -name DONE \) | tar czf "$OUTDIR/res.tgz" -T -)
    ls -la "$OUTDIR"; [ -f "$H/res/DONE" ] && echo PIPELINE DONE;;
  gqa)
    timeout "${GQA_TIMEOUT:-560}" python3 experiments/gqa.py --model "$RUN/teacher" "$H/student15" --data-dir "$D" \
      --out "$OUTDIR/gqa" --tokens "${GQA_TOKENS:-1500000}";;
esac

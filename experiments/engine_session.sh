#!/usr/bin/env bash
# Engine measurements on the GPU (device tool), one verb per call, back to back on a warm machine:
#   experiments/engine_session.sh speed        # carry .gpu/wheels: kernels on/off, decode profile, 7B roofline
#   experiments/engine_session.sh tests        # the GPU tests of kernels/ and engine/
#   experiments/engine_session.sh part1        # carry .gpu/wheels + .gpu/t3/p00: stash the GGUF's first part
#   experiments/engine_session.sh real         # carry .gpu/t3/p01 + p02: the real SmolLM2 decode and agreement
#   experiments/engine_session.sh compare      # carry .gpu/wheels + .gpu/old: decode, profile, throughput, host before/after
#   experiments/engine_session.sh quant        # carry .gpu/wheels (+ .gpu/t/p00 .gpu/data to stash them): GEMV sweep, quant bench
#   experiments/engine_session.sh smol         # right after, carry .gpu/t/p01 p02 .gpu/corpus: n-gram speed,
#                                              # drafters (TVD vs CE), WikiText-2 rows (issue 11)
#   experiments/engine_session.sh wikitext     # after `quant`, carry .gpu/t/p01 p02 .gpu/corpus: issue 11's rows on the
#                                              # reference protocol (KD vs CE students, AWQ), the student as drafter
#   experiments/engine_session.sh stash        # carry .gpu/wheels + .gpu/t/p00 (+ .gpu/data, or with stash2): stash them
#   experiments/engine_session.sh stash2       # carry .gpu/t/p01 p02: the GGUF whole (then carry .gpu/corpus to
#                                              # `pipeline` or `balanced`: all three exceed one call's 64 MiB)
#   experiments/engine_session.sh pipeline     # after `quant` or `stash`, carry .gpu/t/p01 p02 .gpu/corpus: the default pipeline
#   experiments/engine_session.sh evalref      # right after `pipeline`: its eval=gpu reference run (issue 15)
#   experiments/engine_session.sh drafter      # after `stash`, carry .gpu/t/p01 p02: drafters TVD vs CE, 2:4 rows, sampler test
#   experiments/engine_session.sh spec8        # after `stash`, carry .gpu/t/p01 p02 .gpu/vocab: batch invariance, auto k, draft vocab
#   experiments/engine_session.sh medusa       # after `stash` (+ `stash2`, or carry .gpu/t/p01 p02): Medusa heads at a real
#                                              # budget, per-head agreement and mean accepted length (issue 14)
#   experiments/engine_session.sh kernels      # carry .gpu/wheels: GPU tests of the multi-query verify, 2:4 and
#                                              # tinygemm paths; verify cost; the 2:4 quant rows
#   experiments/engine_session.sh tp           # nvidia-h200-x2, carry .gpu/wheels: GPU links, the two-GPU tests,
#                                              # tp_bench (7B TP=1/2 at batch 1/64, 70B TP=2, collectives) (issue 17)
#   experiments/engine_session.sh balanced     # after `stash`, carry .gpu/t/p01 p02 .gpu/corpus: experiment=balanced on
#                                              # GPU 1 in its own session (setsid: it outlives the call); then `pipeline`
#                                              # and `bidiag` on GPU 0 (CUDA_VISIBLE_DEVICES=0), `evalref`, `balwait`
#   experiments/engine_session.sh recheck      # after `stash` + `stash2`: the ninth session's fixes' GPU tests, the distill
#                                              # step's cost (its host waits 9 -> 1: now / old syncs / 4096 chunks), bidiag
#   experiments/engine_session.sh bidiag       # after `pipeline`: where batch-invariant mode departs (issue 14)
#   experiments/engine_session.sh long         # after stash + stash2 (+ corpus, .gpu/dss): step-by-step x 3 seeds, then the GQA
#                                              # budget curve, on GPU 1 in their own session; `longwait` collects
#   experiments/engine_session.sh balwait      # waits for `balanced` (BAL_WAIT_S) and copies its report
#   experiments/engine_session.sh rounds       # after stash + stash2 (+ pipeline): num_rounds and the auto policy (issue 14)
#   experiments/engine_session.sh int8         # carry .gpu/wheels + .gpu/old (48fd6ad): int8 GEMV old vs new, 7B rows (issue 13)
#   experiments/engine_session.sh sp24         # carry .gpu/wheels: the 2:4 + int4 paths (sparse24_mma among them) at M 1..16,
#                                              # sweep, tests, 7B rows (issue 13)
#   experiments/engine_session.sh mma          # carry .gpu/wheels: the tensor-core int4 GEMM's tests and sweep (issue 13)
#   experiments/engine_session.sh presets      # after stash + stash2: experiment=lossless, balanced (PRESETS) in full, eval=gpu
#   experiments/engine_session.sh scaling      # nvidia-h200-x2, right after `tp`: distill step tokens/s and peak
#                                              # memory at 1 and 2 GPUs, DDP and FSDP2, with loss curves (issue 17)
#   experiments/engine_session.sh int4         # carry .gpu/wheels: the int4 GEMV sweep (M = 1 fast path, exact at M = 2
#                                              # and 16) and the 7B decode with int4_kernel triton / tinygemm (issue 13)
#   experiments/engine_session.sh w8a8         # carry .gpu/wheels: W8A8's GPU tests, the per-linear prefill pieces with
#                                              # the int8_mm config sweep (issue 13)
#   experiments/engine_session.sh w8a8bench    # right after: 7B prefill tok/s bf16 / int8 / fp8 at 1024, 4080, 8192
#                                              # tokens and nano-vllm's prompts (issue 13)
#   experiments/engine_session.sh profile      # after stash + stash2 (+ .gpu/heads): a speculative round's time, host
#                                              # against GPU, at batch 1 on the real teacher (issue 14)
#   experiments/engine_session.sh fusedrows    # carry .gpu/wheels: decode with the fused rows pinned at 16 and timed,
#                                              # 7B and 135M shapes, then the GPU tests (issue 13)
#   experiments/engine_session.sh s15          # after stash + stash2: the fourteenth session's untimed work (GPU
#                                              # tests, n-gram rounds against one round and plain, a round's profile)
#   experiments/engine_session.sh grounded     # after stash + stash2: n-gram on the grounded workload ending at EOS
#   experiments/engine_session.sh autorounds   # after stash + stash2: n-gram auto + rounds beside fixed-k rounds and
#                                              # one-round auto, against plain (issue 14), and the rounds' GPU tests
#   experiments/engine_session.sh kd100        # after stash + stash2 (+ .gpu/corpus): the 15-layer student after
#                                              # 100M tokens, forward KL then CE (issue 16's student goal);
#                                              # TEACHER_GEN=N: both on the corpus mixed with N teacher samples
#   experiments/engine_session.sh rowsweep     # carry .gpu/wheels: the fused kernels at 2-16 rows, norm prologue
#                                              # against a separate norm launch and cuBLAS (issue 13's batch 2-16)
#   experiments/engine_session.sh tgenwait     # in a chain: waits for another chain's cached teacher samples (kd100)
#   experiments/engine_session.sh gqatg        # after tgenwait: the GQA budget curve on the corpus + teacher samples
#   experiments/engine_session.sh dvw          # after stash + stash2 (+ corpus): depth vs width at equal parameters
#   experiments/engine_session.sh q24          # carry .gpu/wheels: bf16, int8, int4, 2:4 + int4 7B decode at b1 / b16
#   experiments/engine_session.sh s17          # carry .gpu/wheels: 7B verify cost, int8 / int4 b1 profiles, 2:4 + int4 tiles
#   experiments/engine_session.sh int4bound    # carry .gpu/wheels: what binds int4's M == 1 GEMV, the load ladder
#                                              # (experiments/int4_bound.py; <= 120 s, issue 13)
#   experiments/engine_session.sh weightform   # carry .gpu/wheels: compressed_weights' GPU tests; int8 / int4 served as
#                                              # codes or "auto" at the SmolLM2-135M and Llama-2-7B shapes (issue 13/16)
#   experiments/engine_session.sh int4run      # carry .gpu/wheels: int4's 8-word runs, GPU tests and the 7B decode
#   experiments/engine_session.sh mqa          # carry .gpu/wheels: SmolLM2's shape with 3 KV heads against 1, decode and
#                                              # kernel profiles (the 3 -> 1 model decoded 20% slower, issue 16)
#   experiments/engine_session.sh bg NAME V..  # the verbs V.. in their own process session (they outlive the call);
#                                              # `collect` (COLLECT_S) waits for every chain and fetches $H/bg
set -uo pipefail
H=$HOME; OUTDIR=${OUT:-$H/out}; mkdir -p "$OUTDIR"
# once per machine: chains in the background import from $H/site while later calls start
# (.gpu/ct: compressed-tensors and loguru, `pip download --no-deps`: transformers loads a quantized artifact
# through it, the quality gate and eval of the quantize stage; the GPU host's image lacks it)
[ -f "$H/site/.installed" ] || { python3 -m pip install -q --no-index --no-deps --no-compile --target "$H/site" \
  .gpu/wheels/*.whl $(ls .gpu/ct/*.whl 2>/dev/null) 2>/dev/null && touch "$H/site/.installed"; }
export PYTHONUNBUFFERED=1 PYTHONPATH="$H/site:$PWD" HF_HUB_OFFLINE=1 WANDB_MODE=disabled
B="python3 -m eval.bench --json $OUTDIR/bench.jsonl"
SMOL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  # SmolLM2-135M-Instruct.Q4_1.gguf
assemble_data() {  # .gpu/data from whichever call carried it (the tree, wheels and part 1 near 64 MiB leave it out)
  [ -d .gpu/data ] && mkdir -p "$H/data" && cp -r .gpu/data/. "$H/data/" && ls "$H/data"
}
assemble() {  # the GGUF from its parts (the first stashed by `stash`, the others carried now or by `stash2`)
              # and the corpus, each once, from whichever call carried it
  # (the parts: `split -b 25m -d -a 2` of the wheel's GGUF, as many as a call's 64 MiB beside the tree allows; the
  # GGUF is whole when their concatenation has its sha256)
  mkdir -p "$H/t" "$H/data/corpus"; assemble_data > /dev/null
  for p in .gpu/t/p0?; do [ -f "$p" ] && cp "$p" "$H/t/"; done
  [ -f "$H/t/smol.gguf" ] || { [ "$(cat "$H/t"/p0? 2>/dev/null | sha256sum | cut -c1-64)" = "$SMOL_SHA256" ] \
    && cat "$H/t"/p0? > "$H/t/smol.gguf" && sha256sum "$H/t/smol.gguf"; }
  [ -f .gpu/corpus/docs-en.jsonl.gz ] && cp .gpu/corpus/docs-en.jsonl.gz "$H/data/corpus/"
  [ -f .gpu/dss/cqa_train.json.gz ] && mkdir -p "$H/data/reasoning/cqa" \
    && gunzip -c .gpu/dss/cqa_train.json.gz > "$H/data/reasoning/cqa/cqa_train.json"  # Step-by-Step's train split
  [ -f .gpu/dss/cqa_llm.tgz ] && tar -xzf .gpu/dss/cqa_llm.tgz -C "$H/data/reasoning/cqa"  # and its PaLM rationales (llm/)
  [ -f "$H/t/smol.gguf" ] || echo "assemble: the GGUF's parts are not all here (stash, then stash2)"
}
case "${1:?verb}" in
  speed)
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
    $B profile --shape smollm2-135m --batch ${BATCHES:-1 16} --top 12
    $B profile --shape smollm2-135m --batch 1 --top 0 --engine pdl=false
    $B profile --shape smollm2-135m --batch 1 --top 0 --engine num_decode_steps=16
    $B decode --shape llama2-7b --batch 1 --roofline
    $B decode --shape llama2-7b --batch 1 --engine pdl=false;;
  diag)  # carry .gpu/wheels + .gpu/old (an exported older engine, for a baseline in the same lease;
         # trees before the eval/bench/ split name the entry point eval.engine_bench)
    (cd .gpu/old && PYTHONPATH="$H/site:$PWD" python3 -m eval.engine_bench decode --shape llama2-7b --batch 1)
    $B profile --shape llama2-7b --batch 1 --top 14
    $B profile --shape llama2-7b --batch 1 --top 14 --engine pdl=false
    python3 experiments/prefill_host.py --shape smollm2-135m --top 25;;
  compare)  # carry .gpu/wheels + .gpu/old (git archive of the tree before a change): the same runs before and after, in one lease
    for tree in .gpu/old .; do
      if [ -d "$tree/eval/bench" ]; then entry=eval.bench; else entry=eval.engine_bench; fi
      echo "== $tree ($entry)"
      (cd "$tree" && export PYTHONPATH="$H/site:$PWD" && C="python3 -m $entry --json $OUTDIR/compare.jsonl" &&
        $C profile --shape smollm2-135m --batch 1 16 --top 0 && $C decode --shape llama2-7b --batch 1 &&
        $C throughput --shape tinyllama && $C host --batch 1 8 64 --steps 512)
    done;;
  sweep)
    for m in ${SWEEP_MODELS:-llama2-7b}; do python3 experiments/gemv_sweep.py --model $m; done;;
  tests)
    timeout -s INT -k 30 "${TESTS_TIMEOUT:-560}" python3 -m pytest -q -p no:cacheprovider -m gpu -x ${TESTS:-tests/kernels tests/engine} 2>&1 | tail -n 30;;
  part1)
    mkdir -p "$H/t" && cp .gpu/t3/p00 "$H/t/" && ls -la "$H/t";;
  quant)  # stashes the GGUF's first part and the data when carried, for `smol` next
    mkdir -p "$H/t" "$H/data"; [ -f .gpu/t/p00 ] && cp .gpu/t/p00 "$H/t/"; [ -d .gpu/data ] && cp -r .gpu/data/. "$H/data/"
    timeout "${SWEEP_S:-250}" python3 experiments/quant_gemv_sweep.py --json "$OUTDIR/quant_sweep.jsonl" --budget-s 150 | tail -n 6
    timeout "${QUANT_S:-230}" python3 -m eval.bench.quant --shape llama2-7b --out "$OUTDIR/quant_bench.jsonl" | tail -n 12
    python3 experiments/spec_bench.py --json "$OUTDIR/verify_cost.jsonl" verify-cost --shape llama2-7b --context 512 2048;;
  smol)
    cp .gpu/t/p01 .gpu/t/p02 "$H/t/" && cat "$H/t"/p0? > "$H/t/smol.gguf" && sha256sum "$H/t/smol.gguf"
    mkdir -p "$H/data/corpus" && cp .gpu/corpus/docs-en.jsonl.gz "$H/data/corpus/"
    G="$H/t/smol.gguf"; D="$H/data"
    $B convert-gguf --gguf "$G" --out "$H/smol"
    timeout "${SPEC_S:-100}" python3 experiments/spec_bench.py --json "$OUTDIR/spec_speed.jsonl" speed --target "$G" \
      --data-dir "$D" --workloads wikitext gsm8k --batch 1 4 16 --ks 4 6 --engine '{"max_model_len": 2048}' | tail -n 8
    timeout "${DRAFTER_S:-300}" python3 experiments/drafter_bench.py --teacher "$G" --data-dir "$D" --out "$H/drafters" \
      --cache-dir "$H/cache" --json "$OUTDIR/drafter.jsonl" ${DRAFTER_ARGS:-} | tail -n 8
    timeout "${PQ_S:-200}" python3 experiments/prune_quant.py --model "$H/smol" --data-dir "$D" --out "$OUTDIR/prune_quant" \
      --tf32 --group-size 64 --ft-steps 60 --variants dense,int4_g64_awq,int4_g64_gptq | tail -n 8;;
  stash2)  # carry the GGUF's other parts, one or two a call (with the tree, parts and corpus exceed one call's 64 MiB)
    assemble; ls "$H/t";;
  stash)  # and the copy and matmul ceilings, the first call's duty
    mkdir -p "$H/t" "$H/data" && cp .gpu/t/p0? "$H/t/" && ls "$H/t"; assemble_data
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader; $B ceilings;;
  kernels)
    timeout -s INT -k 30 ${TESTS_S:-110} python3 -m pytest -q -p no:cacheprovider -m gpu -rf tests/kernels/test_verify_attention.py \
      "tests/engine/spec_decode/test_spec_gpu.py::test_fp32_graphs_greedy_through_each_multi_query_verify_path_matches_transformers" \
      tests/kernels/test_quant_gemv_sparse24.py tests/engine/test_sparse24_paths.py tests/engine/test_int4_tinygemm.py \
      > "$OUTDIR/kernel_tests.txt" 2>&1; tail -n 8 "$OUTDIR/kernel_tests.txt"
    timeout ${VERIFY_S:-110} python3 experiments/spec_bench.py --json "$OUTDIR/verify_cost.jsonl" verify-cost --shape llama2-7b \
      --context 512 2048 > "$OUTDIR/verify_cost.log" 2>&1; tail -n 8 "$OUTDIR/verify_cost.log"
    timeout ${QUANT_S:-150} python3 -m eval.bench.quant --shape llama2-7b --out "$OUTDIR/quant_24.jsonl" --batch 1 16 \
      --only bf16 sparse24 sparse24_int4_g128 --prefill-tokens 1024 4080 > "$OUTDIR/quant_24.log" 2>&1
    grep -v Warn "$OUTDIR/quant_24.log" | tail -n 10;;
  drafter)  # after `stash`, carry .gpu/t/p01 p02: the drafter preset at a real budget (TVD vs CE), the 2:4 rows,
            # the engine sampler's graphed GPU test
    cp .gpu/t/p01 .gpu/t/p02 "$H/t/" && cat "$H/t"/p0? > "$H/t/smol.gguf" && sha256sum "$H/t/smol.gguf"
    timeout ${DRAFTER_S:-360} python3 experiments/drafter_bench.py --teacher "$H/t/smol.gguf" --data-dir "$H/data" \
      --out "$H/drafters" --cache-dir "$H/cache" --json "$OUTDIR/drafter.jsonl" ${DRAFTER_ARGS:-} > "$OUTDIR/drafter.log" 2>&1
    grep -v Warn "$OUTDIR/drafter.log" | tail -n 12
    timeout -s INT -k 30 ${TESTS_S:-60} python3 -m pytest -q -p no:cacheprovider -m gpu -rf tests/shrink/test_engine_sampler.py \
      > "$OUTDIR/sampler_tests.txt" 2>&1; tail -n 4 "$OUTDIR/sampler_tests.txt"
    timeout ${QUANT_S:-150} python3 -m eval.bench.quant --shape llama2-7b --out "$OUTDIR/quant_24.jsonl" --batch 1 16 \
      --only bf16 sparse24 sparse24_int4_g128 int4_g128@auto --prefill-tokens 1024 4080 > "$OUTDIR/quant_24.log" 2>&1
    grep -v Warn "$OUTDIR/quant_24.log" | tail -n 10;;
  medusa)  # after `stash` (+ `stash2`, or carry .gpu/t/p01 p02): the Medusa GPU tests (graphs' hidden output,
          # greedy == transformers per verify path), `distill=medusa` heads on the teacher's samples at MEDUSA_ARGS
          # (default: the preset's 4 M tokens, TVD; e.g. "--losses tvd,forward_kl"), their validation (per-head
          # agreement, mean accepted length at k = 1..4) in medusa.jsonl (~2 min per loss: the docstring), again on
          # the teacher's greedy text (MEDUSA_GREEDY=, empty to skip), then the engine's tok/s with each set of TVD
          # heads against the plain engine in the same process (--check), batch 1/4/16
    "$0" mtests; "$0" mtrain; "$0" mspeed;;
  mtests)
    timeout -s INT -k 30 ${TESTS_S:-240} python3 -m pytest -q -p no:cacheprovider -m gpu -rf tests/engine/spec_decode/test_medusa_gpu.py \
      > "$OUTDIR/medusa_tests.txt" 2>&1; tail -n 6 "$OUTDIR/medusa_tests.txt";;
  mtrain)  # heads on sampled text ($H/medusa) and, unless MEDUSA_GREEDY is set empty, on greedy text
           # ($H/medusa_greedy), one after another: side by side, the second engine that generates the
           # teacher's samples found no memory for its KV pool (the fourteenth session)
    assemble
    [ -d "$H/smol" ] || $B convert-gguf --gguf "$H/t/smol.gguf" --out "$H/smol" > /dev/null
    runs="medusa"; [ -n "${MEDUSA_GREEDY-1}" ] && runs="medusa medusa_greedy"
    for r in $runs; do
      t=""; [ $r = medusa_greedy ] && t="data.teacher_generated.temperature=0"
      timeout ${MEDUSA_S:-420} python3 experiments/medusa_bench.py --teacher "$H/t/smol.gguf" --data-dir "$H/data" \
        --out "$H/$r" --cache-dir "$H/cache_$r" --json "$OUTDIR/$r.jsonl" ${MEDUSA_ARGS:-} $t > "$OUTDIR/$r.log" 2>&1
    done
    for r in $runs; do grep -v Warn "$OUTDIR/$r.log" | tail -n 4 | cut -c1-400; done;;
  mspeed)  # the engine's tok/s with each trained set of TVD heads against the plain engine (--check), batch 1/4/16
    M=""; for r in medusa medusa_greedy; do
      [ -f "$H/$r/medusa_tvd/distill/model.safetensors" ] && M="$M $H/$r/medusa_tvd/distill"; done
    [ -n "$M" ] || { echo "mspeed: no trained heads under $H/medusa*"; exit 0; }
    timeout ${SPEC_S:-360} python3 experiments/spec_bench.py --json "$OUTDIR/medusa_speed.jsonl" speed --target "$H/t/smol.gguf" \
      --medusa $M --truncated --data-dir "$H/data" --workloads wikitext gsm8k --batch 1 4 16 \
      --ks 2 3 4 --auto --check --repeats 2 --budget-s ${SPEC_BUDGET_S:-300} --engine '{"max_model_len": 2048}' > "$OUTDIR/medusa_speed.log" 2>&1
    grep -v Warn "$OUTDIR/medusa_speed.log" | tail -n 12 | cut -c1-300;;
  spec8)  # after `stash`, carry .gpu/t/p01 p02 .gpu/vocab: the eighth session's speculative features on the GPU:
          # batch-invariant mode (tests, cost, bf16 speculative == plain on the real teacher), the auto k policy,
          # the draft vocabulary
    cp .gpu/t/p01 .gpu/t/p02 "$H/t/" && cat "$H/t"/p0? > "$H/t/smol.gguf" && sha256sum "$H/t/smol.gguf"
    $B convert-gguf --gguf "$H/t/smol.gguf" --out "$H/smol" > /dev/null
    timeout -s INT -k 30 ${TESTS_S:-120} python3 -m pytest -q -p no:cacheprovider -m gpu -rf tests/engine/spec_decode/test_batch_invariant_gpu.py \
      tests/kernels/test_batch_invariant_gemv.py tests/engine/spec_decode/test_spec_gpu.py tests/engine/spec_decode/test_draft_vocab.py \
      > "$OUTDIR/spec8_tests.txt" 2>&1; tail -n 8 "$OUTDIR/spec8_tests.txt"
    timeout ${BI_S:-60} python3 experiments/batch_invariant_bench.py --model "$H/smol" --batch 1 4 16 --prompts 4 \
      --json "$OUTDIR/batch_invariant.jsonl" > "$OUTDIR/batch_invariant.log" 2>&1; tail -n 4 "$OUTDIR/batch_invariant.log"
    timeout ${SPEC_S:-70} python3 experiments/spec_bench.py --json "$OUTDIR/spec_auto.jsonl" speed --target "$H/t/smol.gguf" \
      --data-dir "$H/data" --workloads wikitext --batch 1 4 16 64 --ks 4 --repeats 2 --budget-s 60 \
      --engine '{"max_model_len": 2048}' > "$OUTDIR/spec_auto.log" 2>&1; tail -n 4 "$OUTDIR/spec_auto.log"
    timeout ${VOCAB_S:-50} python3 experiments/draft_vocab.py --json "$OUTDIR/draft_vocab.jsonl" speed --target "$H/smol" --data-dir "$H/data" \
      --frequencies .gpu/vocab/freq.tsv --sizes 8192 --ks 4 --workloads wikitext --prompts 2 --repeats 2 --budget-s 40 \
      > "$OUTDIR/draft_vocab.log" 2>&1; tail -n 4 "$OUTDIR/draft_vocab.log";;
  sparse24)  # carry .gpu/wheels: the 2:4 rows alone
    timeout ${QUANT_S:-150} python3 -m eval.bench.quant --shape llama2-7b --out "$OUTDIR/quant_24.jsonl" --batch 1 16 \
      --only bf16 sparse24 sparse24_int4_g128 --prefill-tokens 1024 4080 > "$OUTDIR/quant_24.log" 2>&1
    grep -v Warn "$OUTDIR/quant_24.log" | tail -n 10;;
  wikitext)
    cp .gpu/t/p01 .gpu/t/p02 "$H/t/" && cat "$H/t"/p0? > "$H/t/smol.gguf" && sha256sum "$H/t/smol.gguf"
    mkdir -p "$H/data/corpus" && cp .gpu/corpus/docs-en.jsonl.gz "$H/data/corpus/"
    G="$H/t/smol.gguf"; D="$H/data"
    $B convert-gguf --gguf "$G" --out "$H/smol"
    (timeout ${PQ_S:-420} python3 experiments/prune_quant.py --model "$H/smol" --data-dir "$D" --out "$OUTDIR/prune_quant" \
       --tf32 --group-size 64 --variants dense,int4_g64_awq > "$OUTDIR/prune_quant.log" 2>&1) &
    timeout ${KD_S:-430} python3 experiments/distill.py --teacher "$H/smol" --data-dir "$D" --out "$OUTDIR/distill" \
      --parts importance,kd --runs fkl,ce --tokens 20000000 --context 2048 --save-student "$H/student" > "$OUTDIR/distill.log" 2>&1
    wait
    timeout ${SPEC_S:-110} python3 experiments/spec_bench.py --json "$OUTDIR/spec_student.jsonl" speed --target "$G" \
      --draft "$H/student" --data-dir "$D" --workloads wikitext gsm8k --batch 1 4 --ks 2 4 --truncated --repeats 2 \
      --budget-s 90 --engine '{"max_model_len": 2048}' > "$OUTDIR/spec_student.log" 2>&1;;
  pipeline)
    assemble
    timeout ${PIPE_S:-560} python3 -m shrink stage=pipeline 'stage.stages=[import,distill,gqa,prune,quantize]' \
      teacher.source="$H/t/smol.gguf" data_dir="$H/data" cache_dir="$H/cache" logging=none run="$H/ref" \
      > "$OUTDIR/pipeline.log" 2>&1; tail -n 15 "$OUTDIR/pipeline.log"
    for s in "$H"/ref/*/shrink.json; do cp "$s" "$OUTDIR/$(basename "$(dirname "$s")").shrink.json"; done;;
  evalref)
    timeout ${EVAL_S:-560} python3 -m shrink stage=eval eval=gpu data_dir="$H/data" cache_dir="$H/cache" logging=none \
      run="$H/ref" > "$OUTDIR/eval.log" 2>&1; tail -n 30 "$OUTDIR/eval.log"
    cp "$H"/ref/eval/report.* "$H"/ref/eval/*.png "$OUTDIR/" 2>/dev/null; ls "$H/ref" "$H/ref/eval";;
  balanced)  # issue 16's balanced preset at a reduced budget (BAL_TOKENS; the preset's 50M take ~20 min here)
    assemble
    CUDA_VISIBLE_DEVICES=${BAL_GPU:-1} setsid nohup python3 -m shrink experiment=balanced teacher.source="$H/t/smol.gguf" \
      data_dir="$H/data" cache_dir="$H/cache_b" logging=none run="$H/bal" eval=gpu eval.load.enabled=false \
      eval.speculative=false distill.tokens=${BAL_TOKENS:-20000000} data.teacher_generated.num_samples=${BAL_SAMPLES:-30000} \
      > "$H/bal.log" 2>&1 < /dev/null & echo "balanced: started (pid $!)";;
  presets)  # after `stash` + `stash2` (+ .gpu/corpus): issue 16's presets (PRESETS, default lossless then balanced) at
            # their full budgets with eval=gpu, one after another in the foreground (run it in a `bg` chain)
    assemble
    # PRESET_TAG names the run (run, cache and output folders: PRESET + TAG), so chains can run one preset twice
    for p in ${PRESETS:-lossless balanced}; do
      r=$p${PRESET_TAG:-}; echo "preset $r: $(date +%T)"
      timeout ${PRESET_S:-1700} python3 -m shrink experiment=$p teacher.source="$H/t/smol.gguf" data_dir="$H/data" \
        cache_dir="$H/cache_$r" logging=none run="$H/$r" eval=gpu ${PRESET_ARGS:-} > "$OUTDIR/$r.log" 2>&1
      echo "preset $r: rc $? $(date +%T)"; grep -E "quality gate|wrote" "$OUTDIR/$r.log" | tail -n 8
      mkdir -p "$OUTDIR/$r" && cp "$H/$r"/eval/report.* "$H/$r"/eval/*.png "$OUTDIR/$r/" 2>/dev/null
      for s in "$H/$r"/*/shrink.json; do cp "$s" "$OUTDIR/$r/$(basename "$(dirname "$s")").shrink.json"; done
    done;;
  weightform)  # carry .gpu/wheels: eval.bench.quant with the codes kept and with compressed_weights "auto" (dense where
               # the decode forward times faster: engine/weight_form.py), small and 7B shapes, one process each, GPU alone;
               # then the GPU tests of weight_form, the int4 kernels' engines and the compressed artifacts (WF_TESTS=0:
               # the benches alone; WF_BENCH=0: the tests alone, beside other work)
    [ "${WF_BENCH:-1}" = 1 ] && for shape in smollm2-135m llama2-7b; do
      only="bf16 int8 int4_g64@auto"; bs="1 16 64"; forms="keep auto"
      [ $shape = llama2-7b ] && only="bf16 int4_g128@auto" && bs="1 16" && forms=auto  # the codes should stay
      for cw in $forms; do
        timeout ${WF_S:-300} python3 -m eval.bench.quant --shape $shape --out "$OUTDIR/wf_$shape.jsonl" --only $only \
          --batch $bs --prefill-tokens 1024 --compressed-weights $cw > "$OUTDIR/wf_${shape}_$cw.log" 2>&1
        echo "weightform $shape $cw: rc $?"
      done
    done
    [ "${WF_BENCH:-1}" = 1 ] && python3 - "$OUTDIR"/wf_*.jsonl <<'PY'
import json, sys
for path in sys.argv[1:]:
    for line in open(path):
        r = json.loads(line)
        if r.get("kind") == "decode":
            print(r["shape"], r["variant"], r.get("compressed_weights"), "codes kept:", r.get("weight_only_linears"),
                  r.get("weight_form_us"), {k: round(v, 1) for k, v in r.items() if k.endswith(("tok_s", "vs_bf16"))})
PY
    [ "${WF_TESTS:-1}" = 1 ] && { timeout -s INT -k 30 ${TESTS_S:-500} python3 -m pytest -q -p no:cacheprovider -m gpu -rf --tb=short \
      tests/engine/test_weight_form.py "tests/engine/test_int4_tinygemm.py::test_engine_greedy_tokens_tinygemm_equal_triton" \
      "tests/engine/test_compressed_loading.py::test_gpu_engine_serves_compressed_artifact" > "$OUTDIR/wf_tests.txt" 2>&1
      tail -n 5 "$OUTDIR/wf_tests.txt"; }
    ;;
  int4run)  # carry .gpu/wheels: what the twenty-sixth session left unmeasured of int4's 8-word runs
            # (kernels/gemv.py FAST_INT4_RUN): the fast path's tests on the GPU (their cases carry no gpu marker:
            # the files run on cuda whole), then the 7B decode, int4 against bf16 in one process
    timeout -s INT -k 20 ${TESTS_S:-240} python3 -m pytest -q -p no:cacheprovider -rf tests/kernels/test_quant_gemv_fast.py \
      tests/kernels/test_quant_gemv.py > "$OUTDIR/int4run_tests.txt" 2>&1; tail -n 4 "$OUTDIR/int4run_tests.txt"
    timeout ${QUANT_S:-240} python3 -m eval.bench.quant --shape llama2-7b --out "$OUTDIR/int4run_7b.jsonl" --batch 1 16 \
      --only bf16 int4_g128@triton int4_g128_zero@triton int4_g128@auto --prefill-tokens 1024 > "$OUTDIR/int4run_7b.log" 2>&1
    grep -E "tok/s|vs bf16" "$OUTDIR/int4run_7b.log" | tail -n 12;;
  mqa)  # carry .gpu/wheels: SmolLM2's shape with 3 KV heads against 1 (the gqa stage's 3 -> 1 decoded 20% slower
        # at batch 1 in the twenty-fifth session): decode and a kernel profile of each, GPU alone (~2 min)
    for shape in smollm2-135m smollm2-135m-mqa; do
      $B decode --shape $shape --batch 1 16 > "$OUTDIR/mqa_decode_$shape.log" 2>&1; grep "tok/s" "$OUTDIR/mqa_decode_$shape.log"
      $B profile --shape $shape --batch 1 --top 14 > "$OUTDIR/mqa_profile_$shape.log" 2>&1
      grep -v Warn "$OUTDIR/mqa_profile_$shape.log" | tail -n 18
    done;;
  quiet)  # after the preset chains (waitfor each): every artifact of the runs QUIET_RUNS re-timed alone on the GPU,
          # engine decode at batch 1/16/64 (and 2 held-out windows: eval needs a dataset), the teacher's row first in
          # each run: the baseline in the same process; QUIET_ARGS more overrides (eval.engine.compressed_weights=keep),
          # QUIET_TAG a suffix for its log and report folder
    for r in ${QUIET_RUNS:?}; do
      cp -r "$H/$r/eval" "$H/$r.eval_full" 2>/dev/null  # the full eval's report, before this one replaces it
      timeout ${QUIET_S:-400} python3 -m shrink stage=eval eval=gpu run="$H/$r" data_dir="$H/data" \
        cache_dir="$H/cache_$r" logging=none 'eval.datasets=[heldout]' eval.max_windows=2 eval.tasks.enabled=false eval.tasks.cqa_mc=false \
        eval.agreement.enabled=false eval.load.enabled=false eval.speed.hf_baseline=false eval.speculative=false \
        eval.plots=false ${QUIET_ARGS:-} > "$OUTDIR/quiet_$r${QUIET_TAG:-}.log" 2>&1
      echo "quiet $r: rc $?"; grep "decode tok/s" "$OUTDIR/quiet_$r${QUIET_TAG:-}.log"
      mkdir -p "$OUTDIR/quiet_$r${QUIET_TAG:-}" && cp "$H/$r"/eval/report.* "$OUTDIR/quiet_$r${QUIET_TAG:-}/" 2>/dev/null
    done;;
  long)  # after `stash` + `stash2` (+ .gpu/corpus and .gpu/dss carried once): issue 16's long GPU runs in their own
          # process session on GPU ${LONG_GPU:-1}, one after another: Distilling Step-by-Step on CQA with 3 seeds
          # (label only vs label + rationale); depth vs width vs both at 60% of the teacher's parameters
          # (DVW_TOKENS each); the GQA 3 -> 1 uptrain curve at GQA_TOKENS per GQA_INITS (the tenth session measured
          # mean at 1M / 10M / 50M); `longwait` collects
    assemble; [ -d "$H/smol" ] || $B convert-gguf --gguf "$H/t/smol.gguf" --out "$H/smol" > /dev/null
    # depth_vs_width takes an imported artifact (with its shrink.json): the pipeline's, else one imported here
    T="$H/ref/teacher"; [ -f "$T/shrink.json" ] || { T="$H/imp/teacher"; [ -f "$T/shrink.json" ] || python3 -m shrink \
      stage=import teacher.source="$H/t/smol.gguf" run="$H/imp" logging=none > /dev/null 2>&1; }
    mkdir -p "$H/long"
    CUDA_VISIBLE_DEVICES=${LONG_GPU:-1} setsid nohup bash -c "
      for s in ${DSS_SEEDS:-0 1 2}; do python3 experiments/distill.py --teacher $H/smol --data-dir $H/data \
        --out $H/long/dss_s\$s --tokens 1 --parts dss --seed \$s; done
      [ ${DVW_TOKENS:-10000000} -gt 0 ] && python3 experiments/depth_vs_width.py --teacher $T --data-dir $H/data \
        --out $H/long/dvw --tokens ${DVW_TOKENS:-10000000}
      for t in ${GQA_TOKENS-10000000}; do python3 experiments/gqa.py --model $H/smol \
        --data-dir $H/data --out $H/long/gqa_\$t --tokens \$t --inits ${GQA_INITS:-mean,svd}; done" > "$H/long.log" 2>&1 < /dev/null &
    echo "long: started (pid $!)";;
  longwait)
    for _ in $(seq 1 $(( ${LONG_WAIT_S:-10} / 5 ))); do pgrep -f "experiments/(distill|gqa|depth_vs_width).py" > /dev/null || break; sleep 5; done
    pgrep -f "experiments/(distill|gqa|depth_vs_width).py" > /dev/null && echo "long: still running"
    tr '\r' '\n' < "$H/long.log" | grep -E "dss|gqa|ppl|accuracy|Error" | tail -n 30
    (cd "$H/long" && find . -name "results.*" -o -name "*.jsonl" | tar -czf "$OUTDIR/long_results.tgz" -T -);;
  balwait)
    for _ in $(seq 1 $(( ${BAL_WAIT_S:-300} / 5 ))); do pgrep -f "experiment=balanced" > /dev/null || break; sleep 5; done
    pgrep -f "experiment=balanced" > /dev/null && echo "balanced: still running"
    cp "$H/bal.log" "$OUTDIR/balanced.log"; grep -v Warn "$H/bal.log" | tail -n 25
    for s in "$H"/bal/*/shrink.json; do cp "$s" "$OUTDIR/bal.$(basename "$(dirname "$s")").shrink.json"; done
    mkdir -p "$OUTDIR/bal" && cp "$H"/bal/eval/report.* "$H"/bal/eval/*.png "$OUTDIR/bal/" 2>/dev/null;;
  recheck)  # after `stash` + `stash2`: the ninth session's fixes on the GPU (staging race, step-kernel warm-up,
            # batch-invariant mode), then the distill step's cost and `bidiag`
    "$0" rtests; "$0" stepcost; "$0" bidiag;;
  rtests)
    timeout -s INT -k 30 ${TESTS_S:-300} python3 -m pytest -q -p no:cacheprovider -m gpu -rf tests/engine/test_staging.py \
      tests/engine/test_engine_gpu.py tests/engine/spec_decode/test_batch_invariant_gpu.py tests/kernels/test_batch_invariant_gemv.py \
      tests/train/test_step_syncs.py tests/train/test_fused_head_loss.py tests/train/test_compiled_layers.py tests/kernels/test_pdl.py tests/kernels/test_paged_attention.py \
      > "$OUTDIR/recheck_tests.txt" 2>&1; tail -n 8 "$OUTDIR/recheck_tests.txt";;
  int4)  # carry .gpu/wheels: int4 at M = 1 (fast dequantization) and M = 2, 16 (exact), exact and tinygemm beside
         # them; then the 7B decode with int4_kernel triton / tinygemm against bf16 (issue 13)
    timeout ${SWEEP_S:-300} python3 experiments/quant_gemv_sweep.py --formats int4_g64 int4_g128 int4_g128_zero \
      --m 1 2 16 --budget-s ${M1_BUDGET_S:-40} --json "$OUTDIR/int4_sweep.jsonl" \
      > "$OUTDIR/int4_sweep.log" 2>&1; grep -E '"fast_best"|"suggest"|"done"' "$OUTDIR/int4_sweep.jsonl" | cut -c1-220
    timeout ${QUANT_S:-200} python3 -m eval.bench.quant --shape llama2-7b --out "$OUTDIR/quant_int4.jsonl" --batch 1 16 \
      --only bf16 int4_g128@triton int4_g64@triton int4_g128@tinygemm \
      > "$OUTDIR/quant_int4.log" 2>&1; grep -v Warn "$OUTDIR/quant_int4.log" | tail -n 10;;
  rounds)  # after `stash` + `stash2` (and `pipeline` for its student as drafter): issue 14's device-resident rounds
           # (speculative_config num_rounds) and the auto policy's fixes on the GPU: their tests, then tok/s with
           # R = 1 and 4 on the real teacher beside n-gram auto
    [ -d "$H/smol" ] || $B convert-gguf --gguf "$H/t/smol.gguf" --out "$H/smol" > /dev/null
    timeout -s INT -k 30 ${TESTS_S:-240} python3 -m pytest -q -p no:cacheprovider -m gpu -rf tests/engine/spec_decode/test_spec_rounds_gpu.py \
      tests/kernels/test_spec_advance.py tests/engine/spec_decode/test_spec_gpu.py > "$OUTDIR/rounds_tests.txt" 2>&1
    tail -n 6 "$OUTDIR/rounds_tests.txt"
    D=""; [ -f "$H/ref/distill/shrink.json" ] && D="--draft $H/ref/distill"
    timeout ${SPEC_S:-400} python3 experiments/spec_bench.py --json "$OUTDIR/spec_rounds.jsonl" speed --target "$H/t/smol.gguf" \
      $D --truncated 2 --data-dir "$H/data" --workloads wikitext gsm8k --batch 1 4 16 --ks 2 4 --num-rounds 1 4 --auto --check \
      --repeats 2 --budget-s 330 --engine '{"max_model_len": 2048}' > "$OUTDIR/spec_rounds.log" 2>&1
    grep -v Warn "$OUTDIR/spec_rounds.log" | tail -n 6;;
  int8)  # carry .gpu/wheels + .gpu/old (kernels/ etc. at 48fd6ad, before the int8 fast path's rebuild): the int8 GEMV
         # sweep at M = 1, 2, 16 on the old and the new tree, then the 7B decode rows (issue 13)
    for tree in .gpu/old .; do
      (cd "$tree" && PYTHONPATH="$H/site:$PWD" timeout ${SWEEP_S:-200} python3 experiments/quant_gemv_sweep.py --formats int8 \
        --m 1 2 16 --budget-s ${INT8_BUDGET_S:-120} --json "$OUTDIR/int8_sweep_$(basename "$tree").jsonl" > "$OUTDIR/int8_sweep_$(basename "$tree").log" 2>&1)
    done; tail -n 3 "$OUTDIR"/int8_sweep_*.log
    timeout -s INT -k 30 ${TESTS_S:-200} python3 -m pytest -q -p no:cacheprovider -m gpu -rf tests/kernels/test_quant_gemv_fast.py \
      tests/kernels/test_gemv_split_k.py > "$OUTDIR/int8_tests.txt" 2>&1; tail -n 4 "$OUTDIR/int8_tests.txt"
    timeout ${QUANT_S:-200} python3 -m eval.bench.quant --shape llama2-7b --out "$OUTDIR/quant_int8.jsonl" --batch 1 16 \
      --only bf16 int8 > "$OUTDIR/quant_int8.log" 2>&1; grep -v Warn "$OUTDIR/quant_int8.log" | tail -n 6;;
  sp24)  # carry .gpu/wheels: the 2:4 + int4 paths (fast M == 1, select, dot, fast_rows, the tensor-core sparse24_mma)
         # against bf16, dense int4 (fast GEMV, int4_mma) and tinygemm at M = 1 2 4 8 16 (sweep), the GPU tests,
         # then the 7B 2:4 rows (issue 13)
    "$0" sp24sweep
    timeout -s INT -k 30 ${TESTS_S:-240} python3 -m pytest -q -p no:cacheprovider -m gpu -rf tests/kernels/test_quant_gemv_sparse24.py \
      tests/kernels/test_sparse24_mma.py tests/engine/test_sparse24_paths.py "tests/engine/test_compressed_loading.py::test_gpu_engine_serves_compressed_artifact[sparse24_int4]" \
      > "$OUTDIR/sp24_tests.txt" 2>&1; tail -n 4 "$OUTDIR/sp24_tests.txt"
    timeout ${QUANT_S:-200} python3 -m eval.bench.quant --shape llama2-7b --out "$OUTDIR/quant_24.jsonl" --batch 1 16 \
      --only bf16 int4_g128@triton sparse24_int4_g128 sparse24 --prefill-tokens 1024 4080 > "$OUTDIR/quant_24.log" 2>&1
    grep -v Warn "$OUTDIR/quant_24.log" | tail -n 8
    # the same 2:4 rows with their decode-size paths timed as CUDA graph replays (EngineConfig.sparse24_timing):
    # which timing picks the faster paths (compare b1 / b16 tok/s and each shape's sparse24_paths with the rows above)
    timeout ${QUANT_GRAPH_S:-200} python3 -m eval.bench.quant --shape llama2-7b --out "$OUTDIR/quant_24_graph.jsonl" \
      --batch 1 16 --only bf16 sparse24_int4_g128 sparse24 --sparse24-timing graph --prefill-tokens 1024 \
      > "$OUTDIR/quant_24_graph.log" 2>&1; grep -v Warn "$OUTDIR/quant_24_graph.log" | tail -n 6;;
  profile)  # after `stash` + `stash2` (+ .gpu/heads: Medusa heads): where a speculative round's time goes at batch 1
             # on the real teacher (experiments/spec_round_profile.py: plain, one step per trip, n-gram / Medusa at k 4),
             # then the verify's cost against a decode step at its shape (issue 14)
    assemble
    timeout ${PROF_S:-240} python3 experiments/spec_round_profile.py --target "$H/t/smol.gguf" --data-dir "$H/data" \
      --out "$OUTDIR/profile" --json "$OUTDIR/profile.jsonl" > "$OUTDIR/profile.log" 2>&1; grep -v Warn "$OUTDIR/profile.log" | tail -n 3 | cut -c1-600
    [ -d .gpu/heads ] && timeout ${PROF_S:-240} python3 experiments/spec_round_profile.py --target "$H/t/smol.gguf" \
      --data-dir "$H/data" --method medusa --heads .gpu/heads --out "$OUTDIR/profile_medusa" --json "$OUTDIR/profile.jsonl" \
      > "$OUTDIR/profile_medusa.log" 2>&1; grep -v Warn "$OUTDIR/profile_medusa.log" | tail -n 1 | cut -c1-600
    timeout ${VERIFY_S:-120} python3 experiments/spec_bench.py --json "$OUTDIR/verify_cost.jsonl" verify-cost --shape smollm2-135m \
      --context 512 > "$OUTDIR/verify_cost.log" 2>&1; grep -v Warn "$OUTDIR/verify_cost.log" | tail -n 4 | cut -c1-300;;
  fusedrows)  # carry .gpu/wheels: the fused decode's row limit timed at startup (engine/fused_rows.py): decode tok/s
              # with it pinned at 16 (the engine before) and timed, back to back per shape, then its GPU tests (issue 13)
    for shape in llama2-7b smollm2-135m; do
      b="1 16"; [ $shape = smollm2-135m ] && b="1 16 64"
      for e in fused_decode_rows=16 ""; do
        timeout ${DECODE_S:-90} python3 -m eval.bench --json "$OUTDIR/fusedrows_decode.jsonl" decode --shape $shape --batch $b \
          ${e:+--engine $e} 2>&1 | grep -E "fused decode|tok/s" | cut -c1-400
      done
    done
    timeout -s INT -k 30 ${TESTS_S:-150} python3 -m pytest -q -p no:cacheprovider -m gpu -rf tests/engine/test_fused_decode_rows.py \
      tests/kernels/test_fused_decode_rows_triton.py tests/engine/test_multi_step.py tests/engine/test_engine_gpu.py \
      > "$OUTDIR/fusedrows_tests.txt" 2>&1; tail -n 4 "$OUTDIR/fusedrows_tests.txt";;
  s15)  # after `stash` + `stash2`: what the fourteenth session built and could not time (issues 13, 14): the GPU
        # tests of n-gram rounds, the fused-rows limit, the phase clock; n-gram in device-resident rounds against
        # one round and plain decoding on the real teacher (--check), b1/4/16; a profile of an n-gram round step
    assemble
    timeout -s INT -k 30 ${TESTS_S:-400} python3 -m pytest -q -p no:cacheprovider -m gpu -rf tests/engine/spec_decode/test_spec_rounds_gpu.py tests/kernels/test_ngram_match.py \
      tests/engine/test_fused_decode_rows.py tests/kernels/test_fused_decode_rows_triton.py \
      tests/engine/spec_decode/test_spec_metrics.py tests/engine/test_multi_step.py > "$OUTDIR/s15_tests.txt" 2>&1
    tail -n 6 "$OUTDIR/s15_tests.txt"
    timeout ${SPEC_S:-400} python3 experiments/spec_bench.py --json "$OUTDIR/ngram_rounds.jsonl" speed --target "$H/t/smol.gguf" \
      --truncated --data-dir "$H/data" --workloads grounded gsm8k wikitext --batch 1 4 16 --ks 2 4 --num-rounds 1 4 8 --auto \
      --check --repeats 2 --budget-s 330 --engine '{"max_model_len": 2048}' > "$OUTDIR/ngram_rounds.log" 2>&1
    grep -v Warn "$OUTDIR/ngram_rounds.log" | tail -n 8 | cut -c1-300
    timeout ${PROF_S:-200} python3 experiments/spec_round_profile.py --target "$H/t/smol.gguf" --data-dir "$H/data" \
      --variants plain,spec --num-rounds 4 --out "$OUTDIR/profile_rounds" --json "$OUTDIR/profile_rounds.jsonl" \
      > "$OUTDIR/profile_rounds.log" 2>&1; grep -v Warn "$OUTDIR/profile_rounds.log" | tail -n 2 | cut -c1-500;;
  kd100)  # after stash + stash2 (+ .gpu/corpus): issue 16's student goal, the 15-layer student after KD_TOKENS (100M)
          # of forward-KL distillation, then CE at the same tokens (RUNS), WikiText-2 on the reference protocol;
          # TEACHER_GEN=N (default 0: corpus only): the runs train on the corpus mixed with N teacher samples of
          # TEACHER_MAX_TOKENS (256), made once by our engine and cached under $H/tgen_cache (the next call on this
          # machine reuses them), filling TEACHER_RATIO (0.5) of the blocks (issue 16 item 1; e.g. 200000 x 256 at
          # 0.5 ~ 50M of the 100M tokens). Separate chains (RUNS=fkl, RUNS=ce): start the second after the first's
          # samples are cached, or both generate them; KD_ARGS: more distill.py flags (the goal's 1.93x, twentieth
          # session: KD_ARGS="--lr 1e-3 --block-size 2048 --batch-size 8" with TEACHER_GEN=100000)
    assemble; [ -d "$H/smol" ] || $B convert-gguf --gguf "$H/t/smol.gguf" --out "$H/smol" > /dev/null
    python3 experiments/distill.py --teacher "$H/smol" --data-dir "$H/data" --out "$OUTDIR/kd100" \
      --parts importance,kd --runs ${RUNS:-fkl,ce} --tokens ${KD_TOKENS:-100000000} --context 2048 \
      --teacher-generated ${TEACHER_GEN:-0} --teacher-ratio ${TEACHER_RATIO:-0.5} \
      --teacher-max-tokens ${TEACHER_MAX_TOKENS:-256} --teacher-cache "$H/tgen_cache" ${KD_ARGS:-} > "$OUTDIR/kd100.log" 2>&1
    grep -v Warn "$OUTDIR/kd100.log" | tail -n 6;;
  tgenwait)  # in a chain after another chain's kd100 with TEACHER_GEN: until its samples are cached (an entry
             # appears whole, by a rename: its samples.pt is complete), at most TGEN_WAIT_S (1200)
    for _ in $(seq 1 $(( ${TGEN_WAIT_S:-1200} / 5 ))); do ls "$H"/tgen_cache/teacher_data/*/samples.pt > /dev/null 2>&1 \
      && break; sleep 5; done; ls -d "$H"/tgen_cache/teacher_data/*/;;
  tgencopy)  # tgencopy FROM TO (one quoted word in a chain): waits for run FROM's cached teacher samples (an entry
             # appears whole, by a rename), then copies them into run TO's cache, so two runs of a preset share them
    for _ in $(seq 1 $(( ${TGEN_WAIT_S:-1200} / 5 ))); do ls "$H/cache_$2"/teacher_data/*/samples.pt > /dev/null 2>&1 \
      && break; sleep 5; done
    mkdir -p "$H/cache_$3/teacher_data" && cp -r "$H/cache_$2"/teacher_data/. "$H/cache_$3/teacher_data/" \
      && ls "$H/cache_$3/teacher_data";;
  gqatg)  # after tgenwait: the GQA budget curve (GQA_TOKENS, default 1M 10M 50M; GQA_INITS svd) on the corpus mixed
          # with the cached teacher samples at TEACHER_RATIO (0.5), WikiText-2 on the reference protocol (issue 16 item 5)
    assemble; [ -d "$H/smol" ] || $B convert-gguf --gguf "$H/t/smol.gguf" --out "$H/smol" > /dev/null
    E=$(ls -d "$H"/tgen_cache/teacher_data/*/ | head -n 1)
    python3 experiments/gqa.py --model "$H/smol" --data-dir "$H/data" --out "$OUTDIR/gqa_tg" \
      --tokens ${GQA_TOKENS:-1000000 10000000 50000000} --inits ${GQA_INITS:-svd} --teacher-samples "$E" \
      --teacher-ratio ${TEACHER_RATIO:-0.5} > "$OUTDIR/gqa_tg.log" 2>&1; grep -v Warn "$OUTDIR/gqa_tg.log" | tail -n 8;;
  dvw)  # after stash + stash2 (+ .gpu/corpus): depth against width at equal parameters (issue 16 item 2), each
        # student (DVW_KINDS) distilled DVW_TOKENS (10M) by the distill stage, from an imported teacher artifact;
        # width and both took minutes more than depth before training on the H200 (DVW_S: give them >= 600 s each)
    assemble; T="$H/imp/teacher"; [ -f "$T/shrink.json" ] || python3 -m shrink stage=import \
      teacher.source="$H/t/smol.gguf" run="$H/imp" logging=none > "$OUTDIR/import.log" 2>&1
    timeout ${DVW_S:-1800} python3 experiments/depth_vs_width.py --teacher "$T" --data-dir "$H/data" --out "$H/dvw" \
      --tokens ${DVW_TOKENS:-10000000} --kinds ${DVW_KINDS:-depth,width,both} > "$OUTDIR/dvw.log" 2>&1
    tr '\r' '\n' < "$OUTDIR/dvw.log" | grep -a '^\[' | cut -c1-400 | tail -n 8
    cp "$H/dvw/results.jsonl" "$OUTDIR/dvw_results.jsonl";;  # the students' weights stay on the machine
  q24)  # carry .gpu/wheels: every weight-only format's 7B decode at batch 1 and 16, bf16 first, one process (issue 13)
    timeout ${QUANT_S:-300} python3 -m eval.bench.quant --shape llama2-7b --out "$OUTDIR/quant_24.jsonl" --batch 1 16 \
      --only bf16 int8 int4_g128@triton sparse24_int4_g128 > "$OUTDIR/quant_24.log" 2>&1
    grep -v Warn "$OUTDIR/quant_24.log" | tail -n 12;;
  s17)  # carry .gpu/wheels: the 7B verify after the PDL change (issue 14's <= 1.15x), where the 7B decode's time goes
        # at batch 1 for int8 and int4 (issue 13), and the 2:4 + int4 M = 1 GEMV's tiles (FAST_CANDIDATES, issue 13)
    timeout ${VERIFY_S:-150} python3 experiments/spec_bench.py --json "$OUTDIR/verify_cost.jsonl" verify-cost \
      --shape llama2-7b --context 512 2048 > "$OUTDIR/verify_cost.log" 2>&1; tail -n 6 "$OUTDIR/verify_cost.log"
    timeout ${SWEEP_S:-200} python3 experiments/sparse24_gemv_sweep.py --formats int4_g128 --m 1 --paths fast \
      --budget-s ${SP24_BUDGET_S:-120} --json "$OUTDIR/sp24_m1.jsonl" > "$OUTDIR/sp24_m1.log" 2>&1
    grep '"suggest"' "$OUTDIR/sp24_m1.jsonl" | cut -c1-200
    for v in ${PROF_VARIANTS:-int8 int4_g128@triton sparse24_int4_g128}; do
      timeout ${PROF_S:-90} $B profile --shape llama2-7b --batch 1 --steps 64 --top 14 --variant $v \
        > "$OUTDIR/profile_$v.log" 2>&1; grep -v Warn "$OUTDIR/profile_$v.log" | tail -n 16; done;;
  rowsweep)  # carry .gpu/wheels: the fused decode kernels at 2-16 rows, norm prologue against a separate norm launch
             # and cuBLAS, bf16 and int8, Llama-2-7B shapes (issue 13's batch 2-16)
    timeout ${ROWS_S:-420} python3 experiments/gemv_sweep.py --model llama2-7b --m 2 8 16 --json "$OUTDIR/rows.jsonl" \
      > "$OUTDIR/rows.log" 2>&1; grep -v Warn "$OUTDIR/rows.log" | tail -n 24 | cut -c1-400;;
  grounded)  # after stash + stash2: n-gram on the grounded workload as served (answers end at EOS), batch 1 walks
             # 16 prompts, one round and device-resident rounds, against plain decoding (--check)
    assemble
    timeout ${SPEC_S:-300} python3 experiments/spec_bench.py --json "$OUTDIR/grounded_eos.jsonl" speed --target "$H/t/smol.gguf" \
      --truncated --data-dir "$H/data" --workloads grounded --stop-at-eos --prompts 16 --batch 1 4 16 --ks 2 4 \
      --num-rounds 1 8 --auto --check --repeats 2 --budget-s 260 --verify-shape "" --engine '{"max_model_len": 2048}' \
      > "$OUTDIR/grounded_eos.log" 2>&1; grep -v Warn "$OUTDIR/grounded_eos.log" | tail -n 4 | cut -c1-300;;
  autorounds)  # after stash + stash2: the auto policy with num_rounds 8 (plain step or 8 rounds at k 4, costed at
               # startup) beside fixed k 4 rounds and one-round auto, --check against plain, b1/4/16 (issue 14; the grounded workload: `grounded`)
    assemble
    timeout -s INT -k 30 ${TESTS_S:-300} python3 -m pytest -q -p no:cacheprovider -m gpu -rf tests/engine/spec_decode/test_spec_rounds_gpu.py \
      tests/kernels/test_ngram_match.py > "$OUTDIR/autorounds_tests.txt" 2>&1
    tail -n 4 "$OUTDIR/autorounds_tests.txt"
    timeout ${SPEC_S:-500} python3 experiments/spec_bench.py --json "$OUTDIR/ngram_auto_rounds.jsonl" speed --target "$H/t/smol.gguf" \
      --truncated --data-dir "$H/data" --workloads gsm8k wikitext --batch 1 4 16 --ks 4 --num-rounds 1 8 --auto \
      --check --repeats 2 --budget-s 450 --verify-shape "" --engine '{"max_model_len": 2048}' > "$OUTDIR/ngram_auto_rounds.log" 2>&1
    grep -v Warn "$OUTDIR/ngram_auto_rounds.log" | tail -n 8 | cut -c1-300;;
  int4bound)  # carry .gpu/wheels: experiments/int4_bound.py's ladder (launch floor, codes, + scales, + x, the real
              # GEMV; load-only deeper / more rows / split-K) at the 7B shapes, int4 g128 (issue 13)
    timeout ${BOUND_S:-100} python3 experiments/int4_bound.py --json "$OUTDIR/int4_bound.jsonl" > "$OUTDIR/int4_bound.log" 2>&1
    python3 -c "import json,sys; [print(r['shape'], r['variant'], r.get('config'), r.get('us') and round(r['us'], 2),
      r.get('of_copy_ceiling') and round(r['read_of_copy_ceiling' if r['variant'][:2] == 'g_' else 'of_copy_ceiling'], 3), r.get('error', '')[:80]) for r in map(json.loads, open(sys.argv[1]))
      if r['kind'] == 'measure']" "$OUTDIR/int4_bound.jsonl"; grep '"ceiling"' "$OUTDIR/int4_bound.jsonl" | cut -c1-200
    tail -n 2 "$OUTDIR/int4_bound.log" | cut -c1-300;;  # the "done" line, or where it stopped
  sp24sweep)  # the 2:4 + int4 GEMV / GEMM sweep alone
    timeout ${SWEEP_S:-330} python3 experiments/sparse24_gemv_sweep.py --json "$OUTDIR/sp24_sweep.jsonl" --m 1 2 4 8 16 \
      --budget-s ${SP24_BUDGET_S:-100} > "$OUTDIR/sp24_sweep.log" 2>&1; tail -n 4 "$OUTDIR/sp24_sweep.log";;
  mma)  # carry .gpu/wheels: the tensor-core int4 GEMM (kernels/int4_mma.py) on the GPU, then against exact / fast /
        # tinygemm / bf16 at M = 1..16 on the 7B shapes (issue 13)
    timeout -s INT -k 30 ${TESTS_S:-150} python3 -m pytest -q -p no:cacheprovider -m gpu -rf tests/kernels/test_int4_mma.py \
      > "$OUTDIR/mma_tests.txt" 2>&1; tail -n 4 "$OUTDIR/mma_tests.txt"
    timeout ${MMA_S:-360} python3 experiments/int4_mma_sweep.py --json "$OUTDIR/int4_mma.jsonl" --budget-s ${MMA_BUDGET_S:-300} \
      > "$OUTDIR/int4_mma.log" 2>&1; grep -v Warn "$OUTDIR/int4_mma.log" | tail -n 12;;
  stepcost)
    timeout ${STEP_S:-420} python3 experiments/distill_step_cost.py --out "$OUTDIR/step_cost.jsonl" > "$OUTDIR/step_cost.log" 2>&1
    tail -n 3 "$OUTDIR/step_cost.jsonl";;
  bg)  # bg NAME VERB...: the verbs one after another in their own process session (they outlive the call and its
       # 10 minutes), their output under $H/bg/NAME; `waitfor NAME` inside a chain waits for another; `collect` fetches.
       # End the call that starts chains with `COLLECT_S=... collect`, and keep a collect call in flight until they are
       # done: the machine goes back after ~30 s idle and the chains with it (the twentieth session lost a lease so)
    name=$2; shift 2; mkdir -p "$H/bg/$name"
    # (each marker on a line of its own: a verb's last output may end without a newline, pytest's progress
    # dots among them, and `waitfor` / `collect` look for "== done" at a line's start)
    OUT="$H/bg/$name" setsid nohup bash -c 'for v in "$@"; do printf "\n== %s %s\n" "$v" "$(date +%T)"; "$0" $v; done
      printf "\n== done %s\n" "$(date +%T)"' \
      "$0" "$@" > "$H/bg/$name/log.txt" 2>&1 < /dev/null &
    echo "bg $name: started ($*)";;
  waitfor)  # waitfor NAME (in a chain, one quoted word: bg b rtests "waitfor a" stepcost): until chain NAME is done
    until grep -q "^== done" "$H/bg/${2}/log.txt" 2>/dev/null; do sleep 5; done;;
  collect)  # waits up to COLLECT_S for every chain to say done, then copies $H/bg into $OUT (the chains run on)
    for _ in $(seq 1 $(( ${COLLECT_S:-0} / 5 ))); do
      left=0; for f in "$H"/bg/*/log.txt; do grep -q "^== done" "$f" || left=1; done; [ $left = 0 ] && break; sleep 5; done
    for f in "$H"/bg/*/log.txt; do echo "## $f"; grep -v Warn "$f" | tail -n ${TAIL:-12}; done
    cp -r "$H/bg/." "$OUTDIR/";;
  bidiag)
    [ -d "$H/smol" ] || $B convert-gguf --gguf "$H/t/smol.gguf" --out "$H/smol" > /dev/null
    timeout ${BID_S:-240} python3 experiments/batch_invariant_diag.py --model "$H/smol" --json "$OUTDIR/bi_diag.jsonl" \
      > "$OUTDIR/bi_diag.log" 2>&1; grep -v Warn "$OUTDIR/bi_diag.log" | tail -n 12
    timeout -s INT -k 30 ${BIT_S:-150} python3 -m pytest -q -p no:cacheprovider -m gpu -rf tests/engine/spec_decode/test_batch_invariant_gpu.py \
      > "$OUTDIR/bi_tests.txt" 2>&1; tail -n 6 "$OUTDIR/bi_tests.txt";;
  tp)
    nvidia-smi topo -m; env | grep -E 'NVLS|MULTICAST'
    timeout -s INT -k 30 ${TESTS_S:-240} python3 -m pytest -q -p no:cacheprovider -m gpu -rf ${TP_TESTS:-tests/engine/test_tensor_parallel.py \
      tests/train/test_distributed_gpu.py} > "$OUTDIR/tp_tests.txt" 2>&1; tail -n 15 "$OUTDIR/tp_tests.txt"
    [ "${TPDIAG_S:-0}" -gt 0 ] && timeout ${TPDIAG_S} python3 experiments/tp_spec_diag.py --variants tp2_timed tp2_pseudo_rows \
      tp2_pseudo_rows_nopdl tp1_pseudo_rows --json "$OUTDIR/tp_spec_diag.jsonl" > "$OUTDIR/tp_spec_diag.log" 2>&1
    [ "${TP_S:-320}" -gt 0 ] && timeout ${TP_S:-320} python3 experiments/tp_bench.py --out "$OUTDIR/tp_bench.jsonl" ${TP_ARGS:-} > "$OUTDIR/tp_bench.log" 2>&1
    grep -v Warn "$OUTDIR/tp_bench.log" | tail -n 12;;
  scaling)
    for shape in ${SCALING_SHAPES:-135m 1b}; do
      timeout ${SCALING_S:-170} python3 experiments/distill_scaling.py --random $shape --gpus 1,2 --equal-global-batch \
        --batch-per-gpu 8 --block 2048 --steps 12 --timeout 90 --out "$OUTDIR/scaling.jsonl" > "$OUTDIR/scaling_$shape.log" 2>&1
      grep -E '^# |failed' "$OUTDIR/scaling_$shape.log"
    done
    timeout ${SCALING7_S:-180} python3 experiments/distill_scaling.py --random 7b --gpus 1,2 --batch-per-gpu 1 --block 2048 \
      --steps 8 --timeout 95 --out "$OUTDIR/scaling.jsonl" > "$OUTDIR/scaling_7b.log" 2>&1; grep -E '^# |failed' "$OUTDIR/scaling_7b.log"
    python3 -c "import json,sys; [print(r['kind'], r['gpus'], r['teacher'], r['global_batch'], round(r['tokens_per_s']), r['peak_mem_gib_per_gpu'])
      for r in map(json.loads, open(sys.argv[1]))]" "$OUTDIR/scaling.jsonl";;
  w8a8)
    timeout -s INT -k 30 ${TESTS_S:-150} python3 -m pytest -q -p no:cacheprovider -m gpu -rf tests/kernels/test_w8a8.py \
      tests/engine/test_quantized_layers.py -k "w8a8 or W8A8" > "$OUTDIR/w8a8_tests.txt" 2>&1; tail -n 6 "$OUTDIR/w8a8_tests.txt"
    timeout ${PIECES_S:-400} python3 experiments/w8a8_prefill_pieces.py --json "$OUTDIR/w8a8_pieces.jsonl" --sweep \
      ${PIECES_ARGS:-} > "$OUTDIR/w8a8_pieces.log" 2>&1; grep -E '"kind": "(model_linears|int8_mm_best)"|Error' "$OUTDIR/w8a8_pieces.log" | tail -n 24;;
  recheck12)  # carry .gpu/wheels: after the twelfth session's fixes, one call: the GPU tests of int8 (back on
              # _matmul_fast), W8A8 (codes equal to the reference) and 2:4 + int4, then the 7B decode rows of int8
              # and 2:4 + int4 served end to end, and W8A8's per-linear pieces (issue 13). The tests need ~400 s:
              # the twelfth session's 150 s ran out after 62 passing cases
    "$0" r12tests
    timeout ${QUANT_S:-200} python3 -m eval.bench.quant --shape llama2-7b --out "$OUTDIR/quant_recheck12.jsonl" --batch 1 16 \
      --only bf16 int8 int4_g128@triton sparse24_int4_g128 > "$OUTDIR/quant_recheck12.log" 2>&1
    grep -v Warn "$OUTDIR/quant_recheck12.log" | tail -n 6 | cut -c1-300
    timeout ${PIECES_S:-150} python3 experiments/w8a8_prefill_pieces.py --json "$OUTDIR/w8a8_pieces.jsonl" \
      > "$OUTDIR/w8a8_pieces.log" 2>&1; grep -E '"kind": "model_linears"|Error' "$OUTDIR/w8a8_pieces.log" | tail -n 6;;
  r12tests)  # the GPU tests of int8, W8A8, 2:4 + int4 (sparse24_mma among them), compressed loading, eval
    timeout -s INT -k 30 ${RECHECK_TESTS_S:-420} python3 -m pytest -q -p no:cacheprovider -m gpu -rf tests/kernels/test_w8a8.py \
      tests/kernels/test_quant_gemv.py tests/kernels/test_quant_gemv_fast.py tests/kernels/test_quant_gemv_sparse24.py \
      tests/kernels/test_quant_gemv_sparse24_fused.py tests/kernels/test_sparse24_mma.py tests/engine/test_sparse24_paths.py tests/engine/test_compressed_loading.py \
      tests/eval > "$OUTDIR/recheck12_tests.txt" 2>&1; tail -n 8 "$OUTDIR/recheck12_tests.txt";;
  rows)  # the 7B decode (batch 1, 16) and prefill rows of every served format against bf16 (issue 13)
    timeout ${QUANT_S:-240} python3 -m eval.bench.quant --shape llama2-7b --out "$OUTDIR/quant_rows.jsonl" --batch 1 16 \
      --only bf16 int8 int4_g128@triton sparse24_int4_g128 sparse24 --prefill-tokens 1024 4080 > "$OUTDIR/quant_rows.log" 2>&1
    grep -v Warn "$OUTDIR/quant_rows.log" | tail -n 8 | cut -c1-300;;
  w8a8bench)
    timeout ${QUANT_S:-560} python3 -m eval.bench.quant --shape llama2-7b-16k --out "$OUTDIR/w8a8_prefill.jsonl" \
      --only bf16 w8a8_int8 w8a8_fp8 --prefill-tokens ${PREFILL_TOKENS:-1024 4080 8192} --prefill-only --prefill-workload \
      > "$OUTDIR/w8a8_prefill.log" 2>&1; grep -v Warn "$OUTDIR/w8a8_prefill.log" | tail -n 14;;
  real)
    cp .gpu/t3/p01 .gpu/t3/p02 "$H/t/" && cat "$H/t"/p0? > "$H/t/smol.gguf" && sha256sum "$H/t/smol.gguf"
    $B convert-gguf --gguf "$H/t/smol.gguf" --out "$H/smol"
    $B decode --model "$H/smol" --batch 1 16 64 --hf
    $B agreement --model "$H/smol";;
esac

"""Engine benchmarks, one module per subcommand (eval/bench/cli.py parses them): decode speed
against transformers, bandwidth roofline, throughput on nano-vllm's workload, KV capacity, greedy
agreement with transformers on a real model, host time per step, and where a decode step's time goes.

    python -m eval.bench ceilings
    python -m eval.bench decode --model DIR --batch 1 16 64 --new-tokens 256 --hf
    python -m eval.bench decode --shape llama2-7b --batch 1 --hf --roofline
    python -m eval.bench throughput --shape tinyllama [--prefill-attention sdpa]
    python -m eval.bench capacity --shape tinyllama
    python -m eval.bench agreement --model DIR
    python -m eval.bench convert-gguf --gguf FILE --out DIR
    python -m eval.bench host --batch 1 8 64 --steps 512        # CPU: host time per decode step
    python -m eval.bench profile --shape smollm2-135m --batch 1   # step vs graph vs kernels

Every figure printed is measured in this process; baselines run in the same process, first.
"""

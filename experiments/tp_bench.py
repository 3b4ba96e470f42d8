"""Tensor-parallel decode on two GPUs of one host (random bf16 weights, NCCL, NVLink multicast off).

    NCCL_NVLS_ENABLE=0 python experiments/tp_bench.py --out tp_bench.jsonl

One JSON object per line (to stdout, and appended to --out):
- {"kind": "ceilings"}: copy bandwidth and bf16 matmul throughput of GPU 0 (eval/bench/ceilings.py).
- {"kind": "collectives"}: one decode step's collectives alone, on 2 ranks, replayed from a CUDA
  graph as the engine replays them: 2 all-reduces per layer + 1 (the embedding) of [batch, hidden]
  bf16, and the logits' all-gather of [batch, vocab / 2]; microseconds per step and per all-reduce.
- {"kind": "decode"}: Llama-2-7B shape at TP=1 and TP=2, batch 1 and 64: decode ms per step and
  tokens/s, from two generate calls ((time of N new tokens - time of 1) / (N - 1): the prefill
  cancels out); then the Llama-2-70B shape (about 138 GB of bf16: each rank creates only its
  shard, on its own GPU) at TP=2, batch 1, against the bandwidth roofline
  weights / (2 x copy bandwidth measured above): ``roofline_fraction``.
"""

from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = os.environ.get("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.multiprocessing as tmp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.bench.common import SHAPES, graph_seconds, weight_bytes  # noqa: E402

LLAMA2_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)


def emit(record: dict, out: str | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def shape_dir(name: str, shape: dict) -> str:
    """A directory holding only config.json: the engine builds it with load_format='dummy'."""
    import tempfile

    from transformers import LlamaConfig

    path = os.path.join(tempfile.gettempdir(), f"tp-shape-{name}")
    cfg = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(path)
    return path


# -- collectives -------------------------------------------------------------------------------------
def _collectives_rank(rank: int, port: int, cases: list[dict], results) -> None:
    from engine.parallel.group import all_gather_columns, all_reduce, destroy_group, init_group

    init_group(rank, 2, f"tcp://127.0.0.1:{port}", "cuda", 600)
    for case in cases:
        bs, hidden, layers, vocab = case["batch"], case["hidden"], case["layers"], case["vocab"]
        x = torch.randn(bs, hidden, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(bs, vocab // 2, device="cuda", dtype=torch.bfloat16)

        def step(reduces: int = 2 * layers + 1, gather: bool = True) -> None:
            for _ in range(reduces):
                all_reduce(x)
            if gather:
                all_gather_columns(logits)

        timings = {}
        for label, fn in (("step", step), ("all_reduce_only", lambda: step(2 * layers + 1, False))):
            fn()  # warm (NCCL's first call sets up its communicators outside the capture)
            timings[label] = 1e6 * graph_seconds(fn, reps=20,
                                                 before_timing=lambda: torch.distributed.barrier(device_ids=[rank]))
        if rank == 0:
            results.put({**case, "step_us": timings["step"], "all_reduce_us": timings["all_reduce_only"] / (2 * layers + 1),
                         "all_gather_logits_us": timings["step"] - timings["all_reduce_only"]})
    destroy_group()


def collectives(cases: list[dict]) -> list[dict]:
    ctx = tmp.get_context("spawn")
    results = ctx.SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp.start_processes(_collectives_rank, args=(port, cases, results), nprocs=2, start_method="spawn")
    return [results.get() for _ in cases]


# -- decode --------------------------------------------------------------------------------------------
def decode(path: str, tp: int, batches: list[int], new_tokens: int, prompt_len: int, **engine) -> dict[int, dict]:
    """Per batch size: decode ms per step and tokens/s, the median of three runs."""
    from engine import LLM, SamplingParams

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    max_bs = max(batches)
    llm = LLM(path, load_format="dummy", tensor_parallel_size=tp, max_num_seqs=max_bs, cuda_graph_max_bs=max_bs,
              max_model_len=prompt_len + new_tokens + 16, enable_prefix_caching=False, **engine)
    try:
        g = torch.Generator().manual_seed(0)
        out = {}
        for bs in batches:
            ps = torch.randint(3, min(llm.engine.vocab_size, 30000), (bs, prompt_len), generator=g).tolist()

            def run(n: int) -> float:
                sync()
                t = time.perf_counter()
                res = llm.generate(ps, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
                sync()
                assert all(len(r.token_ids) == n for r in res)
                return time.perf_counter() - t

            run(8)  # warm-up
            steps = []
            for _ in range(3):
                steps.append((run(new_tokens) - run(1)) / (new_tokens - 1))
            step_s = statistics.median(steps)
            out[bs] = {"step_ms": step_s * 1e3, "tok_s": bs / step_s}
        return out
    finally:
        llm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="append the JSON lines to this file too")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--skip-70b", action="store_true")
    parser.add_argument("--skip-7b", action="store_true")
    parser.add_argument("--skip-collectives", action="store_true")
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit(f"tp_bench: needs 2 GPUs, {torch.cuda.device_count()} visible")
    from eval.bench.ceilings import ceilings

    base = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
            "NCCL_NVLS_ENABLE": os.environ["NCCL_NVLS_ENABLE"], "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    ceil = ceilings()
    emit({**base, "kind": "ceilings", **ceil}, args.out)

    seven = SHAPES["llama2-7b"]
    cases = [dict(model="llama2-7b", batch=bs, hidden=seven["hidden_size"], layers=seven["num_hidden_layers"],
                  vocab=seven["vocab_size"]) for bs in (1, 64)]
    cases.append(dict(model="llama2-70b", batch=1, hidden=LLAMA2_70B["hidden_size"], layers=LLAMA2_70B["num_hidden_layers"],
                      vocab=LLAMA2_70B["vocab_size"]))
    for record in [] if args.skip_collectives else collectives(cases):
        emit({**base, "kind": "collectives", "tp": 2, **record}, args.out)

    if not args.skip_7b:
        path = shape_dir("llama2-7b", seven)
        for tp in (1, 2):
            for bs, r in decode(path, tp, [1, 64], args.new_tokens, args.prompt_len).items():
                emit({**base, "kind": "decode", "model": "llama2-7b", "tp": tp, "batch": bs, **r}, args.out)
            gc.collect()  # the engine's weights and cache leave the GPU before the next one is built
            torch.cuda.empty_cache()

    if not args.skip_70b:
        from transformers import AutoConfig

        path = shape_dir("llama2-70b", LLAMA2_70B)
        wb = weight_bytes(AutoConfig.from_pretrained(path))
        bw = ceil["copy_bandwidth_TBps"] * 1e12
        roof_step_s = wb / (2 * bw)
        r = decode(path, 2, [1], args.new_tokens, args.prompt_len, gpu_memory_utilization=0.92)[1]
        emit({**base, "kind": "decode", "model": "llama2-70b", "tp": 2, "batch": 1, **r, "weight_bytes": wb,
              "roofline_step_ms": roof_step_s * 1e3, "roofline_tok_s": 1 / roof_step_s,
              "roofline_fraction": roof_step_s * 1e3 / r["step_ms"]}, args.out)


if __name__ == "__main__":
    main()

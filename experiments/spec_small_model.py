"""Why does a 2-layer SmolLM2-shape model decode slower than a 4-layer one at batch 1?

Issue 14 (H200, random weights, batch 1, 256 greedy tokens after 16): 4 layers 10,735 tok/s (93 us
per token; 8/15/30 layers fit 40 us + 13 us per layer), 2 layers 1,149 tok/s (870 us), yet the
2-layer model at batch 4 makes 43,080 tok/s. The missing ~205 ms per 256 tokens is either one event
inside the timed window or ~800 us on every token. Nothing in the decode path reads the layer
count except the KV pool size (sized from free memory, so KV bytes per token ~ layers gives a
2-layer model ~5M blocks of 16 tokens, 15x the 30-layer pool; and ~30 GB per cache tensor); graph
buckets, split counts (choose_num_splits: batch, KV heads, max_model_len), gemv configs, prefill
buckets and multi-step counts are the same for 2 and 4 layers. Hypotheses, most likely first
(from reading engine/, kernels/, eval/bench/ and one CPU check; no GPU was used):

  H1 a one-off inside the first timed run, which the 8-token warm-up did not trigger (a Triton
     specialisation, a cuBLAS/allocator path, the caching allocator freeing and re-allocating): one
     step of ~200 ms. Signs: steps.max_us of one kind far above its median; runs 2 and 3 fast.
  H2 the GPU's clocks: a 2-layer forward is ~15 short kernels; if the GPU sits at low SM clocks
     between short bursts, every kernel is slower. Signs: step_graph_us per forward well above
     what 4 layers take per layer pair; sm_clock_mhz median far below the boost clock.
  H3 a cost growing with the pool size, per step or one-off (the 5M-entry BlockManager: its
     construction, a Python GC pass over its 5M objects, allocator effects of 30 GB tensors).
     Signs: 2:kv_cache_tokens=65536 fast while 2 is slow. A full gc.collect() over 2M blocks takes
     0.9 s on the project's CPU box, but on CPU with Python 3.11 four timed 256-token runs with 5M
     extra block objects alive triggered no collection at all (the decode loop allocates too few
     containers), so GC itself is unlikely unless the GPU host's Python differs (3.14's incremental
     GC scans the old generation a slice at a time): gc_collections/gc_s tell, 2:gc_freeze=true confirms.
  H4 the PDL chain of a short graph (programmatic launches overlapping the embedding, norm, lm_head
     and greedy-advance kernels that do not use PDL). Signs: 2:pdl=false fast.
  H5 multi-step decoding not engaged for this model (single, host-bound steps). Signs: multi_steps
     0 in the timed runs; 2:num_decode_steps=1 as slow as 2.

For each configuration this prints one JSON line: tok/s of three consecutive timed runs (as
eval.bench decode times them), per-step wall times (max and median by step kind), Python
GC collections and their time inside each run, multi-steps taken, the pool's block count, the
time of one full gc.collect() with the engine alive, the replay time of the multi-step graph
alone, and (with pynvml) the SM clock seen during the runs. On this project's 2-core CPU box a
BlockManager of 2M blocks takes 5.3 s to build and a full collection then takes 0.9 s.

    python experiments/spec_small_model.py                      # the default configurations (< 1 min)
    python experiments/spec_small_model.py --configs 2 2:pdl=false 4:kv_cache_tokens=65536 2:gc_freeze=true
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.bench.decode_profile import StepTimer  # noqa: E402
from eval.bench.common import SHAPES, engine_options, timed
from eval.bench.common import prompts as _prompts  # noqa: E402

DEFAULT_CONFIGS = ["2", "4", "2:kv_cache_tokens=65536", "2:pdl=false", "2:gc_freeze=true", "2:num_decode_steps=1"]


def layers_dir(layers: int) -> str:
    from transformers import LlamaConfig

    path = os.path.join(tempfile.gettempdir(), f"shape-smollm2-{layers}l")
    os.makedirs(path, exist_ok=True)
    cfg = LlamaConfig(**{**SHAPES["smollm2-135m"], "num_hidden_layers": layers}, bos_token_id=1, eos_token_id=2)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(path)
    return path


class GcClock:
    """Collections and seconds spent in Python's cyclic GC while active."""

    def __init__(self) -> None:
        self.count: dict[int, int] = defaultdict(int)
        self.seconds = 0.0
        self._t = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._t
            self.count[info["generation"]] += 1

    def __enter__(self) -> "GcClock":
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)


class ClockSampler(threading.Thread):
    """SM clock (MHz) every 20 ms through pynvml, if it is installed."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[int] = []
        self.stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception:  # noqa: BLE001 - optional
            self._nvml = None

    def run(self) -> None:
        while self._nvml is not None and not self.stop.is_set():
            self.samples.append(self._nvml.nvmlDeviceGetClockInfo(self._handle, self._nvml.NVML_CLOCK_SM))
            time.sleep(0.02)


def measure(spec: str, new_tokens: int, prompt_len: int, batch: int) -> dict:
    from engine import LLM, SamplingParams

    layers_s, _, opts_s = spec.partition(":")
    opts = engine_options([o for o in opts_s.split(",") if o])
    freeze = bool(opts.pop("gc_freeze", False))
    t0 = time.perf_counter()
    llm = LLM(layers_dir(int(layers_s)), load_format="dummy", max_num_seqs=batch, cuda_graph_max_bs=batch,
              max_model_len=prompt_len + new_tokens + 16, enable_prefix_caching=False, **opts)
    build_s = time.perf_counter() - t0
    eng, runner = llm.engine, llm.engine.runner
    vocab = eng.vocab_size
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    warm = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate(_prompts(batch, prompt_len, vocab, 1000 + batch), warm)  # as eval.engine_bench warms up
    gc_objects = len(gc.get_objects())
    if freeze:
        gc.freeze()  # every object alive now (the block pool included) is never traversed again
    clocks = ClockSampler()
    clocks.start()
    runs = []
    for r in range(3):
        multi_before = eng.num_multi_steps
        with GcClock() as gcc, StepTimer(eng) as st:
            _, dt = timed(lambda: llm.generate(_prompts(batch, prompt_len, vocab, batch + r), params))
        steps = {kind: {"count": len(ts), "median_us": 1e6 * statistics.median(ts), "max_us": 1e6 * max(ts)}
                 for kind, ts in st.times.items()}
        runs.append({"tok_s": batch * new_tokens / dt, "seconds": dt, "gc_collections": dict(gcc.count),
                     "gc_s": gcc.seconds, "multi_steps": eng.num_multi_steps - multi_before, "steps": steps})
    clocks.stop.set()
    res: dict = {"config": spec, "layers": int(layers_s), "batch": batch, "build_s": build_s,
                 "kv_blocks": runner.num_blocks, "gc_objects": gc_objects, "runs": runs}
    t = time.perf_counter()
    gc.collect()  # what one full collection costs with this engine alive (H1's size of the gap)
    res["full_gc_s"] = time.perf_counter() - t
    graphs = runner.graphs
    bucket = graphs.bucket_of[batch] if graphs is not None else None
    step_graph = graphs.step_graphs.get(bucket) if bucket is not None else None
    if step_graph is not None:
        staging = runner.decode_inputs.buf.device_buf  # the decode inputs the step graph reads and advances
        saved = staging.clone()
        torch.cuda.synchronize()
        reps = 400
        t = time.perf_counter()
        for i in range(reps):
            if i % 8 == 0:  # back to the saved inputs, as a multi-step batch of 8 would start
                staging.copy_(saved, non_blocking=True)
            step_graph.replay()
        torch.cuda.synchronize()
        res["step_graph_us"] = 1e6 * (time.perf_counter() - t) / reps
    if clocks.samples:
        res["sm_clock_mhz"] = {"min": min(clocks.samples), "median": statistics.median(clocks.samples),
                               "max": max(clocks.samples)}
    if freeze:
        gc.unfreeze()
    del llm, eng, runner
    gc.collect()
    torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                    help="LAYERS[:key=value,...]: EngineConfig overrides, plus gc_freeze=true")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=50.0, help="skip the remaining configurations after this")
    args = ap.parse_args()
    start = time.perf_counter()
    for spec in args.configs:
        if time.perf_counter() - start > args.budget_s:
            print(json.dumps({"config": spec, "skipped": "time budget"}), flush=True)
            continue
        print(json.dumps(measure(spec, args.new_tokens, args.prompt_len, args.batch)), flush=True)


if __name__ == "__main__":
    main()

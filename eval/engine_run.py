"""Everything the harness measures through our engine for one model directory (or a target with
a speculative draft): task accuracy (greedy answers, and CommonsenseQA as multiple choice),
prefill/decode speed, KV capacity and memory with the planner beside it, speculative acceptance,
and latency under load. Returns the report row's
fields (flat, one number each) and the details (per-batch records, example answers)."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import torch

from eval.accuracy import engine_generate, tasks_accuracy
from eval.load import load_test
from eval.memory import engine_memory, peak_memory_MB, reset_peak_memory
from eval.multiple_choice import MultipleChoice, engine_loglikelihoods, multiple_choice_accuracy
from eval.settings import HarnessSettings
from eval.speed import engine_speed
from common.tasks import Task, TaskExample

ENGINE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def engine_options(model_dir: Path, settings: HarnessSettings, device: torch.device, dtype: str,
                   speculative_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """EngineConfig keywords from the eval.engine keys (max_model_len capped at the model's)."""
    from transformers import AutoConfig

    eng = settings.engine
    limit = int(getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", eng.max_model_len))
    seqs = eng.max_num_seqs or max([*settings.speed.batch_sizes, settings.load.concurrency, 1])
    options: dict[str, Any] = {"max_model_len": min(eng.max_model_len, limit), "max_num_seqs": seqs,
                               "device": device.type if device.index is None else str(device),
                               "dtype": ENGINE_DTYPES.get(dtype, dtype), "speculative_config": speculative_config,
                               "compressed_weights": eng.compressed_weights}
    if eng.kv_cache_tokens:
        options["kv_cache_tokens"] = eng.kv_cache_tokens
    return options


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_engine(model_dir: Path, settings: HarnessSettings, device: torch.device, dtype: str,
                   tasks: dict[str, tuple[Task, list[TaskExample]]], cqa_mc: list[MultipleChoice],
                   speculative_config: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    from engine import LLM, AsyncLLM

    options = engine_options(model_dir, settings, device, dtype, speculative_config)
    row: dict[str, Any] = {}
    details: dict[str, Any] = {"engine_options": {k: v for k, v in options.items() if v is not None}}
    reset_peak_memory(device)
    clock = [time.perf_counter()]

    def took() -> str:
        """Seconds since the last call: each line says what its part cost the run."""
        now = time.perf_counter()
        seconds, clock[0] = now - clock[0], now
        return f"[{seconds:.1f} s]"

    llm = LLM(str(model_dir), **options)
    row.update(engine_memory(llm))
    print(f"eval:   engine started {took()}")
    if settings.tasks.enabled and tasks:
        for name, result in tasks_accuracy(engine_generate(llm), llm.tokenizer, tasks).items():
            row[f"acc_{name}"] = result["accuracy"]
            details[f"task_{name}"] = result
            print(f"eval:   {name} accuracy {result['accuracy']:.3f} ({result['n']} examples)")
        print(f"eval:   tasks {took()}")
    if settings.tasks.enabled and cqa_mc:
        result = multiple_choice_accuracy(engine_loglikelihoods(llm), llm.tokenizer, cqa_mc)
        row["acc_cqa_mc"], row["acc_norm_cqa_mc"] = result["acc"], result["acc_norm"]
        details["task_cqa_mc"] = result
        print(f"eval:   cqa multiple choice acc {result['acc']:.3f}, acc_norm {result['acc_norm']:.3f} "
              f"({result['n']} questions) {took()}")
    if settings.speed.enabled:
        sp = settings.speed
        records = engine_speed(llm, sp.batch_sizes, sp.prompt_len, sp.new_tokens)
        details["engine_speed"] = records
        for r in records:
            row[f"prefill_tok_s_b{r['batch']}"] = r["prefill_tok_s"]
            row[f"decode_tok_s_b{r['batch']}"] = r["decode_tok_s"]
        print("eval:   engine decode tok/s " + ", ".join(
            f"batch {r['batch']}: {r['decode_tok_s'] or 0:.1f}" for r in records) + f" {took()}")
    spec = llm.engine.stats().get("spec_decode")
    if spec is not None:
        row["spec_acceptance_rate"] = spec["acceptance_rate"]
        row["spec_mean_accepted_length"] = spec["mean_accepted_length"]
        details["spec_decode"] = spec
    row["peak_memory_MB"] = peak_memory_MB(device)
    del llm
    _free(device)
    if settings.load.enabled:
        ld = settings.load
        async_llm = AsyncLLM(str(model_dir), **options)
        record = load_test(async_llm, ld.requests, ld.concurrency, ld.prompt_len, ld.max_tokens, ld.time_limit_s)
        print(f"eval:   load test, {ld.requests} requests {took()}")
        details["load"] = record
        for key in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
            row[key] = record[key]
        row["load_output_tok_s"] = record["output_tok_s"]
        row["load_peak_kv_MB"] = (record["peak_kv_blocks"] * record["kv_block_size"]
                                  * row["kv_bytes_per_token_measured"] / 2**20)
        del async_llm
        _free(device)
    return row, details

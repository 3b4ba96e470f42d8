"""Engine configuration: one dataclass, validated once against the model's config."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from common.paths import default_cache_dir
from engine.gguf import gguf_model_dir
from engine.layers.options import (ModelOptions, check_compressed_weights, check_int4_kernel, check_sparse24_path,
                                   check_sparse24_timing)
from engine.parallel.group import tp_rank, tp_size
from engine.spec_decode.config import SpeculativeConfig, SpeculativeConfigError
from kernels.gemv import MAX_NORM_K, SMALL_M


@dataclass
class EngineConfig:
    model: str  # a Hugging Face model directory, or a .gguf file
    # Scheduling
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192  # token budget of one step
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings (capped)
    enable_chunked_prefill: bool = True
    # KV cache
    block_size: int = 16
    enable_prefix_caching: bool = True
    num_kv_blocks: int | None = None  # explicit pool size wins over everything else
    kv_cache_tokens: int | None = None  # or a token count
    gpu_memory_utilization: float = 0.9  # or a fraction of the GPU's memory
    # Execution
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    dtype: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "float32" | "bfloat16" | "float16"
    enforce_eager: bool = False  # no CUDA graphs
    cuda_graph_max_bs: int = 256
    # Multi-step decoding: a decode step whose sequences are all plain greedy (and with no request
    # waiting) runs up to this many forwards back to back on the device, feeding each argmax into
    # the next forward there, then brings all tokens back with one sync. 1: one token per step.
    num_decode_steps: int = 8
    use_triton: bool | None = None  # None: Triton kernels on CUDA, torch references on CPU
    # Prefill attention with Triton kernels on: "triton" (one varlen launch per layer reading the
    # paged cache) or "sdpa" (torch SDPA, one call per sequence). Triton is the default: on the H100
    # the nano-vllm workload's prefill steps took 0.99 s against 11.61 s with SDPA (BENCHMARKS.md).
    prefill_attention: str = "triton"
    # Decode of at most fused_decode_rows (<= kernels.gemv.SMALL_M) sequences with Triton on: norms,
    # residual adds and SwiGLU fused into skinny-GEMM launches (engine/models/llama.py) instead of
    # cuBLAS plus separate kernels.
    fused_decode: bool = True
    # The most decode rows that take that fused path: None, timed at startup on a GPU (the largest
    # decode graph bucket up to which the fused forward beats the unfused one at every bucket:
    # engine/fused_rows.py; a Llama-2-7B shape at batch 16 decodes 1.33x faster unfused on an
    # H200), else kernels.gemv.SMALL_M (the CPU, batch_invariant, tensor parallelism); an int in
    # 0..SMALL_M pins it (0: never fused). Capped by what the weights allow (1 with 2:4 + int4).
    # Timed, two engines may choose differently (timing noise near a tie) and then their 16-bit
    # tokens may differ at those batch sizes: pin it where two engines must agree bitwise.
    fused_decode_rows: int | None = None
    # Programmatic dependent launch of the decode kernels on Hopper and newer GPUs: each launch
    # starts while the kernel before it drains and reads its weights meanwhile (kernels/gemv.py).
    # The environment variable SHRINK_PDL=0 turns it off (read here only).
    pdl: bool = True
    # Compressed (int8 / int4 / W8A8 int8) weights in the batch-1 decode GEMVs: False, the fast
    # dequantization (fp32, no per-weight rounding; kernels/gemv.py); True, the exact one, each
    # dequantized weight rounded to the activation dtype as the torch references do.
    exact_dequant: bool = False
    # Int4 weights' small-batch matmuls on a GPU (engine/layers/options.py): "triton"
    # (our GEMVs, fused into the decode kernels), "tinygemm" (torch's aten._weight_int4pack_mm,
    # unfused) or "auto" (whichever is timed faster after loading; the choice is logged).
    int4_kernel: str = "auto"
    # Weight-only compressed (int8, int4) decoder linears (engine/weight_form.py): "keep" the codes,
    # "dequantize" them once at load into dense linears (GPU memory of the 16-bit model), or "auto":
    # dequantize on the CPU; on a GPU keep the codes unless the decode forward on their dequantized
    # weights times faster at startup (a small model's launch-bound layers; the choice is logged).
    compressed_weights: str = "auto"
    # 2:4 sparse layers on a GPU (engine/layers/options.py): "auto" (the 2:4 GEMV / cuSPARSELt or a
    # dense matmul, timed per layer shape and batch size at first use; logged), "sparse" or "dense".
    sparse24_path: str = "auto"
    # How "auto" times their decode-size candidates: "eager" or "graph" (engine/layers/options.py).
    sparse24_timing: str = "eager"
    # A prefill step of at most this many tokens (and 16 sequences) replays a CUDA graph
    # (engine/cuda_graphs.py): its host cost is one replay instead of a launch per kernel. 0: off.
    prefill_graph_max_tokens: int = 512
    seed: int = 0
    # Largest logprobs / prompt_logprobs a request may ask for (as vLLM's max_logprobs); more is
    # refused when the request is added.
    max_logprobs: int = 20
    load_format: str = "safetensors"  # or "dummy": random weights (benchmarks of a model's shape)
    # Speculative decoding, as vLLM spells it: {"model": DRAFT_DIR, "num_speculative_tokens": k} or
    # {"method": "ngram", ...} (engine/spec_decode/config.py); parsed into a SpeculativeConfig here.
    speculative_config: Any = None
    # Tensor parallelism (vLLM's name): the weights split over this many GPUs of the host (NCCL),
    # or CPU processes (gloo); rank 0 is this process and schedules, workers run in lock step
    # (engine/parallel). With speculative_config the verify forward runs on every rank; the
    # drafter (a draft model, whole, or the n-gram lookup) on rank 0 only.
    tensor_parallel_size: int = 1
    # Batch invariance (vLLM's VLLM_BATCH_INVARIANT): a token's logits do not depend on how many other
    # rows share its forward, so speculative greedy output equals plain greedy output bit for bit in
    # bf16 graphs too. Every forward runs the decode kernels: one GEMV config at every row count (M = 1
    # included, the lm_head too; kernels/gemv.py), the decode attention splitting every query's
    # context as at batch 1, without PDL; a verify, a draft's catch-up and a prefill run as decode
    # pseudo-rows (spec_decode/verify_paths.py, ModelRunner._prefill_as_pseudo_rows), so prompts agree
    # however they are batched, chunked or recomputed after a preemption. Costs: the batch-1 GEMVs
    # leave their tuned CUDA-core path, a verify and a prefill read the context once per token, a
    # prefill rereads the weights per 16 tokens (experiments/batch_invariant_bench.py). Two engines
    # agree when their settings do (the split count comes from max_model_len). Needs the Triton
    # kernels, fused_decode (fused_decode_rows None or SMALL_M), one rank, and weights the fused
    # kernels read (dense, int8 per channel, int4 on Triton, W8A8 int8; compressed weights take the
    # exact dequantization).
    # On the H200 its graphed runs equal its eager ones bitwise (BENCHMARKS.md, tenth session).
    batch_invariant: bool = False

    hf_config: PretrainedConfig | None = None

    def __post_init__(self) -> None:
        self.model = os.fspath(self.model)
        if self.model.endswith(".gguf") and os.path.isfile(self.model):
            # Dequantized once into the cache ($SHRINK_CACHE_DIR), then loaded as that directory.
            self.model = str(gguf_model_dir(self.model, default_cache_dir()))
        if not os.path.isdir(self.model):
            raise ValueError(f"model: {self.model!r} is neither a directory with config.json nor a .gguf file")
        if self.hf_config is None and not os.path.isfile(os.path.join(self.model, "config.json")):
            raise ValueError(f"model: {self.model} has no config.json (a Hugging Face model directory needs one)")
        if self.hf_config is None:
            self.hf_config = AutoConfig.from_pretrained(self.model)
        limit = int(getattr(self.hf_config, "max_position_embeddings", 4096))
        if self.max_model_len is None:
            self.max_model_len = min(limit, 4096)
        if self.max_model_len > limit:
            raise ValueError(f"max_model_len: {self.max_model_len} exceeds the model's {limit}")
        self.pdl = bool(self.pdl) and os.environ.get("SHRINK_PDL", "1") != "0"
        if self.block_size < 1:
            raise ValueError("block_size: must be >= 1")
        if not isinstance(self.num_decode_steps, int) or self.num_decode_steps < 1:
            raise ValueError(f"num_decode_steps: must be an integer >= 1, got {self.num_decode_steps!r}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            # Without chunking a prompt of max_model_len tokens must fit one step.
            raise ValueError("max_num_batched_tokens: must be >= max_model_len without chunked prefill")
        if self.max_num_batched_tokens < self.max_num_seqs:
            self.max_num_seqs = self.max_num_batched_tokens
        if not isinstance(self.prefill_graph_max_tokens, int) or self.prefill_graph_max_tokens < 0:
            raise ValueError(f"prefill_graph_max_tokens: must be an integer >= 0, got {self.prefill_graph_max_tokens!r}")
        if self.prefill_attention not in ("sdpa", "triton"):
            raise ValueError(f"prefill_attention: {self.prefill_attention!r} is not 'sdpa' or 'triton'")
        rows = self.fused_decode_rows
        if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or not 0 <= rows <= SMALL_M):
            raise ValueError(f"fused_decode_rows: must be None (timed at startup) or an integer in 0..{SMALL_M}, "
                             f"got {rows!r}")
        check_int4_kernel(self.int4_kernel)
        check_compressed_weights(self.compressed_weights)
        check_sparse24_path(self.sparse24_path)
        check_sparse24_timing(self.sparse24_timing)
        if self.load_format not in ("safetensors", "dummy"):
            raise ValueError(f"load_format: {self.load_format!r} is not 'safetensors' or 'dummy'")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < 0:
            raise ValueError(f"max_logprobs: must be an integer >= 0, got {self.max_logprobs!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization: must be in (0, 1]")
        self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
        self._check_tensor_parallel()
        self._check_batch_invariant()

    def _check_batch_invariant(self) -> None:
        if not isinstance(self.batch_invariant, bool):
            raise ValueError(f"batch_invariant: must be True or False, got {self.batch_invariant!r}")
        if not self.batch_invariant:
            return
        why = None
        if not self.triton_enabled:
            why = "needs the Triton kernels (use_triton; on the CPU use_triton=True runs them interpreted)"
        elif not self.fused_decode:
            why = "needs fused_decode (the batch-invariant matmuls are the fused decode kernels)"
        elif self.fused_decode_rows is not None and self.fused_decode_rows < SMALL_M:
            why = (f"needs the fused decode at every row count, not fused_decode_rows={self.fused_decode_rows} "
                   f"(leave it None or {SMALL_M})")
        elif self.tensor_parallel_size > 1:
            why = "not under tensor parallelism (the all-reduce's algorithm may change with the message size)"
        elif self.int4_kernel == "tinygemm":
            why = "int4_kernel 'tinygemm' is not batch-invariant (use 'triton' or 'auto')"
        elif self.hf_config.hidden_size > MAX_NORM_K:
            why = f"hidden_size {self.hf_config.hidden_size} exceeds the fused kernels' {MAX_NORM_K}"
        if why:
            raise ValueError(f"batch_invariant: {why}")

    def _check_tensor_parallel(self) -> None:
        tp, hf = self.tensor_parallel_size, self.hf_config
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"tensor_parallel_size: must be an integer >= 1, got {tp!r}")
        if tp == 1:
            return
        spec = self.speculative_config
        if spec is not None and spec.method == "medusa":
            raise SpeculativeConfigError(
                "method", f"'medusa' with tensor_parallel_size={tp}: the heads draft through the target's LM "
                "head, which tensor parallelism splits over the ranks; Medusa runs on one rank")
        heads = hf.num_attention_heads
        kv_heads = getattr(hf, "num_key_value_heads", None) or heads
        if heads % tp:
            raise ValueError(f"tensor_parallel_size: {tp} does not divide the model's {heads} attention heads")
        if kv_heads % tp and tp % kv_heads:
            raise ValueError(f"tensor_parallel_size: {tp} and the model's {kv_heads} KV heads: one must divide the other")
        if hf.intermediate_size % tp:
            raise ValueError(f"tensor_parallel_size: {tp} does not divide the model's intermediate_size {hf.intermediate_size}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device: {self.device!r} with tensor_parallel_size={tp}; rank r runs on cuda:r, "
                             "pass 'cuda' (or 'cpu' for gloo processes)")
        if self.torch_device.type == "cuda" and tp > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size: {tp} exceeds the {torch.cuda.device_count()} visible CUDA device(s)")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]

    @property
    def triton_enabled(self) -> bool:
        if self.use_triton is None:
            return self.torch_device.type == "cuda"
        return self.use_triton

    def model_options(self) -> ModelOptions:
        """The engine constants the model is built with."""
        if self.tensor_parallel_size > 1 and tp_size() != self.tensor_parallel_size:
            raise RuntimeError(f"tensor_parallel_size={self.tensor_parallel_size}: this process is in a group of "
                               f"{tp_size()} rank(s); the model runner starts the group (engine/parallel)")
        invariant = self.batch_invariant  # the fast dequantization and tinygemm are not batch-invariant
        return ModelOptions(use_triton=self.triton_enabled, fused_decode=self.fused_decode, pdl=self.pdl,
                            exact_dequant=self.exact_dequant or invariant,
                            int4_kernel="triton" if invariant else self.int4_kernel, batch_invariant=invariant,
                            compressed_weights=self.compressed_weights,
                            sparse24_path=self.sparse24_path, sparse24_timing=self.sparse24_timing,
                            block_size=self.block_size,
                            max_model_len=self.max_model_len,
                            tp_rank=tp_rank() if self.tensor_parallel_size > 1 else 0,
                            tp_size=self.tensor_parallel_size)

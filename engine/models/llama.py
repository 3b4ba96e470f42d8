"""The Llama family: Llama 2/3, Mistral, Qwen2 (qkv bias), Qwen3 (q/k RMSNorm), SmolLM2, TinyLlama.

Same math as transformers' implementations; q/k/v and gate/up projections are fused into one
matmul each (fewer, larger GEMMs), and attention goes through the paged cache.

Small-batch decode with Triton on (``fused_decode``) runs each layer in fewer launches: at batch
1-16 a step is a chain of tiny kernels whose launch and setup cost more than their bytes. The
input RMSNorm rides in the qkv matmul, whose epilogue also applies the rotary embedding and
stores k, v into the paged cache (not for Qwen3: its q/k norms come before the rotation); the
o_proj and down_proj outputs are added into the residual stream by their matmuls, and the
post-attention norm and SwiGLU ride in the gate_up matmul (kernels/gemv.py). The residual stream
is one tensor there: the values reaching each matmul are those of the (x, residual) pair of the
unfused path.

Tensor parallelism (``options.tp_size`` ranks, engine/layers/linear.py): qkv_proj and gate_up_proj
are column-parallel (each rank's heads and channels), o_proj and down_proj row-parallel with one
all-reduce after each, the embedding and lm_head split over the vocabulary. Each rank holds its
query heads and their KV heads in its own cache; with fewer KV heads than ranks each KV head is
replicated on the ranks whose query heads read it, as vLLM does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from kernels import decode_gemv
from kernels import gemv as gemv_kernels
from kernels import rotary as rotary_kernels

from engine.context import get_context
from engine.layers.activation import silu_and_mul
from engine.layers.attention import Attention
from engine.layers.linear import (ParallelLMHead, RowParallelLinear, VocabParallelEmbedding, row_parallel_gemv_add,
                                  shard_range, vocab_range)
from engine.layers.int4_kernel import choose_int4_kernels
from engine.layers.options import ModelOptions
from engine.layers.quantized import CompressedLinear, fused_decode_rows, gemv_weight
from engine.layers.rmsnorm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, rope_parameters
from engine.loader import LinearSource, copy_tensors, load_checkpoint
from engine.weight_form import load_compressed


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _num_kv_heads(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def kv_head_range(num_kv_heads: int, rank: int, ranks: int) -> range:
    """The KV heads rank ``rank`` holds: its share, or with fewer KV heads than ranks the one its
    query heads read (rank // (ranks / kv_heads))."""
    if num_kv_heads >= ranks:
        return shard_range(num_kv_heads, rank, ranks)
    head = rank * num_kv_heads // ranks
    return range(head, head + 1)


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, rotary: RotaryEmbedding, options: ModelOptions) -> None:
        super().__init__()
        rank, ranks = options.tp_rank, options.tp_size
        self.head_dim = _head_dim(config)
        # This rank's heads (EngineConfig checked that they divide evenly).
        self.q_heads = shard_range(config.num_attention_heads, rank, ranks)
        self.kv_heads = kv_head_range(_num_kv_heads(config), rank, ranks)
        self.num_heads, self.num_kv_heads = len(self.q_heads), len(self.kv_heads)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        model_type = config.model_type
        bias = bool(getattr(config, "attention_bias", False)) or model_type == "qwen2"
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = RowParallelLinear(self.q_size, config.hidden_size, bool(getattr(config, "attention_bias", False)),
                                        rank)
        self.qk_norm = model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, options.use_triton)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, options.use_triton)
        self.rotary = rotary
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, options)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.attend(positions, self.qkv_proj(x)))

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """Attention from the fused qkv projection, up to (not including) o_proj."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        if self.attn.use_triton:  # one kernel: rotate q, k and store k, v in the cache
            rotary_kernels.rope_store(q, k, v, positions, self.rotary.cos, self.rotary.sin,
                              self.attn.k_cache, self.attn.v_cache, get_context().slot_mapping)
            return self.attn(q, k, v, kv_stored=True)
        q, k = self.rotary(positions, q, k)
        return self.attn(q, k, v)


    def fuse_rope_store(self) -> bool:
        """Whether the small-batch decode can rotate and store k, v in the qkv launch: not with
        Qwen3's q/k norms (they need whole heads before the rotation), nor without a cache."""
        return not self.qk_norm and self.attn.k_cache.numel() > 0

    def attend_fused(self, positions: torch.Tensor, h: torch.Tensor, norm: RMSNorm, pdl: bool,
                     batch_invariant: bool = False) -> torch.Tensor:
        """attend() of the normed qkv projection of the residual stream h in one launch before
        attention: norm prologue, qkv matmul (+ bias), rotary, k/v into the cache (kernels/gemv.py)."""
        weight, quant = gemv_weight(self.qkv_proj)
        q = decode_gemv.gemv_rope_store(
            h, weight, self.qkv_proj.bias, **quant, norm_weight=norm.weight, eps=norm.eps,
            positions=positions, cos_table=self.rotary.cos, sin_table=self.rotary.sin,
            k_cache=self.attn.k_cache, v_cache=self.attn.v_cache, slot_mapping=get_context().slot_mapping,
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, pdl=pdl, batch_invariant=batch_invariant,
        )
        q = q.view(-1, self.num_heads, self.head_dim)
        return self.attn(q, None, None, kv_stored=True)  # decode reads k, v from the cache only


class LlamaMLP(nn.Module):
    def __init__(self, config: Any, options: ModelOptions) -> None:
        super().__init__()
        self.use_triton = options.use_triton
        bias = bool(getattr(config, "mlp_bias", False))
        self.channels = shard_range(config.intermediate_size, options.tp_rank, options.tp_size)
        inter = len(self.channels)
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * inter, bias=bias)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias, options.tp_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x), self.use_triton))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, rotary: RotaryEmbedding, options: ModelOptions) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary, options)
        self.mlp = LlamaMLP(config, options)
        self.tp_rank = options.tp_rank
        self.batch_invariant = options.batch_invariant
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, options.use_triton)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, options.use_triton)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual

    def forward_fused(self, positions: torch.Tensor, h: torch.Tensor, pdl: bool = True) -> torch.Tensor:
        """The small-batch decode layer: h is the whole residual stream (the unfused path's
        x + residual), updated in place by the o_proj and down_proj epilogues. Four matmul launches
        replace two norms, four GEMMs, the SwiGLU and (but for Qwen3) the rotary + k/v store. The
        weights may be dense, int8, int4 (dequantized in the kernels' registers), W8A8 int8 (the
        input quantized per token in the prologue) or, at one row only, 2:4 + int4: gemv_weight.
        ``pdl``: programmatic dependent launch where the GPU has it. In batch-invariant mode every
        launch is the GEMVs' batch-invariant one, at any number of rows."""
        gemv = decode_gemv.gemv
        attn, mlp, inv = self.self_attn, self.mlp, self.batch_invariant
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        if attn.fuse_rope_store():
            o = attn.attend_fused(positions, h, norm1, pdl, inv)
        else:
            weight, quant = gemv_weight(attn.qkv_proj)
            qkv = gemv(h, weight, attn.qkv_proj.bias, **quant, norm_weight=norm1.weight, eps=norm1.eps, pdl=pdl,
                       batch_invariant=inv)
            o = attn.attend(positions, qkv)
        row_parallel_gemv_add(attn.o_proj, o, h, self.tp_rank, pdl, inv)
        weight, quant = gemv_weight(mlp.gate_up_proj)
        act = gemv(h, weight, mlp.gate_up_proj.bias, **quant, norm_weight=norm2.weight, eps=norm2.eps,
                   swiglu=True, pdl=pdl, batch_invariant=inv)
        return row_parallel_gemv_add(mlp.down_proj, act, h, self.tp_rank, pdl, inv)


class LlamaModel(nn.Module):
    def __init__(self, config: Any, max_position: int, options: ModelOptions) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, options.tp_rank,
                                                   options.tp_size)
        rotary = RotaryEmbedding(_head_dim(config), max_position, rope_parameters(config))
        self.rotary = rotary
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, rotary, options) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, options.use_triton)
        self.fused_decode = options.fused_decode and options.use_triton
        self.batch_invariant = options.batch_invariant
        self.pdl = options.pdl
        self.fusable = True  # load_weights: every decoder linear is one the fused decode kernels read
        self.fused_rows = gemv_kernels.SMALL_M  # load_weights: the most rows they take (1 with 2:4 + int4)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        # Batch-invariant mode: every decode and verify forward, whatever its rows (one GEMV config).
        rows_fit = h.shape[0] <= self.fused_rows or self.batch_invariant
        if (self.fused_decode and self.fusable and not get_context().is_prefill
                and rows_fit and h.shape[1] <= gemv_kernels.MAX_NORM_K):
            for layer in self.layers:
                h = layer.forward_fused(positions, h, self.pdl)
            return self.norm(h)
        residual = None
        for layer in self.layers:
            h, residual = layer(positions, h, residual)
        h, _ = self.norm(h, residual)
        return h


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: Any, max_position: int | None = None, options: ModelOptions = ModelOptions()) -> None:
        super().__init__()
        self.config = config
        self.options = options
        max_position = max_position or int(getattr(config, "max_position_embeddings", 4096))
        self.model = LlamaModel(config, max_position, options)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, options.tp_rank, options.tp_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.options.batch_invariant:  # cuBLAS may pick another kernel (split-K) per row count
            weight, quant = gemv_weight(self.lm_head)
            return gemv_kernels.gemv(hidden, weight, **quant, pdl=self.options.pdl, batch_invariant=True)
        return self.lm_head(hidden)

    # -- loading -------------------------------------------------------------------------------
    def linear_shards(self) -> dict[str, LinearSource]:
        """Each of our linears -> the checkpoint linears it holds (q, k, v in qkv_proj; gate, up in
        gate_up_proj), with the rows and input columns of each that this tensor-parallel rank
        keeps. A tied lm_head is the embedding."""
        cfg = self.config
        hidden, head_dim = cfg.hidden_size, _head_dim(cfg)
        q_rows, kv_rows = cfg.num_attention_heads * head_dim, _num_kv_heads(cfg) * head_dim

        def dims(heads: range) -> range:
            return range(heads.start * head_dim, heads.stop * head_dim)

        shards = {}
        for name, mod in self.named_modules():
            if not isinstance(mod, nn.Linear) or (name == "lm_head" and self.tie_word_embeddings):
                continue
            prefix, _, leaf = name.rpartition(".")
            parent = self.get_submodule(prefix) if prefix else self
            if leaf == "qkv_proj":
                q, kv = dims(parent.q_heads), dims(parent.kv_heads)
                parts = [(f"{prefix}.q_proj", q_rows, q), (f"{prefix}.k_proj", kv_rows, kv), (f"{prefix}.v_proj", kv_rows, kv)]
                shards[name] = LinearSource(parts, hidden)
            elif leaf == "gate_up_proj":
                inter, ch = cfg.intermediate_size, parent.channels
                shards[name] = LinearSource([(f"{prefix}.gate_proj", inter, ch), (f"{prefix}.up_proj", inter, ch)], hidden)
            elif leaf == "o_proj":
                shards[name] = LinearSource.whole(name, hidden, q_rows, columns=dims(parent.q_heads))
            elif leaf == "down_proj":
                shards[name] = LinearSource.whole(name, hidden, cfg.intermediate_size, columns=parent.channels)
            elif name == "lm_head":
                rows = vocab_range(cfg.vocab_size, self.options.tp_rank, self.options.tp_size)
                shards[name] = LinearSource([(name, cfg.vocab_size, rows)], hidden)
            else:
                shards[name] = LinearSource.whole(name, mod.out_features, mod.in_features)
        return shards

    def param_rows(self) -> dict[str, tuple[int, range]]:
        """Parameters (other than linears) split over the tensor-parallel ranks by rows: name ->
        (rows in the checkpoint, the rows this rank keeps)."""
        vocab = self.config.vocab_size
        return {"model.embed_tokens.weight": (vocab, vocab_range(vocab, self.options.tp_rank, self.options.tp_size))}

    @torch.no_grad()
    def init_dummy_weights(self, std: float = 0.02) -> None:
        """Random weights of the right shapes, made on the parameters' device (for benchmarks)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)

    def load_weights(self, path: str, keep_compressed: bool | None = None) -> None:
        """Load a Hugging Face / compressed-tensors checkpoint, verified: every parameter exactly
        once with its shape, or one error listing what is missing, unexpected or mis-shaped.
        Compressed linears stay compressed (engine/layers/quantized.py) where `keep_compressed`
        (default: options.compressed_weights, whose "auto" keeps them on a GPU: engine/weight_form.py); otherwise
        weight-only schemes are dequantized once into the dense linears (W8A8 keeps its module: its
        activations are quantized at run time)."""
        if keep_compressed is None:
            keep_compressed = load_compressed(self.options.compressed_weights, self.lm_head.weight.device)
        tolerated = {"lm_head.weight"} if self.tie_word_embeddings else set()
        load_checkpoint(self, path, self.linear_shards(), tolerated, keep_compressed, self.options, self.param_rows())
        self.update_fusable()

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy a live Hugging Face model's dense tensors (its `named_parameters()`) into this model
        in place, mapped and verified as `load_weights` maps a checkpoint (every parameter exactly
        once, shapes checked, one error otherwise); the storage stays, so captured CUDA graphs replay
        the new weights."""
        if self.options.tp_size > 1:
            raise NotImplementedError("update_weights: not under tensor parallelism (the workers hold the shards)")
        tolerated = {"lm_head.weight"} if self.tie_word_embeddings else set()
        copy_tensors(self, named_tensors, self.linear_shards(), tolerated, self.options, self.param_rows())

    def update_fusable(self) -> None:
        """After linears were swapped: int4 linears set up for their kernel (triton / tinygemm:
        engine/layers/int4_kernel.py), then the fused small-batch decode runs only when its
        kernels can read every decoder linear (dense, int8 per channel, int4 on Triton, W8A8 int8; 2:4 +
        int4 on its fast GEMV at batch 1 only, 16-bit: fused_decode_rows)."""
        dtype = self.model.embed_tokens.weight.dtype
        choose_int4_kernels(self, dtype)  # lm_head may be compressed
        self.update_fused_rows()
        if self.options.batch_invariant:  # every linear, the lm_head too, must be the GEMVs'
            unread = next((f"{name} ({type(m).__name__})" for name, m in self.named_modules()
                           if isinstance(m, (nn.Linear, CompressedLinear)) and gemv_weight(m) is None), None)
            if unread is not None:
                raise ValueError(f"batch_invariant: {unread} is a format the batch-invariant GEMVs do not read "
                                 "(dense, int8 per channel, int4 on Triton and W8A8 int8 are)")

    def update_fused_rows(self) -> None:
        """The most decode rows the fused kernels may take with the decoder linears as they are now
        (0: not fusable), the cap engine/fused_rows.py times within."""
        linears = (m for m in self.model.layers.modules() if isinstance(m, (nn.Linear, CompressedLinear)))
        rows = fused_decode_rows(linears, self.model.embed_tokens.weight.dtype)
        self.model.fusable, self.model.fused_rows = rows > 0, rows

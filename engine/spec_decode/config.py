"""``speculative_config`` as vLLM users write it, parsed and checked before any work.

    {"model": DRAFT_PATH, "num_speculative_tokens": 4}                     (method "draft_model")
    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    {"method": "medusa", "model": HEADS_DIR, "num_speculative_tokens": 3}

Methods: ``draft_model`` (a small model of the target's vocabulary drafts with its own KV cache:
draft_model.py), ``ngram`` (prompt lookup, no model: ngram.py) and ``medusa`` (heads on the
target's own last hidden state, common/medusa.py's artifact: medusa.py; k at most the artifact's
num_heads; no dtype (the target's), num_rounds, draft_vocab_size or draft_tensor_parallel_size, and
one rank: its drafts need the target's LM head whole on rank 0).

Under tensor parallelism (``tensor_parallel_size`` > 1) the target is sharded and a draft model runs
whole on rank 0 (``draft_tensor_parallel_size`` 1, vLLM's key; the only value taken: a small
drafter gains nothing from sharding, and one draft rank needs no draft steps sent to the workers).

``draft_vocab_size`` N (a draft model only): its LM head keeps the N most frequent tokens of the
frequency file beside it and the special tokens (engine/spec_decode/draft_vocab.py).

Optional keys: ``num_speculative_tokens_per_batch_size`` ({max batch size: k}; k 0 turns speculation
off for those batches; batches larger than every key run without it; or ``"auto"``: k chosen per
decode step, up to num_speculative_tokens, from step costs the engine measures at startup and the
acceptance it observes, 0 where speculation does not pay: policy.py; without the key k is
num_speculative_tokens at every batch size, as vLLM reads a config), ``max_batch_size`` (decode
batches of more sequences run without speculation; default DEFAULT_MAX_BATCH_SIZE) and ``dtype`` (the draft
model's, as EngineConfig.dtype spells it).

``num_rounds`` R (a draft model or n-gram; default 1): a decode step at k = num_speculative_tokens whose
sequences are all plain greedy runs R draft + verify rounds back to back on the device, with one
host sync at the end (engine/spec_decode/rounds.py); other steps, a smaller k, and R = 1 speculate
one round. With ``auto`` the policy chooses per step between plain decoding, such a step of R rounds
(its cost measured at startup per round) and one round at a smaller k (policy.py). Medusa takes no
num_rounds. Every bad key or value raises SpeculativeConfigError naming the key.
``check_same_vocabulary`` verifies a draft can verify against the target at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from common.errors import ShrinkError
from common.medusa import ARCHITECTURE as MEDUSA_ARCHITECTURE
from common.medusa import is_medusa_dir
from engine.tokenizer import load_tokenizer

METHODS = ("draft_model", "ngram", "medusa")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_KEYS = {
    "draft_model": {"method", "model", "num_speculative_tokens", "num_speculative_tokens_per_batch_size", "dtype",
                    "max_batch_size", "draft_tensor_parallel_size", "draft_vocab_size", "num_rounds"},
    "ngram": {"method", "num_speculative_tokens", "num_speculative_tokens_per_batch_size", "prompt_lookup_min",
              "prompt_lookup_max", "max_batch_size", "num_rounds"},
    "medusa": {"method", "model", "num_speculative_tokens", "num_speculative_tokens_per_batch_size",
               "max_batch_size"},
}
# Decode batches larger than this run without speculation unless ``max_batch_size`` says otherwise:
# decode at large batch is compute-bound, so verifying k + 1 tokens per sequence costs about k + 1
# decode steps there and speculation cannot pay.
DEFAULT_MAX_BATCH_SIZE = 16
# num_speculative_tokens_per_batch_size's value for a measured policy (policy.py).
AUTO = "auto"
# vLLM's default n-gram window when neither bound is given.
DEFAULT_PROMPT_LOOKUP = 5


class SpeculativeConfigError(ShrinkError, ValueError):
    """A bad speculative_config key or value, or a draft that cannot serve the target."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"speculative_config.{key}: {message}")


def _positive_int(key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpeculativeConfigError(key, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _rounds(raw: Mapping[str, Any]) -> int:
    """num_rounds (default 1)."""
    return _positive_int("num_rounds", raw.get("num_rounds", 1))


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str  # "draft_model" | "ngram" | "medusa"
    num_speculative_tokens: int
    model: str | None = None  # draft model directory (method draft_model), heads directory (medusa)
    dtype: str = "auto"  # the draft model's dtype
    prompt_lookup_min: int | None = None  # ngram only
    prompt_lookup_max: int | None = None
    # Sorted (max batch size, k) pairs; empty: k = num_speculative_tokens at every batch size.
    k_by_batch_size: tuple[tuple[int, int], ...] = field(default=())
    # num_speculative_tokens_per_batch_size "auto": the engine's SpecPolicy chooses k per step (at
    # most num_speculative_tokens); k_for_step is then only its upper bound.
    auto: bool = False
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    draft_vocab_size: int | None = None  # the draft model's LM head rows (None: the whole vocabulary)
    num_rounds: int = 1  # device-resident greedy rounds per decode step (rounds.py); 1: one round

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> SpeculativeConfig | None:
        """None (no speculation) for None; else the parsed config, or SpeculativeConfigError."""
        if raw is None:
            return None
        if isinstance(raw, SpeculativeConfig):
            return raw
        if not isinstance(raw, Mapping):
            raise SpeculativeConfigError("", f"expected a dict, got {type(raw).__name__}")
        for key in raw:
            if not isinstance(key, str):
                raise SpeculativeConfigError(str(key), "keys must be strings")
        method = raw.get("method")
        if method is None:
            if "model" not in raw:
                raise SpeculativeConfigError("method", "give 'model' (a draft model directory) or method 'ngram'")
            method = "draft_model"
        if method not in METHODS:
            raise SpeculativeConfigError("method", f"{method!r} is not one of {list(METHODS)}")
        unknown = sorted(set(raw) - _KEYS[method])
        if unknown:
            raise SpeculativeConfigError(
                unknown[0], f"unknown key for method {method!r}; allowed: {sorted(_KEYS[method])}")
        if "num_speculative_tokens" not in raw:
            raise SpeculativeConfigError("num_speculative_tokens", "is required")
        k = _positive_int("num_speculative_tokens", raw["num_speculative_tokens"])
        auto = raw.get("num_speculative_tokens_per_batch_size") == AUTO
        policy = () if auto else _parse_policy(raw.get("num_speculative_tokens_per_batch_size"), k)
        max_bs = _positive_int("max_batch_size", raw.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE))
        if method == "ngram":
            lo, hi = raw.get("prompt_lookup_min"), raw.get("prompt_lookup_max")
            if lo is None and hi is None:
                lo = hi = DEFAULT_PROMPT_LOOKUP
            lo = _positive_int("prompt_lookup_min", lo if lo is not None else hi)
            hi = _positive_int("prompt_lookup_max", hi if hi is not None else lo)
            if hi < lo:
                raise SpeculativeConfigError("prompt_lookup_max", f"{hi} is below prompt_lookup_min {lo}")
            return cls("ngram", k, prompt_lookup_min=lo, prompt_lookup_max=hi, k_by_batch_size=policy,
                       max_batch_size=max_bs, auto=auto, num_rounds=_rounds(raw))
        model = raw.get("model")
        what = "a Medusa heads directory" if method == "medusa" else "a draft model directory"
        if not isinstance(model, str) or not model:
            raise SpeculativeConfigError("model", f"must be {what}, got {model!r}")
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise SpeculativeConfigError("model", f"{model!r} is not a directory with config.json")
        if (method == "medusa") != is_medusa_dir(model):
            raise SpeculativeConfigError("model", f"{model!r} holds Medusa heads: give method 'medusa'"
                                         if method != "medusa" else f"{model!r} is not a Medusa heads directory "
                                         f"(its config.json's architectures do not name {MEDUSA_ARCHITECTURE!r})")
        if method == "medusa":  # the heads' fit to the target is checked against it (medusa.load_medusa_heads)
            return cls("medusa", k, model=model, k_by_batch_size=policy, max_batch_size=max_bs, auto=auto)
        dtype = raw.get("dtype", "auto")
        if dtype not in DTYPES:
            raise SpeculativeConfigError("dtype", f"{dtype!r} is not one of {list(DTYPES)}")
        draft_tp = raw.get("draft_tensor_parallel_size", 1)
        if draft_tp != 1 or isinstance(draft_tp, bool):
            raise SpeculativeConfigError(
                "draft_tensor_parallel_size", f"{draft_tp!r}: the draft model runs unsharded on rank 0 of the "
                "target's tensor_parallel_size ranks; only 1 is supported")
        # Its range against the vocabulary and the frequency file are checked at load (draft_vocab.py).
        vocab_size = raw.get("draft_vocab_size")
        vocab_size = _positive_int("draft_vocab_size", vocab_size, 2) if vocab_size is not None else None
        return cls("draft_model", k, model=model, dtype=dtype, k_by_batch_size=policy, max_batch_size=max_bs,
                   auto=auto, draft_vocab_size=vocab_size, num_rounds=_rounds(raw))

    def k_for_batch(self, batch_size: int) -> int:
        """Draft tokens per sequence for a decode batch of ``batch_size`` sequences; 0: decode plainly."""
        if not self.k_by_batch_size:
            return self.num_speculative_tokens
        for max_bs, k in self.k_by_batch_size:
            if batch_size <= max_bs:
                return k
        return 0

    def k_for_step(self, batch_size: int) -> int:
        """k for a decode step of ``batch_size`` sequences: the policy's, and 0 above max_batch_size."""
        return 0 if batch_size > self.max_batch_size else self.k_for_batch(batch_size)


def _parse_policy(raw: Any, k_max: int) -> tuple[tuple[int, int], ...]:
    key = "num_speculative_tokens_per_batch_size"
    if raw is None:
        return ()
    if not isinstance(raw, Mapping) or not raw:
        raise SpeculativeConfigError(key, f"must be {AUTO!r} or a non-empty dict {{max batch size: k}}, got {raw!r}")
    pairs: dict[int, int] = {}
    for bs_raw, k in raw.items():
        bs = int(bs_raw) if isinstance(bs_raw, str) and bs_raw.isdigit() else bs_raw  # JSON keys are strings
        bs = _positive_int(f"{key}[{bs_raw!r}]", bs)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= k_max:
            raise SpeculativeConfigError(
                f"{key}[{bs_raw!r}]", f"k must be an integer in [0, num_speculative_tokens={k_max}], got {k!r}")
        if bs in pairs:
            raise SpeculativeConfigError(f"{key}[{bs_raw!r}]", f"batch size {bs} given twice")
        pairs[bs] = k
    return tuple(sorted(pairs.items()))


# -- the draft must speak the target's vocabulary ----------------------------------------------------
SPECIAL_TOKEN_ATTRS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
VOCAB_SAMPLE = 1024  # token ids compared, evenly spaced over the vocabulary (plus every special token)


def check_same_vocabulary(target_config: Any, target_tokenizer: Any, draft_config: Any, draft_tokenizer: Any,
                          sample: int = VOCAB_SAMPLE) -> None:
    """Raise SpeculativeConfigError (key ``model``) unless the draft's logits index the same tokens
    as the target's: equal vocab_size and special-token ids in the configs and, when both have
    tokenizers, the same token strings at ``sample`` evenly spaced ids below vocab_size and at every
    special token's id. Tokens a tokenizer adds past vocab_size are never logits, so they may differ."""
    vocab, dv = int(target_config.vocab_size), int(draft_config.vocab_size)
    if vocab != dv:
        raise SpeculativeConfigError("model", f"the draft's vocab_size {dv} differs from the target's {vocab}")
    for attr in SPECIAL_TOKEN_ATTRS:
        t, d = getattr(target_config, attr, None), getattr(draft_config, attr, None)
        if t is not None and d is not None and _as_set(t) != _as_set(d):
            raise SpeculativeConfigError("model", f"the draft's {attr} {d!r} differs from the target's {t!r}")
    if target_tokenizer is None or draft_tokenizer is None:
        return
    n, nd = min(len(target_tokenizer), vocab), min(len(draft_tokenizer), vocab)
    if n != nd:
        raise SpeculativeConfigError(
            "model", f"the draft's tokenizer names {nd} of the {vocab} token ids, the target's {n}")
    step = max(1, n // max(1, sample))
    ids = set(range(0, n, step)) | {n - 1}
    for tok in (target_tokenizer, draft_tokenizer):
        ids |= {i for i in getattr(tok, "all_special_ids", []) if 0 <= i < n}
    ordered = sorted(ids)
    t_tokens = target_tokenizer.convert_ids_to_tokens(ordered)
    d_tokens = draft_tokenizer.convert_ids_to_tokens(ordered)
    for i, t, d in zip(ordered, t_tokens, d_tokens):
        if t != d:
            raise SpeculativeConfigError("model", f"token id {i} is {d!r} for the draft but {t!r} for the target")
    for attr in SPECIAL_TOKEN_ATTRS:
        t, d = getattr(target_tokenizer, attr, None), getattr(draft_tokenizer, attr, None)
        if t is not None and d is not None and t < vocab and t != d:
            raise SpeculativeConfigError("model", f"the draft tokenizer's {attr} {d!r} differs from the target's {t!r}")


def _as_set(value: Any) -> frozenset:
    return frozenset(value) if isinstance(value, (list, tuple)) else frozenset([value])


def draft_engine_config(target: Any, target_tokenizer: Any, spec: SpeculativeConfig,
                        num_kv_blocks: int | None = None) -> Any:
    """The EngineConfig of the draft model's runner, after checking that the draft can serve the
    target: same vocabulary (check_same_vocabulary) and room for the target's max_model_len
    positions. Scheduling, block size, prefix caching and execution settings are the target's
    (the draft's cache is indexed by the sequences' block tables), but one rank: under tensor
    parallelism the draft runs whole on rank 0 (engine/parallel/group.py's group_for).
    ``num_kv_blocks`` is the target's pool size, so that every block id of a table exists in both
    caches. Weights load as the target's do (load_format: random weights of the draft's shape in a
    benchmark of shapes)."""
    from dataclasses import fields, replace

    from transformers import AutoConfig

    if spec.method != "draft_model" or spec.model is None:
        raise SpeculativeConfigError("method", f"{spec.method!r} has no draft model")
    try:
        hf = AutoConfig.from_pretrained(spec.model)
    except (OSError, ValueError) as e:
        raise SpeculativeConfigError("model", f"cannot read the draft's config.json in {spec.model!r}: {e}") from None
    check_same_vocabulary(target.hf_config, target_tokenizer, hf, load_tokenizer(spec.model))
    limit = int(getattr(hf, "max_position_embeddings", 4096))
    if limit < target.max_model_len:
        raise SpeculativeConfigError(
            "model", f"the draft has {limit} positions (max_position_embeddings), the target's max_model_len is "
            f"{target.max_model_len}")
    dtype = target.dtype if spec.dtype == "auto" else spec.dtype
    nested = {f.name: None for f in fields(target) if f.name == "speculative_config"}  # the draft drafts nothing
    # Multi-step greedy graphs for a k-token draft (engine/spec_decode/draft_model.py); decode graphs
    # only for the batch sizes that speculate.
    return replace(target, model=spec.model, hf_config=hf, dtype=dtype, num_kv_blocks=num_kv_blocks,
                   kv_cache_tokens=None, num_decode_steps=spec.num_speculative_tokens, tensor_parallel_size=1,
                   cuda_graph_max_bs=min(target.cuda_graph_max_bs, spec.max_batch_size), **nested)


def kv_bytes_per_token_of(config: Any) -> int:
    """K and V bytes per token of an EngineConfig's model, from its hf_config (before it is built)."""
    hf = config.hf_config
    heads = int(hf.num_attention_heads)
    head_dim = getattr(hf, "head_dim", None) or int(hf.hidden_size) // heads
    kv_heads = int(getattr(hf, "num_key_value_heads", None) or heads)
    return 2 * int(hf.num_hidden_layers) * kv_heads * int(head_dim) * config.torch_dtype.itemsize

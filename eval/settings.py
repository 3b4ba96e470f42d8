"""The harness's settings (the `eval.*` keys), parsed and checked once before any work: a bad
key or value is one ShrinkError naming `eval.<key>`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Mapping

from common.errors import ShrinkError

if TYPE_CHECKING:  # eval.perplexity imports torch: not at the top, so `python -m shrink` checks its config first
    from eval.perplexity import WindowProtocol

KNOWN_TASKS = ("cqa", "svamp", "gsm8k")
# The perplexity keys (the stage and shrink/config_check.py read them), beside this harness's own:
# context / stride / max_windows are the sliding windows of every dataset but WikiText-2, whose
# fixed protocol is eval.wikitext2 (WikitextSettings).
PERPLEXITY_KEYS = ("context", "stride", "max_windows", "datasets", "batch_size", "dtype")
HF_COMPILE = ("auto", "none", "teacher", "all")


def _section(raw: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise ShrinkError(f"eval.{key} must be a mapping, got {value!r}")
    return dict(value)


def _build(cls: type, raw: Mapping[str, Any], prefix: str):
    """A dataclass from a mapping: unknown keys and wrong types are refused, naming the key."""
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ShrinkError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    values = {}
    for name, value in raw.items():
        default = getattr(cls(), name)
        key = f"{prefix}{name}"
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif isinstance(default, (list, tuple)):
            ok = isinstance(value, (list, tuple))
            value = list(value) if ok else value
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            raise ShrinkError(f"{key}: expected a value like {default!r}, got {value!r}")
        values[name] = value
    return cls(**values)


def _positive(key: str, value: int | float) -> None:
    if value <= 0:
        raise ShrinkError(f"{key} must be > 0, got {value}")


def _optional_positive(key: str, value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ShrinkError(f"{key} must be null or an integer >= 1, got {value!r}")


@dataclass
class WikitextSettings:
    """WikiText-2 on the project's fixed protocol (issue 11): non-overlapping windows of `context`
    tokens, full windows only: 148 windows of 2048 over the 304,838 SmolLM2 tokens."""

    context: int = 2048  # capped at the model's max_position_embeddings (the report says so)
    stride: int = 2048
    full_windows_only: bool = True
    max_windows: Any = None  # null: every window (the protocol); an integer caps them (`make demo`)

    def check(self) -> None:
        if self.context < 2:
            raise ShrinkError(f"eval.wikitext2.context must be >= 2, got {self.context}")
        if not 1 <= self.stride <= self.context:
            raise ShrinkError(f"eval.wikitext2.stride must be in [1, eval.wikitext2.context={self.context}], "
                              f"got {self.stride}")
        _optional_positive("eval.wikitext2.max_windows", self.max_windows)


@dataclass
class TaskSettings:
    enabled: bool = True
    names: list = field(default_factory=lambda: list(KNOWN_TASKS))  # generative tasks ([label] answers)
    limit: int = 4  # examples per task: the first `limit` of the split
    split: str = "test"
    cqa_mc: bool = True  # CommonsenseQA also as lm-eval's multiple choice, by log-likelihood

    def check(self) -> None:
        for name in self.names:
            if name not in KNOWN_TASKS:
                raise ShrinkError(f"eval.tasks.names: unknown task {name!r} (known: {', '.join(KNOWN_TASKS)})")
        _positive("eval.tasks.limit", self.limit)


@dataclass
class AgreementSettings:
    enabled: bool = True
    windows: int = 2  # held-out token windows scored by teacher and artifact alike
    window_len: int = 128

    def check(self) -> None:
        _positive("eval.agreement.windows", self.windows)
        if self.window_len < 2:
            raise ShrinkError(f"eval.agreement.window_len must be >= 2, got {self.window_len}")


@dataclass
class SpeedSettings:
    enabled: bool = True
    batch_sizes: list = field(default_factory=lambda: [1, 4])
    prompt_len: int = 32
    new_tokens: int = 8
    hf_baseline: bool = True  # transformers generate, same prompts, in the same run
    # which rows' generate runs torch.compile'd on its static cache: auto is teacher on CUDA, none on CPU
    hf_compile: str = "auto"

    def check(self) -> None:
        if self.hf_compile not in HF_COMPILE:
            raise ShrinkError(f"eval.speed.hf_compile: expected one of {', '.join(HF_COMPILE)}, "
                              f"got {self.hf_compile!r}")
        if not self.batch_sizes:
            raise ShrinkError("eval.speed.batch_sizes: give at least one batch size (or eval.speed.enabled=false)")
        for b in self.batch_sizes:
            if not isinstance(b, int) or isinstance(b, bool) or b < 1:
                raise ShrinkError(f"eval.speed.batch_sizes: {b!r} is not an integer >= 1")
        _positive("eval.speed.prompt_len", self.prompt_len)
        if self.new_tokens < 2:
            raise ShrinkError(f"eval.speed.new_tokens must be >= 2 (decode speed needs tokens after the first), "
                              f"got {self.new_tokens}")


@dataclass
class LoadSettings:
    enabled: bool = True
    requests: int = 4
    concurrency: int = 2
    prompt_len: int = 32
    max_tokens: int = 8
    time_limit_s: float = 60.0  # no new request starts after this; the ones in flight finish

    def check(self) -> None:
        for key in ("requests", "concurrency", "prompt_len", "max_tokens", "time_limit_s"):
            _positive(f"eval.load.{key}", getattr(self, key))


# EngineConfig.compressed_weights's values (engine/layers/options.py COMPRESSED_WEIGHTS; repeated here so that
# `python -m shrink` checks its config without importing the engine; tests/eval check that they agree).
COMPRESSED_WEIGHTS = ("auto", "keep", "dequantize")


@dataclass
class EngineSettings:
    max_model_len: int = 512
    max_num_seqs: int = 0  # 0: the largest of eval.speed.batch_sizes and eval.load.concurrency
    kv_cache_tokens: int = 0  # 0: the engine sizes the pool (free GPU memory; on CPU from max_num_seqs)
    compressed_weights: str = "auto"  # EngineConfig.compressed_weights: keep | dequantize | auto

    def check(self) -> None:
        _positive("eval.engine.max_model_len", self.max_model_len)
        if self.max_num_seqs < 0:
            raise ShrinkError(f"eval.engine.max_num_seqs must be >= 0, got {self.max_num_seqs}")
        if self.kv_cache_tokens < 0:
            raise ShrinkError(f"eval.engine.kv_cache_tokens must be >= 0, got {self.kv_cache_tokens}")
        if self.compressed_weights not in COMPRESSED_WEIGHTS:
            raise ShrinkError(f"eval.engine.compressed_weights must be one of {', '.join(COMPRESSED_WEIGHTS)}, "
                              f"got {self.compressed_weights!r}")


K_POLICIES = ("fixed", "auto")


@dataclass
class SpeculativeSettings:
    draft: str = "distill"  # the run's artifact that drafts for the teacher
    num_speculative_tokens: int = 4
    k_policy: str = "fixed"  # fixed: k at every batch size; auto: the engine's measured policy (k <= the above)

    def check(self) -> None:
        _positive("eval.speculative_settings.num_speculative_tokens", self.num_speculative_tokens)
        if self.k_policy not in K_POLICIES:
            raise ShrinkError(f"eval.speculative_settings.k_policy must be one of {', '.join(K_POLICIES)}, "
                              f"got {self.k_policy!r}")

    def engine_config(self, draft_path: str) -> dict:
        """The engine's speculative_config for the row."""
        config = {"model": draft_path, "num_speculative_tokens": self.num_speculative_tokens}
        if self.k_policy == "auto":
            config["num_speculative_tokens_per_batch_size"] = "auto"
        return config

    @property
    def label(self) -> str:
        k = self.num_speculative_tokens
        return f"k={k}" if self.k_policy == "fixed" else f"k<={k}, auto"


@dataclass
class HarnessSettings:
    """The `eval.*` keys beyond perplexity (context, stride, ... stay where the stage reads them)."""

    wikitext2: WikitextSettings = field(default_factory=WikitextSettings)
    tasks: TaskSettings = field(default_factory=TaskSettings)
    agreement: AgreementSettings = field(default_factory=AgreementSettings)
    speed: SpeedSettings = field(default_factory=SpeedSettings)
    load: LoadSettings = field(default_factory=LoadSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    speculative: bool = False
    speculative_settings: SpeculativeSettings = field(default_factory=SpeculativeSettings)
    plots: bool = True

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> HarnessSettings:
        """From the whole `eval` mapping; a key that is neither a perplexity key nor one of these
        is refused, naming it."""
        known = set(PERPLEXITY_KEYS) | {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ShrinkError(f"eval.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
        speculative = raw.get("speculative", False)
        plots = raw.get("plots", True)
        for key, value in (("speculative", speculative), ("plots", plots)):
            if not isinstance(value, bool):
                raise ShrinkError(f"eval.{key}: expected true or false, got {value!r}")
        out = cls(
            wikitext2=_build(WikitextSettings, _section(raw, "wikitext2"), "eval.wikitext2."),
            tasks=_build(TaskSettings, _section(raw, "tasks"), "eval.tasks."),
            agreement=_build(AgreementSettings, _section(raw, "agreement"), "eval.agreement."),
            speed=_build(SpeedSettings, _section(raw, "speed"), "eval.speed."),
            load=_build(LoadSettings, _section(raw, "load"), "eval.load."),
            engine=_build(EngineSettings, _section(raw, "engine"), "eval.engine."),
            speculative=speculative,
            speculative_settings=_build(SpeculativeSettings, _section(raw, "speculative_settings"),
                                        "eval.speculative_settings."),
            plots=plots,
        )
        for part in (out.wikitext2, out.tasks, out.agreement, out.speed, out.load, out.engine,
                     out.speculative_settings):
            part.check()
        return out


def perplexity_protocols(datasets: list[str], context: int, stride: int, max_windows: int | None,
                         wikitext2: WikitextSettings, max_positions: int
                         ) -> tuple[dict[str, WindowProtocol], list[str]]:
    """Each dataset's windows: WikiText-2 on eval.wikitext2 (the fixed protocol), the others on the
    sliding eval.context / eval.stride / eval.max_windows; every context capped at the model's
    max_position_embeddings. Also the notes that say where a cap changed a protocol."""
    from eval.perplexity import WindowProtocol

    out: dict[str, WindowProtocol] = {}
    notes: list[str] = []
    for name in datasets:
        if name == "wikitext2":
            asked = WindowProtocol(wikitext2.context, wikitext2.stride, wikitext2.max_windows,
                                   wikitext2.full_windows_only)
            keys = "eval.wikitext2.context"
        else:
            asked = WindowProtocol(context, stride, max_windows)
            keys = "eval.context"
        out[name] = asked.capped(max_positions)
        if out[name] != asked:
            notes.append(f"{name}: {keys}={asked.context} is past the model's max_position_embeddings "
                         f"({max_positions}): scored on windows of {out[name].context} tokens, stride "
                         f"{out[name].stride}; not comparable with numbers on {asked.context}-token windows")
    return out, notes

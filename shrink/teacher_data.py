"""Teacher-generated training data, made by our engine: the teacher continues prefixes of the training
corpus and answers instruction prompts (through its chat template when the tokenizer has one), sampled
at temperature 1 / top-p 1 with a seed (temperature 0: the teacher's greedy continuations, the text a
greedy speculative decode verifies, e.g. for Medusa heads that draft for greedy requests). The result is
cached under the cache dir by its lineage (teacher content hash, sampling settings, seed, how seeded
requests draw, count, prompts), so a second run reuses it, and the lineage is written beside it
(`lineage.json`)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from omegaconf import DictConfig, OmegaConf

from common.errors import ShrinkError
from shrink.artifacts import Artifact

if TYPE_CHECKING:  # torch where samples are saved and read: the config check runs before torch is imported
    import torch

CACHE_SUBDIR = "teacher_data"
DATA_FILE = "samples.pt"
LINEAGE_FILE = "lineage.json"


@dataclass(frozen=True)
class TeacherDataSettings:
    ratio: float              # fraction of the training blocks that are teacher-generated
    num_samples: int          # generated sequences (continuations + answers)
    max_tokens: int           # tokens generated per sample
    prefix_tokens: int        # corpus prefix given to the teacher to continue
    instructions: str | None  # file of instruction prompts (jsonl/json/txt), or None: continuations only
    instruction_field: str
    instruction_fraction: float
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    @classmethod
    def from_cfg(cls, tcfg: Any, seed: int) -> "TeacherDataSettings":
        values = OmegaConf.to_container(tcfg, resolve=True) if OmegaConf.is_config(tcfg) else dict(tcfg)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ShrinkError(f"data.teacher_generated: unknown keys {unknown} (known: {sorted(known)})")
        s = cls(ratio=float(values.get("ratio", 0.0)), num_samples=int(values.get("num_samples", 0)),
                max_tokens=int(values.get("max_tokens", 128)), prefix_tokens=int(values.get("prefix_tokens", 32)),
                instructions=values.get("instructions"), instruction_field=str(values.get("instruction_field", "text")),
                instruction_fraction=float(values.get("instruction_fraction", 0.0)),
                temperature=float(values.get("temperature", 1.0)), top_p=float(values.get("top_p", 1.0)),
                seed=int(values["seed"]) if values.get("seed") is not None else seed)
        s.check()
        return s

    def check(self) -> None:
        key = "data.teacher_generated"
        if not 0.0 <= self.ratio <= 1.0:
            raise ShrinkError(f"{key}.ratio must be in [0, 1], got {self.ratio}")
        if self.ratio > 0 and self.num_samples < 1:
            raise ShrinkError(f"{key}.num_samples must be >= 1 when {key}.ratio > 0, got {self.num_samples}")
        for name in ("max_tokens", "prefix_tokens"):
            if getattr(self, name) < 1:
                raise ShrinkError(f"{key}.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.instruction_fraction <= 1.0:
            raise ShrinkError(f"{key}.instruction_fraction must be in [0, 1], got {self.instruction_fraction}")
        if self.instruction_fraction > 0 and not self.instructions:
            raise ShrinkError(f"{key}.instruction_fraction > 0 needs {key}.instructions (a file of prompts)")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ShrinkError(f"{key}: temperature must be >= 0 (0: greedy) and top_p in (0, 1] "
                              f"(got {self.temperature}, {self.top_p})")

    @property
    def sampling(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}


def build_prompts(train_blocks: torch.Tensor, instructions: list[str], tokenizer: Any,
                  settings: TeacherDataSettings) -> list[list[int]]:
    """Token-id prompts: `prefix_tokens` of seeded-chosen training blocks (never validation text) and
    instruction prompts, through the chat template where the tokenizer has one."""
    rng = random.Random(settings.seed)
    n_instr = round(settings.num_samples * settings.instruction_fraction) if instructions else 0
    n_cont = settings.num_samples - n_instr
    if train_blocks.shape[1] < settings.prefix_tokens:
        raise ShrinkError(f"data.teacher_generated.prefix_tokens={settings.prefix_tokens} exceeds "
                          f"data.block_size={train_blocks.shape[1]}")
    rows = [rng.randrange(train_blocks.shape[0]) for _ in range(n_cont)]
    prompts = [train_blocks[r, : settings.prefix_tokens].tolist() for r in rows]
    for text in (rng.choice(instructions) for _ in range(n_instr)):
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts.append(list(ids))
    return prompts


# How a seeded request's tokens are drawn from its seed (engine/layers/sampler.py SeededRows): part of
# the lineage, so that samples drawn by an engine whose seeded draws differed (before 2026-11-30: a
# torch.Generator per request) are regenerated, not taken for what this seed gives now.
SEEDED_DRAWS = "splitmix64 counter per (seed, position, kind), inverse CDF"


def lineage(teacher: Artifact, prompts: list[list[int]], settings: TeacherDataSettings) -> dict:
    prompt_digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    return {"teacher": str(teacher.path.resolve()), "teacher_content_hash": teacher.content_hash,
            "sampling": settings.sampling, "seed": settings.seed, "seeded_draws": SEEDED_DRAWS, "count": len(prompts),
            "prompts_sha256": prompt_digest, "instructions": settings.instructions,
            "instruction_fraction": settings.instruction_fraction, "prefix_tokens": settings.prefix_tokens}


def cache_key(record: dict) -> str:
    stable = {k: v for k, v in record.items() if k != "teacher"}  # the same teacher anywhere on disk
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:24]


GENERATE_SEQS = 1024


def engine_generate(teacher: Artifact, prompts: list[list[int]], settings: TeacherDataSettings,
                    device: str) -> list[list[int]]:
    """The teacher samples through our engine (continuous batching, paged KV cache)."""
    from engine import LLM, SamplingParams

    max_len = max(len(p) for p in prompts) + settings.max_tokens
    # Sized by the job, not the GPU: up to GENERATE_SEQS sequences a step in a KV pool that holds them,
    # not 90% of the free memory, so that training can share the GPU (on the H200 a width student trained
    # beside this; the rate was 64.2k tok/s against 62.9k alone at 256 sequences a step: more sequences
    # a step did not measurably speed a 135M teacher up).
    seqs = min(len(prompts), GENERATE_SEQS)
    llm = LLM(str(teacher.path), device=device, max_model_len=max_len, max_num_seqs=seqs, cuda_graph_max_bs=seqs,
              kv_cache_tokens=seqs * max_len)
    params = [SamplingParams(temperature=settings.temperature, top_p=settings.top_p, max_tokens=settings.max_tokens,
                             seed=settings.seed * 1_000_003 + i) for i in range(len(prompts))]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    failed = [o.error for o in outputs if o.error]
    if failed:
        raise ShrinkError(f"teacher data: the engine refused {len(failed)} prompts, e.g.: {failed[0]}")
    return [list(o.token_ids) for o in outputs]


Generate = Callable[[Artifact, list[list[int]], TeacherDataSettings, str], list[list[int]]]


def teacher_samples(teacher: Artifact, prompts: list[list[int]], settings: TeacherDataSettings, cache_dir: Path,
                    device: str = "cpu", generate: Generate = engine_generate) -> tuple[list[list[int]], Path]:
    """prompt + generated token ids per sample, from the cache when this lineage was generated before."""
    record = lineage(teacher, prompts, settings)
    entry = Path(cache_dir) / CACHE_SUBDIR / cache_key(record)
    if _complete(entry):
        try:
            samples = _read_samples(entry)
            print(f"teacher data: {len(samples)} samples reused from {entry}")
            return samples, entry
        except Exception:
            pass  # unreadable entry: regenerate it
    damaged = entry.exists()  # ours to replace; an entry that appears from now on is another process's
    print(f"teacher data: generating {len(prompts)} samples of {settings.max_tokens} tokens with the engine "
          f"(temperature {settings.temperature}, top-p {settings.top_p}, seed {settings.seed})", flush=True)
    generated = generate(teacher, prompts, settings, device)
    samples = [p + g for p, g in zip(prompts, generated)]
    tmp = entry.parent / f".{entry.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        import torch

        torch.save({"samples": samples}, tmp / DATA_FILE)
        (tmp / LINEAGE_FILE).write_text(json.dumps({**record, "generated_tokens": sum(map(len, generated))},
                                                   indent=2))
        if damaged or not _complete(entry):
            shutil.rmtree(entry, ignore_errors=True)  # the damaged entry checked above
            try:
                os.replace(tmp, entry)
            except OSError:  # another process placed its entry between the removal and this rename
                if not _complete(entry):
                    raise
        if tmp.exists():  # another process of this lineage (a second training chain) finished first: its entry stays
            print(f"teacher data: {entry} was written by another process meanwhile; kept")
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return samples, entry


def _read_samples(entry: Path) -> list[list[int]]:
    import torch

    return torch.load(entry / DATA_FILE, weights_only=True)["samples"]


def load_entry(entry: str | Path, teacher: Artifact, vocab_size: int | None = None) -> tuple[list[list[int]], dict]:
    """(samples, lineage) of a cache entry that `teacher_samples` wrote (e.g. by experiments/distill.py), for
    another experiment to train on the same generation (experiments/gqa.py --teacher-samples). Verified: both
    files present, generated by `teacher` (its content hash, so the samples are that model's text), as many
    samples as the lineage counts, each a non-empty list of token ids below `vocab_size` (when given)."""
    entry = Path(entry)
    record = check_entry(entry, teacher)
    try:
        samples = _read_samples(entry)
    except Exception as e:
        raise ShrinkError(f"teacher data entry {entry}: {DATA_FILE} is unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(samples, list) or len(samples) != record.get("count"):
        n = len(samples) if isinstance(samples, list) else type(samples).__name__
        raise ShrinkError(f"teacher data entry {entry}: {DATA_FILE} holds {n} samples, {LINEAGE_FILE} counts "
                          f"{record.get('count')}")
    limit = vocab_size if vocab_size is not None else float("inf")
    for i, s in enumerate(samples):
        if not (isinstance(s, list) and s and all(type(t) is int for t in s) and 0 <= min(s) and max(s) < limit):
            raise ShrinkError(f"teacher data entry {entry}: sample {i} is not a non-empty list of token ids "
                              f"in [0, {vocab_size}) (got {str(s)[:80]})")
    return samples, record


def check_entry(entry: Path, teacher: Artifact) -> dict:
    """The lineage of a complete cache entry generated by `teacher` (checked by content hash)."""
    for name in (LINEAGE_FILE, DATA_FILE):
        if not (entry / name).is_file():
            raise ShrinkError(f"teacher data entry {entry}: {name} is missing (an entry holds {DATA_FILE} and "
                              f"{LINEAGE_FILE}, as teacher_samples writes them)")
    try:
        record = json.loads((entry / LINEAGE_FILE).read_text())
    except ValueError as e:
        raise ShrinkError(f"teacher data entry {entry}: {LINEAGE_FILE} is not JSON ({e})") from e
    if not isinstance(record, dict):
        raise ShrinkError(f"teacher data entry {entry}: {LINEAGE_FILE} is not a JSON object")
    got = record.get("teacher_content_hash")
    if got != teacher.content_hash:
        raise ShrinkError(f"teacher data entry {entry} was generated by a teacher of content hash {got}, not by "
                          f"{teacher.path} (content hash {teacher.content_hash})")
    return record


def _complete(entry: Path) -> bool:
    """Both files of a cache entry. An entry only appears whole (os.replace of a finished folder), so a
    new one with both files is complete; one found damaged at the start is replaced."""
    return (entry / LINEAGE_FILE).is_file() and (entry / DATA_FILE).is_file()


def teacher_generated_blocks(settings: TeacherDataSettings, teacher: Artifact, tokenizer: Any,
                             train_blocks: torch.Tensor, cache_dir: Path, device: str
                             ) -> tuple[list[list[int]], dict]:
    """The distill stage's entry: the teacher's samples for `settings` (data.teacher_generated) and
    what to record of them in the artifact's metrics."""
    instructions: list[str] = []
    if settings.instructions and settings.instruction_fraction > 0:
        from train.data import load_documents

        instructions = load_documents(str(settings.instructions), settings.instruction_field)
    prompts = build_prompts(train_blocks, instructions, tokenizer, settings)
    samples, entry = teacher_samples(teacher, prompts, settings, cache_dir, device)
    info = {"teacher_data": str(entry), "teacher_data_samples": len(samples), "teacher_data_ratio": settings.ratio,
            **{f"teacher_data_{k}": v for k, v in asdict(settings).items() if k in ("seed", "max_tokens")}}
    return samples, info

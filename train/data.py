"""Text data through `datasets`: load, tokenize, pack into fixed-length blocks, split, cache.

Packing concatenates documents with EOS between them and cuts fixed-length blocks; the split is
by document (a seeded hash), so validation text never leaks into training blocks. The packed
result is cached under the cache dir by a key over the data file's content hash, the tokenizer
and every packing parameter.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from common.errors import ShrinkError
from common.paths import default_cache_dir, default_data_dir

CORPUS_FILE = "corpus/docs-en.jsonl.gz"
_FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}


@dataclass
class PackedData:
    train: torch.Tensor  # [n_blocks, block_size] int64
    val: torch.Tensor
    source: str
    num_docs: int

    @property
    def train_tokens(self) -> int:
        return self.train.numel()


def data_dir(cfg_value: str | None = None) -> Path | None:
    return Path(cfg_value) if cfg_value else default_data_dir()


def pydoc_documents() -> list[str]:
    """English text that every Python install has: the reference docs' topics."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _format_of(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    if not suffixes or suffixes[-1] not in _FORMATS:
        raise ShrinkError(f"data file {path}: unsupported format (use .jsonl, .json, .txt, .parquet, optionally .gz)")
    return _FORMATS[suffixes[-1]]


def _looks_like_file(source: str) -> bool:
    suffixes = [x for x in Path(source).suffixes if x != ".gz"]
    return source.startswith((".", "/", "~")) or (bool(suffixes) and suffixes[-1] in _FORMATS)


def check_text_file(path: Path, sample_bytes: int = 1 << 20) -> None:
    """Refuse an empty file or one that is not UTF-8 text, naming it (instead of datasets' errors)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(sample_bytes)
            complete = not f.read(1)
    except (OSError, EOFError) as e:
        raise ShrinkError(f"could not read data file {path}: {e}") from None
    if complete and not head.strip():
        raise ShrinkError(f"data file {path} is empty")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=complete)
        binary = b"\0" in head
    except UnicodeDecodeError:
        binary = True
    if binary:
        raise ShrinkError(f"data file {path} is not UTF-8 text (binary data?)")


def resolve_source(source: str, shared: Path | None) -> str:
    """Turn `auto`/`corpus` into a file path (or `pydoc`)."""
    if source in ("auto", "corpus"):
        corpus = shared / CORPUS_FILE if shared else None
        if corpus is not None and corpus.is_file():
            return str(corpus)
        if source == "corpus":
            raise ShrinkError(f"data.source=corpus but {CORPUS_FILE} is not under data_dir={shared} "
                              f"(set data_dir= or SHRINK_DATA_DIR)")
        return "pydoc"
    return source


def load_documents(source: str, text_field: str = "text", max_docs: int | None = None) -> list[str]:
    """Documents from `pydoc`, a local file, or a hub dataset id, through `datasets`."""
    if source == "pydoc":
        docs = pydoc_documents()
        return docs[:max_docs] if max_docs else docs
    import datasets

    path = Path(os.path.expanduser(source))
    if path.exists():
        fmt = _format_of(path)
        if fmt != "parquet":
            check_text_file(path)
        split = f"train[:{max_docs}]" if max_docs else "train"
        try:
            ds = datasets.load_dataset(fmt, data_files=str(path), split=split)
        except Exception as e:  # datasets raises many types for unreadable files
            raise ShrinkError(f"could not read data file {path}: {type(e).__name__}: {e}") from None
    elif _looks_like_file(source):
        raise ShrinkError(f"data file not found: {source}")
    elif source.count("/") <= 1:
        try:
            ds = datasets.load_dataset(source, split=f"train[:{max_docs}]" if max_docs else "train")
        except Exception as e:
            raise ShrinkError(f"could not load dataset {source!r} from the hub: {type(e).__name__}: {e}") from None
    else:
        raise ShrinkError(f"data source not found: {source}")
    if text_field not in ds.column_names:
        raise ShrinkError(f"data.text_field={text_field!r} is not a column of {source} (columns: {ds.column_names})")
    return [t for t in ds[text_field] if t]


def source_fingerprint(source: str) -> str:
    path = Path(source)
    if path.is_file():
        st = path.stat()
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        return digest.hexdigest() + f":{st.st_size}"
    if source == "pydoc":
        return "pydoc:" + hashlib.sha256("\0".join(pydoc_documents()).encode()).hexdigest()
    return f"hub:{source}"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())[:2000]) + str(len(tokenizer))
    return hashlib.sha256((vocab + str(tokenizer.eos_token_id)).encode()).hexdigest()[:16]


def is_validation(doc_index: int, seed: int, val_fraction: float) -> bool:
    h = hashlib.sha256(f"{seed}:{doc_index}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64 < val_fraction


def pack(token_lists: Iterable[list[int]], block_size: int, eos_id: int) -> torch.Tensor:
    """Concatenate documents with EOS after each and cut [n, block_size] blocks (remainder dropped)."""
    flat: list[int] = []
    for ids in token_lists:
        flat.extend(ids)
        flat.append(eos_id)
    n = len(flat) // block_size
    return torch.tensor(np.asarray(flat[: n * block_size], dtype=np.int64)).view(n, block_size)


def tokenize(tokenizer: Any, docs: list[str], batch: int = 256) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(docs), batch):
        out.extend(tokenizer(docs[i : i + batch], add_special_tokens=False)["input_ids"])
    return out


def load_packed(data_cfg: Any, tokenizer: Any, data_dir_value: str | None = None,
                cache_dir: Path | None = None) -> PackedData:
    """Tokenized, packed train/val blocks for a `data` config group, cached by content hash."""
    block_size = int(data_cfg.block_size)
    if block_size < 2:
        raise ShrinkError(f"data.block_size must be >= 2, got {block_size}")
    val_fraction = float(data_cfg.val_fraction)
    if not 0.0 < val_fraction < 1.0:
        raise ShrinkError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    source = resolve_source(str(data_cfg.source), data_dir(data_dir_value))
    max_docs = data_cfg.get("max_docs")
    seed = int(data_cfg.get("seed", 0))
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ShrinkError("the tokenizer has no EOS token; packing needs one between documents")
    key_src = json.dumps([source_fingerprint(source), tokenizer_fingerprint(tokenizer), block_size, val_fraction,
                          max_docs, seed, str(data_cfg.get("text_field", "text")), eos])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    cache = Path(cache_dir or default_cache_dir()) / "data" / f"{key}.pt"
    if cache.is_file():
        try:
            blob = torch.load(cache, weights_only=True)
            return PackedData(blob["train"], blob["val"], source, int(blob["num_docs"]))
        except Exception:
            cache.unlink(missing_ok=True)  # unreadable cache entry: rebuild it
    docs = load_documents(source, str(data_cfg.get("text_field", "text")), max_docs)
    if not docs:
        raise ShrinkError(f"no documents in {source}")
    ids = tokenize(tokenizer, docs)
    val_docs = [d for i, d in enumerate(ids) if is_validation(i, seed, val_fraction)]
    train_docs = [d for i, d in enumerate(ids) if not is_validation(i, seed, val_fraction)]
    if not val_docs:  # tiny sources: keep at least one validation document
        val_docs, train_docs = train_docs[-1:], train_docs[:-1]
    data = PackedData(pack(train_docs, block_size, eos), pack(val_docs, block_size, eos), source, len(docs))
    if data.train.shape[0] == 0 or data.val.shape[0] == 0:
        raise ShrinkError(f"{source}: too little text for block_size={block_size} "
                          f"({data.train.shape[0]} train / {data.val.shape[0]} validation blocks)")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    torch.save({"train": data.train, "val": data.val, "num_docs": data.num_docs}, tmp)
    os.replace(tmp, cache)
    return data


def budget_blocks(source: str, tokenizer: Any, n_tokens: int, block_size: int, val_blocks: int, seed: int,
                  docs_per_batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) blocks for a token budget: documents in a seeded shuffle (the shared corpus is
    sorted by source, so a prefix would be all Python docs), tokenized only until the budget and
    `val_blocks` are covered. The first `val_blocks` blocks are validation."""
    docs = load_documents(source)
    random.Random(seed).shuffle(docs)
    need = n_tokens + (val_blocks + 1) * block_size
    ids: list[list[int]] = []
    have, i = 0, 0
    while have < need and i < len(docs):
        batch = tokenize(tokenizer, docs[i : i + docs_per_batch])
        ids.extend(batch)
        have += sum(len(x) + 1 for x in batch)
        i += docs_per_batch
    blocks = pack(ids, block_size, tokenizer.eos_token_id)
    if blocks.shape[0] <= val_blocks:
        raise ShrinkError(f"{source}: only {blocks.shape[0]} blocks of {block_size} tokens")
    val, train = blocks[:val_blocks], blocks[val_blocks:]
    if train.numel() < n_tokens:
        print(f"note: {source} has {train.numel()} training tokens < budget {n_tokens}; blocks repeat")
    return train, val


def mix_generated(train: torch.Tensor, samples: list[list[int]], ratio: float, eos_id: int,
                  seed: int) -> torch.Tensor:
    """Training blocks with a `ratio` share of generated text: the samples are packed into blocks of
    the corpus' block size, and the mix keeps the corpus' block count, seeded-shuffled (generated blocks
    repeat when there are fewer than the share needs). Ratio 1: only generated text (the corpus then
    gives only the prompts and the block count)."""
    _check_ratio(ratio)
    if ratio == 0.0:
        return train
    return _mix_blocks(train, _generated_blocks(samples, train.shape[1], eos_id), ratio, seed)[0]


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio <= 1.0:
        raise ShrinkError(f"data.teacher_generated.ratio must be in [0, 1], got {ratio}")


def _generated_blocks(samples: list[list[int]], block_size: int, eos_id: int) -> torch.Tensor:
    generated = pack(samples, block_size, eos_id)
    if generated.shape[0] == 0:
        raise ShrinkError(f"the generated samples ({sum(map(len, samples))} tokens) fill no block of "
                          f"data.block_size={block_size} tokens")
    return generated


def _mix_blocks(train: torch.Tensor, generated: torch.Tensor, ratio: float,
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mix_generated's mix of packed blocks, and which of its rows are generated ones (known by construction)."""
    n_total = train.shape[0]
    n_gen = round(ratio * n_total)
    gen_rows = torch.arange(n_gen) % generated.shape[0]
    if n_gen > generated.shape[0]:
        print(f"note: {generated.shape[0]} generated blocks for a share of {n_gen}; they repeat")
    g = torch.Generator().manual_seed(seed)
    corpus_rows = torch.randperm(n_total, generator=g)[: n_total - n_gen]
    mixed = torch.cat([train[corpus_rows], generated[gen_rows]])
    order = torch.randperm(n_total, generator=g)
    return mixed[order], order >= n_total - n_gen


def block_keys(blocks: torch.Tensor) -> torch.Tensor:
    """One int64 fingerprint per block (a fixed random projection, wrapping): equal blocks, equal keys."""
    w = torch.randint(-2**62, 2**62, (blocks.shape[1],), generator=torch.Generator().manual_seed(0))
    return blocks.long() @ w


def mix_to_budget(train: torch.Tensor, samples: list[list[int]], ratio: float, n_tokens: int, eos_id: int,
                  seed: int) -> tuple[torch.Tensor, dict]:
    """Training blocks for a token budget with `ratio` of them generated (mix_generated), and what to
    record of the mix. The mix has the budget's block count, the corpus repeated to it as training would
    repeat it (issue 16: the corpus' ~11.4M tokens repeat ~9 times in 100M), so that the samples are not
    cut to the corpus' size; never fewer blocks than the corpus has. The stats are measured on the mix:
    its generated blocks and its distinct tokens (by block fingerprint), corpus and generated apart.
    Shared by experiments/distill.py and experiments/gqa.py, so both train on the same mix."""
    _check_ratio(ratio)
    block_size = train.shape[1]
    n_blocks = max(train.shape[0], math.ceil(n_tokens / block_size))
    corpus = train.repeat(math.ceil(n_blocks / train.shape[0]), 1)[:n_blocks]
    if ratio == 0.0:  # mix_generated's corpus as it is
        generated = pack(samples, block_size, eos_id)
        mixed, is_generated = corpus, torch.zeros(n_blocks, dtype=torch.bool)
    else:
        generated = _generated_blocks(samples, block_size, eos_id)
        mixed, is_generated = _mix_blocks(corpus, generated, ratio, seed)
    keys = block_keys(mixed)

    def distinct_tokens(k: torch.Tensor) -> int:
        return int(torch.unique(k).numel()) * block_size

    stats = {"blocks": n_blocks, "generated_blocks": int(is_generated.sum()),
             "generated_share": float(is_generated.float().mean()), "generated_blocks_available": generated.shape[0],
             "distinct_tokens": distinct_tokens(keys), "distinct_corpus_tokens": distinct_tokens(keys[~is_generated]),
             "distinct_generated_tokens": distinct_tokens(keys[is_generated])}
    return mixed, stats

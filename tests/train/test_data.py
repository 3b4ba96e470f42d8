"""Loading, packing, splitting and caching of text data."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from support import make_tiny_tokenizer
from common.errors import ShrinkError
from train.data import load_documents, load_packed, pack


def _cfg(source: str, **kw):
    return OmegaConf.create({"source": source, "text_field": "text", "block_size": 16, "val_fraction": 0.2,
                             "max_docs": None, "seed": 0, **kw})


def test_pack_puts_eos_between_documents():
    blocks = pack([[5, 6, 7], [8, 9]], block_size=3, eos_id=2)
    assert blocks.tolist() == [[5, 6, 7], [2, 8, 9]]  # the trailing EOS is the dropped remainder


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "txt", "parquet"])
def test_local_formats(tmp_path: Path, fmt: str):
    docs = [f"document number {i} " * 5 for i in range(40)]
    path = tmp_path / f"docs.{fmt}"
    if fmt.startswith("jsonl"):
        lines = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
        path.write_bytes(gzip.compress(lines) if fmt.endswith(".gz") else lines)
    elif fmt == "txt":
        path.write_text("\n".join(docs))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs}), path)
    assert load_documents(str(path)) == docs


def test_split_is_deterministic_and_cached(tmp_path: Path):
    tok = make_tiny_tokenizer()
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i} " * 20}) + "\n" for i in range(60)))
    first = load_packed(_cfg(str(src)), tok, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "data").glob("*.pt"))) == 1
    second = load_packed(_cfg(str(src)), tok, cache_dir=tmp_path / "cache")
    assert first.train.equal(second.train) and first.val.equal(second.val)
    assert first.train.shape[1] == 16 and first.val.shape[0] >= 1
    src.write_text(src.read_text() + json.dumps({"text": "one more"}) + "\n")  # content changed: new key
    load_packed(_cfg(str(src)), tok, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "data").glob("*.pt"))) == 2


def test_pydoc_default_needs_no_shared_data(tmp_path: Path):
    data = load_packed(_cfg("auto", max_docs=10), make_tiny_tokenizer(), data_dir_value=str(tmp_path / "none"),
                       cache_dir=tmp_path)
    assert data.source == "pydoc" and data.train.shape[0] > 10


def test_bad_inputs_name_the_problem(tmp_path: Path):
    tok = make_tiny_tokenizer()
    with pytest.raises(ShrinkError, match="not found"):
        load_packed(_cfg(str(tmp_path / "missing.jsonl")), tok, cache_dir=tmp_path)
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ShrinkError, match="text_field"):
        load_packed(_cfg(str(src)), tok, cache_dir=tmp_path)
    with pytest.raises(ShrinkError, match="block_size"):
        load_packed(_cfg(str(src), block_size=1), tok, cache_dir=tmp_path)
    with pytest.raises(ShrinkError, match="corpus"):
        load_packed(_cfg("corpus"), tok, data_dir_value=str(tmp_path), cache_dir=tmp_path)


def test_shared_corpus_reads(shared_data_dir: Path):
    docs = load_documents(str(shared_data_dir / "corpus" / "docs-en.jsonl.gz"), max_docs=5)
    assert len(docs) == 5 and all(len(d) > 20 for d in docs)


def test_missing_local_file_is_not_tried_on_the_hub(monkeypatch):
    import datasets

    def hub(*a, **k):
        raise AssertionError("a missing local file was looked up on the hub")

    monkeypatch.setattr(datasets, "load_dataset", hub)
    for name in ("mydata.txt", "sub/mydata.jsonl", "mydata.jsonl.gz"):
        with pytest.raises(ShrinkError, match=f"data file not found: {name}"):
            load_documents(name)


@pytest.mark.parametrize("name,payload,needle", [
    ("empty.jsonl", b"", "is empty"), ("blank.jsonl", b"\n \n", "is empty"), ("empty.txt", b"", "is empty"),
    ("binary.txt", bytes(range(256)) * 4, "not UTF-8 text"), ("zeros.txt", b"abc\0\0\0def", "not UTF-8 text"),
])
def test_empty_or_binary_files_are_named(tmp_path: Path, name: str, payload: bytes, needle: str):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(ShrinkError, match=needle) as err:
        load_documents(str(path))
    assert str(path) in str(err.value)

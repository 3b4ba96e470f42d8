"""Model sources: the embedded SmolLM2 teacher, GGUF files, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.perplexity import encode, perplexity, wikitext2_text
from common.errors import ShrinkError
from shrink.modeling import load_model, load_tokenizer
from shrink.sources import EMBEDDED, fetch_embedded, load_source


def test_truncated_gguf_is_a_clear_error(tmp_path: Path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)
    with pytest.raises(ShrinkError, match="corrupt or truncated GGUF"):
        load_source(str(bad), tmp_path)


def test_unknown_sources_are_named(tmp_path: Path):
    with pytest.raises(ShrinkError, match="unknown embedded model 'nope'"):
        load_source("embedded:nope", tmp_path)
    with pytest.raises(ShrinkError, match="model source not found"):
        load_source(str(tmp_path / "absent" / "dir"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShrinkError, match="neither config.json"):
        load_source(str(tmp_path / "empty"), tmp_path)


@pytest.mark.slow
def test_corrupt_cached_gguf_is_fetched_again(smollm2_artifact: Path):
    from common.paths import default_cache_dir

    cached = fetch_embedded("smollm2-135m-instruct", default_cache_dir())
    size = cached.stat().st_size
    with open(cached, "r+b") as f:  # truncate the cached copy: the sha256 check must catch it
        f.truncate(size // 2)
    again = fetch_embedded("smollm2-135m-instruct", default_cache_dir())
    assert again.stat().st_size == size


@pytest.mark.slow
def test_smollm2_import_matches_published_perplexity(smollm2_artifact: Path, shared_data_dir: Path):
    """The data README measured 13.7 on the first 1024 WikiText-2 test tokens (fp32, from the GGUF).
    The artifact stores bf16 weights, which moves the value by a little."""
    config = json.loads((smollm2_artifact / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    assert "quantization_config" not in config
    meta = json.loads((smollm2_artifact / "shrink.json").read_text())
    assert meta["stage"] == "import" and meta["metrics"]["params"] == 134_515_008
    model = load_model(smollm2_artifact, dtype="fp32")
    ids = encode(load_tokenizer(smollm2_artifact), wikitext2_text(shared_data_dir))[:1024]
    result = perplexity(model, ids, context=1024, stride=1024)
    assert result.ppl == pytest.approx(13.7, abs=0.3)


def test_embedded_registry_pins_a_checksum():
    spec = EMBEDDED["smollm2-135m-instruct"]
    assert spec.version == "0.1.2" and len(spec.sha256) == 64

"""ResultsFile: nested puts land in results.json at once, and the file is never half written."""

from __future__ import annotations

import json
from pathlib import Path

from common.results import ResultsFile


def test_put_writes_nested_keys_at_once(tmp_path):
    results = ResultsFile(tmp_path / "results.json", {"settings": {"out": Path("x")}, "models": {}})
    assert json.loads((tmp_path / "results.json").read_text()) == {"settings": {"out": "x"}, "models": {}}
    results.put("models", "tiny", "ppl_before", 12.5)
    results.put("kd", "runs", "ce", {"train_tokens": 1024})
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["models"] == {"tiny": {"ppl_before": 12.5}} and saved["kd"]["runs"]["ce"]["train_tokens"] == 1024
    assert not list(tmp_path.glob("*.partial"))

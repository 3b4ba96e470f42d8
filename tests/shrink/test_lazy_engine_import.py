"""`python -m shrink` loads every stage module (the stage registry) before its first check; none of
them may import the inference engine at the top, or every command and every rank of a launch pays
for the engine and torch._dynamo (seconds on CI's CPU) before it can refuse a bad setting."""

from __future__ import annotations

import subprocess
import sys

from support import REPO


def test_loading_the_stages_does_not_import_the_engine():
    code = ("import sys, shrink.__main__, shrink.launch, shrink.stages as stages; stages.get_stage('distill'); "
            "print(sorted(m for m in sys.modules if m == 'engine' or m.startswith('engine.')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]", f"the stages imported {result.stdout.strip()}"


def test_importing_the_engine_does_not_import_dynamo():
    # torch.nn.attention.bias imports torch._dynamo (~2 s on CI's CPU); the engine takes it only where it
    # attends to cached context (engine/layers/attention.py), so a server starting or a TP worker's decode
    # never pays for it.
    code = "import sys, engine, engine.model_runner, engine.server; print('torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "False"

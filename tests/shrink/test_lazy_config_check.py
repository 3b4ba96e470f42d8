"""`python -m shrink` checks its whole config before it imports torch or transformers: a bad value is
refused without the seconds (on CI's CPU) those imports take, in every command and every rank of a
launch. Each section check_config reads gets a bad value here, and a good config passes the whole
check, all in one fresh process whose imports are then listed."""

from __future__ import annotations

import json
import subprocess
import sys

from support import REPO

HEAVY = ("torch", "transformers")
# (overrides, what the one-line error names): one per part of shrink/config_check.py, in its order
BAD = [("seed=abc", "seed"), ("data.block_size=1", "data.block_size"), ("eval.speed.new_tokens=1", "eval.speed"),
       ("distill.lr=abc", "distill.lr"),
       ("stage=distill distill=medusa distill.medusa.num_heads=0", "medusa.num_heads"),
       ("stage=distill distill=medusa distill.lmbda=0.5", "distill.lmbda"), ("gqa.train.lr=-1", "gqa.train.lr"),
       ("gates.windows=0", "gates.windows"), ("+data.teacher_generated={ratio:2}", "data.teacher_generated.ratio"),
       ("prune.finetune.lr=-1", "prune.finetune.lr"),
       ("distill.qat={bits:5,group_size:64,symmetric:true}", "distill.qat.bits")]
CODE = """
import contextlib, io, json, sys
from shrink.__main__ import compose, main
out = {}
for overrides, _ in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        out[overrides] = [main(["run=" + sys.argv[2], *overrides.split()]), err.getvalue().strip()]  # stage: pipeline
compose(["stage=pipeline", "run=" + sys.argv[2], "+data.teacher_generated={ratio:0.5,num_samples:4}"])
compose(["stage=distill", "distill=medusa", "run=" + sys.argv[2]])
out["heavy"] = sorted(m for m in sys.modules if m.split(".")[0] in %r)
print(json.dumps(out))
""" % (HEAVY,)


def test_config_errors_are_reported_before_torch_is_imported(tmp_path):
    result = subprocess.run([sys.executable, "-c", CODE, json.dumps(BAD), str(tmp_path / "run")], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for overrides, needle in BAD:
        rc, err = out[overrides]
        assert rc == 2 and err.startswith("error: ") and needle in err and len(err.splitlines()) == 1, (overrides, err)
    assert out["heavy"] == [], f"checking the config imported {out['heavy'][:10]}"

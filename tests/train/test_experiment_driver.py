"""experiments/distill.py --quick runs end to end on the CPU on a tiny model and writes every result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support import REPO


def test_distill_experiment_quick(tiny_teacher: Path, shared_data_dir: Path, tmp_path: Path):
    out, student = tmp_path / "out", tmp_path / "student"
    result = subprocess.run([sys.executable, "experiments/distill.py",
                             *quick_args(tiny_teacher, shared_data_dir, out, "--save-student", str(student))],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert r["teacher_wikitext2_ppl"] > 1
    assert len(r["importance"]["block_influence"]) == 4 and r["importance"]["chosen"]["layers"]
    assert set(r["kd"]["runs"]) == {"ce", "fkl", "jsd", "fkl_layers"}
    assert all(run["train_tokens"] >= 1024 and run["wikitext2_ppl"] > 1 for run in r["kd"]["runs"].values())
    assert "teacher_generated" not in r["data"]  # off by default: the corpus alone
    assert {"hf_ce", "chunked_ce", "kd"} <= set(r["speed"])
    assert 0 <= r["dss"]["label_only"]["test_accuracy"] <= 1 and r["dss"]["label_rationale"]["alpha"] == 0.5
    saved = json.loads((student / "shrink.json").read_text())
    assert saved["metrics"]["kept_layers"] == r["importance"]["chosen"]["layers"]
    assert json.loads((student / "config.json").read_text())["num_hidden_layers"] == 2


def quick_args(tiny_teacher: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--teacher", str(tiny_teacher), "--data-dir", str(data_dir), "--out", str(out), "--tokens", "1024",
            "--quick", *extra]


def test_teacher_generated_samples_are_mixed_by_the_ratio_recorded_and_reused(tiny_teacher: Path,
                                                                             shared_data_dir: Path, tmp_path: Path,
                                                                             capsys):
    """--teacher-generated: the teacher's samples (our engine) are cached with their lineage, fill the asked
    share of the blocks every kd run trains on, are recorded in results.json, and a second invocation reuses them.

    Both invocations call the script's main() in this process (the script run as a file, as a subprocess, is
    test_distill_experiment_quick's): what is reused is the cache on disk, which two calls share as two
    processes would, without two more interpreters importing torch, transformers and the engine."""
    from experiments.distill import main
    from shrink.artifacts import Artifact
    from shrink.teacher_data import DATA_FILE, LINEAGE_FILE

    cache = tmp_path / "cache"
    flags = ["--parts", "kd", "--runs", "ce,fkl", "--teacher-generated", "8", "--teacher-ratio", "0.25",
             "--teacher-max-tokens", "24", "--teacher-cache", str(cache)]

    def run_main(out: Path) -> str:
        assert main(quick_args(tiny_teacher, shared_data_dir, out, *flags)) == 0
        return capsys.readouterr().out

    first = run_main(tmp_path / "a")
    assert "teacher data: generating 8 samples of 24 tokens" in first
    r = json.loads((tmp_path / "a" / "results.json").read_text())
    tg = r["data"]["teacher_generated"]
    entry = Path(tg["teacher_data"])
    assert entry.parent == cache / "teacher_data"
    samples = torch.load(entry / DATA_FILE, weights_only=True)["samples"]
    assert len(samples) == 8 and all(32 < len(s) <= 32 + 24 for s in samples)  # 32-token corpus prefix + its text
    lineage = json.loads((entry / LINEAGE_FILE).read_text())
    assert tg["lineage"] == lineage and lineage["count"] == 8
    assert lineage["teacher_content_hash"] == Artifact.load(tiny_teacher).content_hash
    assert (tg["teacher_data_samples"], tg["teacher_data_ratio"], tg["teacher_data_max_tokens"]) == (8, 0.25, 24)
    assert tg["blocks"] == r["data"]["train_tokens_available"] // 64  # the corpus outnumbers 1024 tokens' blocks
    assert tg["generated_blocks"] == round(0.25 * tg["blocks"])
    assert tg["generated_share"] == pytest.approx(0.25, abs=1e-3)
    n_packed = (sum(map(len, samples)) + len(samples)) // 64  # each sample + EOS, packed into 64-token blocks
    assert tg["generated_blocks_available"] == n_packed and tg["distinct_generated_tokens"] == n_packed * 64
    assert tg["distinct_tokens"] == tg["distinct_corpus_tokens"] + tg["distinct_generated_tokens"]
    assert set(r["kd"]["runs"]) == {"ce", "fkl"} and all(x["train_tokens"] >= 1024 for x in r["kd"]["runs"].values())

    second = run_main(tmp_path / "b")
    assert "teacher data: 8 samples reused" in second and "generating" not in second
    again = json.loads((tmp_path / "b" / "results.json").read_text())["data"]["teacher_generated"]
    assert again["teacher_data"] == tg["teacher_data"] and again["generated_blocks"] == tg["generated_blocks"]


def test_teacher_mix_repeats_the_corpus_to_the_budget_and_bad_flags_are_named(tiny_teacher: Path, tmp_path: Path,
                                                                              capsys):
    """A budget beyond the corpus: the mix has the budget's blocks (the corpus repeated, the samples not cut
    to the corpus' size) in the asked share; a bad ratio or count is refused naming its flag."""
    from experiments.distill import parse_args, teacher_mix
    from shrink.modeling import load_tokenizer

    base = ["--teacher", str(tiny_teacher), "--data-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--quick"]
    args = parse_args([*base, "--tokens", str(40 * 64), "--teacher-generated", "16", "--teacher-max-tokens", "40"])
    corpus = torch.randint(3, 300, (10, 64), generator=torch.Generator().manual_seed(0))
    mixed, row = teacher_mix(corpus, load_tokenizer(tiny_teacher), args, torch.device("cpu"))
    assert mixed.shape == (40, 64) and row["blocks"] == 40 and row["generated_blocks"] == 20
    corpus_rows = {tuple(x) for x in corpus.tolist()}
    from_corpus = [tuple(x) in corpus_rows for x in mixed.tolist()]
    assert sum(from_corpus) == 20 and row["distinct_corpus_tokens"] == len({tuple(x) for x in mixed.tolist()
                                                                             if tuple(x) in corpus_rows}) * 64
    assert row["generated_blocks_available"] > 10  # more generated blocks than the corpus has: all of them used
    from shrink.teacher_data import DATA_FILE
    from train.data import mix_generated

    samples = torch.load(Path(row["teacher_data"]) / DATA_FILE, weights_only=True)["samples"]
    eos = load_tokenizer(tiny_teacher).eos_token_id  # the blocks distill.py mixed before train.data.mix_to_budget
    assert torch.equal(mixed, mix_generated(corpus.repeat(4, 1), samples, 0.5, eos, args.seed))
    assert row["distinct_generated_tokens"] == min(20, row["generated_blocks_available"]) * 64
    for bad, name in ((["--teacher-ratio", "1.5"], "ratio"), (["--teacher-ratio", "0"], "ratio"),
                      (["--teacher-max-tokens", "0"], "max_tokens"), (["--teacher-generated", "-1"], "generated")):
        flags = ["--teacher-generated", "4", *bad] if "--teacher-generated" not in bad else bad
        with pytest.raises(SystemExit):
            parse_args([*base, "--tokens", "64", *flags])
        assert name in capsys.readouterr().err

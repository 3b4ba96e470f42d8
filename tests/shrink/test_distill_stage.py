"""stage=distill from the command line: importance-chosen layers + width + layer map; rationale training on
real CQA examples with test accuracy (both read the artifact: the command's main() in this process); the
vocabulary-mismatch and resume errors (one line from a real `python -m shrink`)."""

from __future__ import annotations

import json
from pathlib import Path

from support import run_cli, run_main, save_tiny_artifact

TINY = ["logging=none", "data=pydoc", "data.max_docs=30", "data.block_size=64", "distill.batch_size=2",
        "distill.checkpoint_every=0", "distill.save_dtype=fp32", "distill.val_batches=1"]


def test_importance_width_and_layer_map(tiny_teacher: Path, tmp_path: Path):
    result = run_main("stage=distill", f"run={tmp_path}", f"input={tiny_teacher}", "student=importance",
                      "student.keep_layers=importance:2", "student.calib_blocks=4",
                      "student.width.intermediate_size=96", "distill.max_steps=3", "distill.layer_map=auto",
                      "distill.layer_weight=0.5", "distill.losses.forward_kl=0", "+distill.losses.jsd={beta: 0.5}",
                      "distill.losses.ce=0.2", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((tmp_path / "distill" / "shrink.json").read_text())
    m = meta["metrics"]
    assert len(m["layer_importance"]) == 4 and len(m["kept_layers"]) == 2
    assert 0 in m["kept_layers"] and 3 in m["kept_layers"]  # ends always kept
    assert "val_layers" in m and "val_jsd" in m
    config = json.loads((tmp_path / "distill" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["intermediate_size"] == 96


def test_rationale_distillation_on_cqa(tiny_teacher: Path, tmp_path: Path, shared_data_dir: Path):
    # The tiny tokenizer covers every byte, so real CQA text works with the tiny model.
    result = run_main("stage=distill", f"run={tmp_path}", f"input={tiny_teacher}", "student=full", "data=cqa",
                      "distill=rationale", "data.max_train=60", "data.max_eval=6", "data.max_len=96",
                      "data.val_fraction=0.1", "distill.max_steps=3", "logging=none", "distill.batch_size=2",
                      "distill.checkpoint_every=0", "distill.save_dtype=fp32", "distill.val_batches=1",
                      f"data_dir={shared_data_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads((tmp_path / "distill" / "shrink.json").read_text())["metrics"]
    assert m["cqa_eval_n"] == 6 and 0.0 <= m["cqa_accuracy"] <= 1.0
    assert "val_label_ce" in m and "val_rationale_ce" in m
    assert m["train_examples"] == 54


def test_vocab_mismatch_through_the_cli(tiny_teacher: Path, tmp_path: Path):
    other = save_tiny_artifact(tmp_path / "other", vocab_size=300)
    result = run_cli("stage=distill", f"run={tmp_path / 'run'}", f"input={tiny_teacher}", "student.init=pretrained",
                     f"student.path={other}", "distill.max_steps=1", *TINY)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "student.path" in result.stderr and "one vocabulary" in result.stderr


def _checkpoint_of_every_2(teacher_dir: Path, ckpt_dir: Path) -> None:
    """What an interrupted `student.keep_layers=every:2` distill leaves behind: a step-2 checkpoint."""
    import torch

    from shrink.modeling import load_model
    from train.loop import TrainConfig, train_distill
    from train.student_init import student_from_teacher

    teacher = load_model(teacher_dir)
    student = student_from_teacher(teacher, [0, 2])
    data = torch.randint(3, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    tc = TrainConfig(max_steps=3, batch_size=2, warmup_steps=1, checkpoint_every=2, chunk_size=64, val_batches=1)
    train_distill(student, teacher, data, data[:2], tc, ckpt_dir)
    assert (ckpt_dir / "trainer_state.json").is_file()


def test_resume_with_another_student_is_one_line(tiny_teacher: Path, tmp_path: Path):
    _checkpoint_of_every_2(tiny_teacher, tmp_path / ".distill.ckpt")
    result = run_cli("stage=distill", f"run={tmp_path}", f"input={tiny_teacher}", "resume=true",
                     "student.keep_layers=first:3", "distill.max_steps=3", *TINY)
    assert result.returncode == 2, result.stderr[-2000:]
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "resume=true" in err and "student.keep_layers" in err
    assert (tmp_path / ".distill.ckpt" / "trainer_state.json").is_file()  # the checkpoint is kept


def test_resume_without_a_checkpoint_says_so(tiny_teacher: Path, tmp_path: Path):
    result = run_cli("stage=distill", f"run={tmp_path}", f"input={tiny_teacher}", "resume=true",
                     "distill.max_steps=1", *TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no checkpoint" in result.stdout and "step 0" in result.stdout

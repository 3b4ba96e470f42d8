"""resume=true refuses a sharded (FSDP2, torch.distributed.checkpoint) checkpoint written for another
student shape, and accepts one written for this shape (a tied LM head named under both its names)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp
from transformers import AutoModelForCausalLM

from common.errors import ShrinkError
from support import tiny_llama_config
from train.checkpoint import SHARDED_MODEL_DIR, STATE_FILE, check_checkpoint_fits, saved_shapes


def _sharded_checkpoint(path: Path, model) -> Path:
    # accelerate's save_state under FSDP2 writes {"model": state_dict} with DCP into this directory.
    dcp.save({"model": model.state_dict()}, storage_writer=dcp.FileSystemWriter(str(path / SHARDED_MODEL_DIR)),
             no_dist=True)
    (path / STATE_FILE).write_text(json.dumps({"step": 4}))
    return path


def test_sharded_checkpoint_of_another_student_is_refused(tmp_path: Path):
    two_layers = AutoModelForCausalLM.from_config(tiny_llama_config(num_hidden_layers=2))
    ckpt = _sharded_checkpoint(tmp_path / "ckpt", two_layers)
    shapes = saved_shapes(ckpt)
    assert shapes["model.layers.1.mlp.up_proj.weight"] == (128, 64)
    assert "lm_head.weight" in shapes and "model.embed_tokens.weight" in shapes  # tied: both names
    check_checkpoint_fits(ckpt, AutoModelForCausalLM.from_config(tiny_llama_config(num_hidden_layers=2)),
                          "student.*")
    three_layers = AutoModelForCausalLM.from_config(tiny_llama_config(num_hidden_layers=3))
    with pytest.raises(ShrinkError, match=r"written for another model \(9 tensors missing.*resume with the "
                                          r"interrupted run's student\.\*"):
        check_checkpoint_fits(ckpt, three_layers, "student.*")
    narrower = AutoModelForCausalLM.from_config(tiny_llama_config(num_hidden_layers=2, intermediate_size=96))
    with pytest.raises(ShrinkError, match=r"6 of another shape"):
        check_checkpoint_fits(ckpt, narrower, "student.*")

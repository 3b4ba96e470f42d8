"""The training library names a bad setting by its own name (no config section: it does not know
where the user wrote it); the caller's config_section adds "distill", "gqa.train" or "prune.finetune"."""

from __future__ import annotations

import pytest

from common.errors import SettingError, ShrinkError, config_section
from train.config import TrainConfig
from train.layer_distill import parse_layer_map
from train.losses import parse_loss_spec

SECTIONS = ("distill", "gqa.train", "prune.finetune")


def _message(fn) -> str:
    with pytest.raises(SettingError) as err:
        fn()
    return str(err.value)


@pytest.mark.parametrize("fn, message", [
    (lambda: TrainConfig(lr=0.0).validate(), "lr must be > 0, got 0.0"),
    (lambda: TrainConfig(batch_size=0).validate(), "batch_size must be >= 1, got 0"),
    (lambda: TrainConfig(layer_loss="l1").validate(), "layer_loss='l1': expected one of ('mse', 'cosine')"),
    (lambda: TrainConfig(lmbda=0.5, prompt_len=0).validate(), "prompt_len must be >= 1 for on-policy / seq-KD, got 0"),
    (lambda: TrainConfig.from_cfg({"lr": "fast"}, seed=0, block_size=8), "lr: expected a finite number, got 'fast'"),
    (lambda: TrainConfig.from_cfg({"tokens": 2.5}, seed=0, block_size=8), "tokens: expected an integer, got 2.5"),
    (lambda: parse_loss_spec({}, 1.0), "losses is empty: name at least one loss with a weight"),
    (lambda: parse_loss_spec({"forward_kl": 0.0}, 1.0), "losses: every weight is 0"),
    (lambda: parse_loss_spec({"kl": {"temperature": 0}}, 1.0), "losses.kl.temperature must be > 0, got 0"),
    (lambda: parse_loss_spec({"sharp": {"loss": "jsd", "beta": 2}}, 1.0), "losses.sharp.beta must be in [0, 1], got 2"),
    (lambda: parse_layer_map("auto", 3, 8), "layer_map=auto needs a student made of teacher layers "
                                            "(student.init=teacher_layers)"),
])
def test_library_errors_name_the_setting_without_a_section(fn, message):
    got = _message(fn)
    assert got == message
    assert not any(section in got for section in SECTIONS)


def test_an_unknown_loss_names_its_key():
    got = _message(lambda: parse_loss_spec({"nope": 1.0}, 1.0))
    assert got.startswith("losses.nope: unknown loss 'nope'; known: ") and "forward_kl" in got


def test_train_config_has_no_section_field():
    assert "prefix" not in TrainConfig.__dataclass_fields__


@pytest.mark.parametrize("section", SECTIONS)
def test_the_caller_adds_its_section(section):
    with pytest.raises(ShrinkError) as err, config_section(section):
        TrainConfig.from_cfg({"lr": 0.0}, seed=0, block_size=8)
    assert str(err.value) == f"{section}.lr must be > 0, got 0.0"
    with pytest.raises(ShrinkError) as err, config_section(section):
        parse_loss_spec({"jsd": {"beta": 1.5}}, 1.0)
    assert str(err.value) == f"{section}.losses.jsd.beta must be in [0, 1], got 1.5"

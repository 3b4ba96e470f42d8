"""SettingError names a setting by its own name; config_section puts the config section in front once."""

from __future__ import annotations

import pytest

from common.errors import SettingError, ShrinkError, check_type, config_section


def test_a_setting_error_names_the_setting_alone():
    assert str(SettingError("group_size", "must divide 128")) == "group_size: must divide 128"
    assert str(SettingError("lr", "must be > 0, got 0", sep=" ")) == "lr must be > 0, got 0"
    assert isinstance(SettingError("lr", "x"), ShrinkError)  # the CLI prints it as one line


def test_config_section_adds_the_section_once():
    with pytest.raises(ShrinkError) as err, config_section("gqa.train"):
        raise SettingError("lr", "must be > 0, got 0", sep=" ")
    assert str(err.value) == "gqa.train.lr must be > 0, got 0" and not isinstance(err.value, SettingError)
    # An outer section leaves an inner one's message alone (prune.finetune inside prune).
    with pytest.raises(ShrinkError) as err, config_section("prune"), config_section("prune.finetune"):
        raise SettingError("batch_size", "must be >= 1, got 0", sep=" ")
    assert str(err.value) == "prune.finetune.batch_size must be >= 1, got 0"
    # Other errors pass through unchanged.
    with pytest.raises(ShrinkError, match="^data file not found$"), config_section("distill"):
        raise ShrinkError("data file not found")


def test_check_type():
    assert check_type(3, float, "alpha") == 3.0 and check_type(True, bool, "flag") is True
    with pytest.raises(SettingError, match=r"^bits: expected an int, got 4.5$"):
        check_type(4.5, int, "bits")
    with pytest.raises(SettingError, match=r"^alpha: expected a finite float, got nan$"):
        check_type(float("nan"), float, "alpha")

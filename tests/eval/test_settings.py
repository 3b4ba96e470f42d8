"""The eval.* keys: defaults parse, and each bad key or value is one error naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from common.errors import ShrinkError
from eval.settings import HarnessSettings

DEFAULTS = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/eval/default.yaml"))


def test_defaults_parse():
    s = HarnessSettings.from_dict(DEFAULTS)
    assert s.speed.batch_sizes == [1, 4] and s.tasks.names == ["cqa", "svamp", "gsm8k"]
    assert not s.speculative and s.plots


@pytest.mark.parametrize("change,needle", [
    ({"speeed": {}}, "eval.speeed"),
    ({"speed": {"batch_sizes": [1, 0]}}, "eval.speed.batch_sizes"),
    ({"speed": {"batch_size": [1]}}, "eval.speed.batch_size"),
    ({"speed": {"new_tokens": 1}}, "eval.speed.new_tokens"),
    ({"tasks": {"names": ["mmlu"]}}, "eval.tasks.names"),
    ({"tasks": {"limit": "4"}}, "eval.tasks.limit"),
    ({"load": {"concurrency": 0}}, "eval.load.concurrency"),
    ({"agreement": {"window_len": 1}}, "eval.agreement.window_len"),
    ({"speculative": "yes"}, "eval.speculative"),
    ({"engine": 3}, "eval.engine"),
])
def test_bad_values_name_their_key(change, needle):
    raw = {**DEFAULTS, **{k: ({**DEFAULTS[k], **v} if isinstance(v, dict) else v) for k, v in change.items()
                          if k in DEFAULTS}, **{k: v for k, v in change.items() if k not in DEFAULTS}}
    with pytest.raises(ShrinkError, match=needle.replace(".", r"\.")):
        HarnessSettings.from_dict(raw)


def test_gpu_preset_composes_with_the_reference_sizes():
    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose(config_name="config", overrides=["eval=gpu"])
    s = HarnessSettings.from_dict(OmegaConf.to_container(cfg.eval, resolve=True))
    assert s.speed.batch_sizes == [1, 16, 64] and s.speculative and s.tasks.names == ["cqa", "svamp", "gsm8k"]
    assert cfg.eval.context == 2048  # the perplexity keys come from the default

"""The eval.* keys: defaults parse, and each bad key or value is one error naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from common.errors import ShrinkError
from eval.perplexity import WindowProtocol
from eval.settings import HarnessSettings, WikitextSettings, perplexity_protocols

DEFAULTS = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/eval/default.yaml"))


def test_defaults_parse():
    s = HarnessSettings.from_dict(DEFAULTS)
    assert s.speed.batch_sizes == [1, 4] and s.tasks.names == ["cqa", "svamp", "gsm8k"]
    assert not s.speculative and s.plots
    assert s.tasks.cqa_mc and s.speed.hf_compile == "auto"
    assert s.wikitext2 == WikitextSettings(context=2048, stride=2048, full_windows_only=True, max_windows=None)


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
    ({"engine": {"compressed_weights": "dense"}}, "eval.engine.compressed_weights"),
    ({"wikitext2": {"stride": 4096}}, "eval.wikitext2.stride"),
    ({"wikitext2": {"context": 1}}, "eval.wikitext2.context"),
    ({"wikitext2": {"max_windows": 0}}, "eval.wikitext2.max_windows"),
    ({"wikitext2": {"max_windows": "all"}}, "eval.wikitext2.max_windows"),
    ({"wikitext2": {"full_windows": True}}, "eval.wikitext2.full_windows"),
    ({"tasks": {"cqa_mc": "yes"}}, "eval.tasks.cqa_mc"),
    ({"speed": {"hf_compile": "student"}}, "eval.speed.hf_compile"),
    ({"speculative_settings": {"k_policy": "best"}}, "eval.speculative_settings.k_policy"),
])
def test_bad_values_name_their_key(change, needle):
    raw = {**DEFAULTS, **{k: ({**DEFAULTS[k], **v} if isinstance(v, dict) else v) for k, v in change.items()
                          if k in DEFAULTS}, **{k: v for k, v in change.items() if k not in DEFAULTS}}
    with pytest.raises(ShrinkError, match=needle.replace(".", r"\.")):
        HarnessSettings.from_dict(raw)


def test_gpu_preset_composes_with_the_reference_sizes():
    cfg = _compose(["eval=gpu"])
    s = HarnessSettings.from_dict(OmegaConf.to_container(cfg.eval, resolve=True))
    assert s.speed.batch_sizes == [1, 16, 64] and s.speculative and s.tasks.names == ["cqa", "svamp", "gsm8k"]
    assert cfg.eval.context == 2048  # the perplexity keys come from the default
    assert s.wikitext2 == WikitextSettings()  # the fixed protocol
    # The speculative row takes the engine's measured k policy (the H200 reference run's fixed k = 4 was
    # 0.70x the teacher alone at batch 16); the default keeps k fixed.
    assert s.speculative_settings.engine_config("d") == {
        "model": "d", "num_speculative_tokens": 4, "num_speculative_tokens_per_batch_size": "auto"}
    assert s.speculative_settings.label == "k<=4, auto"
    fixed = HarnessSettings.from_dict(DEFAULTS).speculative_settings
    assert fixed.engine_config("d") == {"model": "d", "num_speculative_tokens": 4} and fixed.label == "k=4"


def test_wikitext2_gets_the_fixed_protocol_and_heldout_the_sliding_windows():
    s = HarnessSettings.from_dict(DEFAULTS)
    protocols, notes = perplexity_protocols(["wikitext2", "heldout"], DEFAULTS["context"], DEFAULTS["stride"],
                                            DEFAULTS["max_windows"], s.wikitext2, max_positions=8192)
    assert protocols == {"wikitext2": WindowProtocol(2048, 2048, None, full_windows_only=True),
                         "heldout": WindowProtocol(2048, 512, None, full_windows_only=False)}
    assert notes == []


def test_contexts_are_capped_at_the_models_positions_with_a_note():
    s = HarnessSettings.from_dict(DEFAULTS)
    protocols, notes = perplexity_protocols(["wikitext2", "heldout"], 2048, 512, None, s.wikitext2, max_positions=1024)
    assert protocols["wikitext2"] == WindowProtocol(1024, 1024, None, full_windows_only=True)  # still non-overlapping
    assert protocols["heldout"] == WindowProtocol(1024, 512, None)
    assert len(notes) == 2 and "eval.wikitext2.context=2048" in notes[0]
    assert "max_position_embeddings (1024)" in notes[0]
    assert "eval.context=2048" in notes[1]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        return compose(config_name="config", overrides=overrides)


def test_the_demo_caps_wikitext2_on_its_own_keys():
    """`make demo` keeps its 6 windows of 256 on a 2-core CPU; the default is the fixed protocol."""
    cfg = _compose(["experiment=demo"])
    s = HarnessSettings.from_dict(OmegaConf.to_container(cfg.eval, resolve=True))
    protocols, _ = perplexity_protocols(["wikitext2"], cfg.eval.context, cfg.eval.stride, cfg.eval.max_windows,
                                        s.wikitext2, max_positions=8192)
    assert protocols["wikitext2"] == WindowProtocol(256, 256, 6, full_windows_only=True)


def test_compressed_weights_values_are_the_engines():
    """eval.settings repeats the engine's values (it is read without importing the engine)."""
    from engine.layers.options import COMPRESSED_WEIGHTS
    from eval.settings import COMPRESSED_WEIGHTS as EVAL_VALUES

    assert EVAL_VALUES == COMPRESSED_WEIGHTS

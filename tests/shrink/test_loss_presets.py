"""Each distill preset trains with exactly the loss terms it declares: Hydra merges dicts, so a preset
composed from `distill=default` must not inherit default's terms (forward_kl 1.0 + ce 0.5) on top of
its own. Composed through the real CLI config (conf/config.yaml), as `python -m shrink` does."""

from __future__ import annotations

import pytest

from shrink.__main__ import compose
from support import REPO
from train.losses import parse_loss_spec

# Each preset's declared terms (key -> weight); a new preset must be added here.
DECLARED = {
    "default": {"forward_kl": 1.0, "ce": 0.5},
    "gkd": {"jsd": 1.0},
    "rationale": {"ce": 1.0},
    "drafter": {"tvd": 1.0},
    "drafter_ce": {"ce": 1.0},
    "medusa": {"tvd": 1.0},
}


def active_terms(section) -> dict[str, float]:
    """The terms the training loop will use (weight-0 terms dropped, as train/loop.py does)."""
    return {key: weight for key, weight, _ in parse_loss_spec(section.losses, float(section.temperature))}


def test_every_preset_is_listed():
    presets = {p.stem for p in (REPO / "conf" / "distill").glob("*.yaml")}
    assert presets == set(DECLARED)


@pytest.mark.parametrize("preset", sorted(DECLARED))
def test_a_preset_trains_with_exactly_its_declared_terms(preset):
    cfg = compose(["stage=distill", f"distill={preset}"])  # medusa trains heads: a stage of its own, not a pipeline's
    assert active_terms(cfg.distill) == DECLARED[preset]


def test_the_default_preset_needs_no_selection():
    assert active_terms(compose([]).distill) == DECLARED["default"]


def test_gkd_keeps_its_jsd_beta():
    (_, _, jsd), = parse_loss_spec(compose(["distill=gkd"]).distill.losses, 1.0)
    assert jsd.beta == 0.5


def test_gqa_uptraining_and_prune_finetune_train_with_exactly_their_terms():
    cfg = compose([])
    assert active_terms(cfg.gqa.train) == {"forward_kl": 1.0, "ce": 0.5}
    assert active_terms(cfg.prune.finetune) == {"forward_kl": 1.0}


def test_a_preset_terms_still_take_an_added_term_from_the_command_line():
    cfg = compose(["distill=rationale", "+distill.losses.forward_kl=0.5"])
    assert active_terms(cfg.distill) == {"ce": 1.0, "forward_kl": 0.5}


def test_selecting_a_loss_set_replaces_the_preset_terms():
    assert active_terms(compose(["distill/losses=ce"]).distill) == {"ce": 1.0}
    assert active_terms(compose(["distill=drafter", "distill/losses=kd"]).distill) == DECLARED["default"]
    assert active_terms(compose(["stage=distill", "distill=medusa", "distill/losses=forward_kl"]).distill) == {"forward_kl": 1.0}

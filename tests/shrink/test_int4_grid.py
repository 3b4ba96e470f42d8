"""experiments/int4_grid.py: the Q4_1 grid is found where it is and reproduced exactly, the integer-zero and
symmetric grids are not, and the script's flow on a tiny model (CPU) gives every variant its error and
perplexity, the model restored after each."""

from __future__ import annotations

import json

import pytest
import torch

from support import load_experiment, save_tiny_artifact

G = load_experiment("int4_grid")


def _on_q4_1_grid(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    """A weight made as GGUF's Q4_1 makes one: codes 0..15 (both extremes in every group), a float min and step."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out, inp // 32, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15
    d = torch.rand(out, inp // 32, 1, generator=g) * 0.02 + 1e-3
    lo = -torch.rand(out, inp // 32, 1, generator=g) * 0.1
    return (lo + q * d).reshape(out, inp)


def test_q4_1_grid_is_reproduced_and_measured():
    w = _on_q4_1_grid(24, 96)
    back, dist = G.q4_1(w)
    assert dist < 1e-4 and torch.allclose(back, w, atol=1e-6)
    moved = w + 0.25 * (torch.rand_like(w) - 0.5) * 1e-3  # off the grid by up to an eighth of the smallest step
    assert G.q4_1(moved)[1] > 1e-3
    with pytest.raises(ValueError, match="group 32"):
        G.q4_1(torch.randn(4, 40))


def test_other_int4_grids_miss_a_q4_1_weight():
    """The integer zero point cannot place a float min: asym g32 and sym g64 leave error where Q4_1 leaves none."""
    w = _on_q4_1_grid(24, 128, seed=1)
    for name in ("asym_g32", "sym_g64"):
        err = (G.VARIANTS[name][1](w) - w).norm() / w.norm()
        assert err > 1e-2, name
    assert (G.VARIANTS["q4_1_g32"][1](w) - w).norm() / w.norm() < 1e-5


def test_flow_on_a_tiny_model(tmp_path):
    from transformers import AutoModelForCausalLM

    path = save_tiny_artifact(tmp_path / "m", max_position_embeddings=2048)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    ids = torch.randint(0, model.config.vocab_size, (2 * 2048 + 1,))
    recs = []
    G.run(model, ids, 2, ["q4_1_g32", "asym_g32", "sym_g128", "int8"], recs.append)
    by = {r["variant"]: r for r in recs}
    assert by["original"]["windows"] == 2 and by["original"]["ppl"] > 1
    assert "skipped" in by["sym_g128"]  # 128 does not divide 64
    for name in ("q4_1_g32", "asym_g32", "int8"):
        assert by[name]["rel_weight_error"] > 0 and by[name]["ppl"] > 1, by[name]
    assert by["int8"]["rel_weight_error"] < by["asym_g32"]["rel_weight_error"]
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    json.dumps(recs)

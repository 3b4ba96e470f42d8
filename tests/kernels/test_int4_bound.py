"""experiments/int4_bound.py on CPU (the interpreter): each load-only level's per-program fold equals
its torch reference on random codes at ragged N and K (so the kernels read exactly the words,
scales and inputs the fast path's tiles cover, once each), with deeper unrolling and split-K; the
real level (d) is gemv's fast path itself; every variant's config is one the fast path can tile at
the Llama-2-7B shapes (the timings need the GPU)."""

from __future__ import annotations

import json

import pytest
import torch

from experiments.int4_bound import (E_VARIANTS, G_VARIANTS, LEVELS, VARIANTS, fold, fold_ref, stream_read,
                                    stream_read_ref, variant_config)
from experiments.quant_gemv_sweep import SHAPES, make_weights
from kernels import quant as ref
from kernels.gemv import _fast_words, gemv


def _weights(n: int, k: int, group: int, zero: bool):
    (w, q), = make_weights(f"int4_g{group}" + ("_zero" if zero else ""), n, k, 1, dev="cpu")[0]
    return w, q["scale"], q["zero"]


@pytest.mark.parametrize("level", sorted(LEVELS.values()))
@pytest.mark.parametrize("n, k, group, zero, config, unroll, split", [
    (37, 640, 128, False, (1, 4, 256, 2), 2, 1),   # ragged N and K (3 steps, the last half), g128
    (37, 640, 128, False, (1, 8, 128, 4), 3, 2),   # 5 steps in 2 parts of 3, unrolled 3 (overhang masked)
    (21, 200, 8, True, (1, 2, 64, 2), 4, 3),       # g8 (a scale per word), zero points, 4 steps in 3 parts
    (19, 96, 16, True, (1, 4, 16, 1), 2, 1),       # R 2 words a run, g16
])
def test_fold_equals_reference(level, n, k, group, zero, config, unroll, split):
    torch.manual_seed(level * 7 + n)
    w, scale, zp = _weights(n, k, group, zero)
    x = torch.randn(1, k, dtype=torch.bfloat16)
    got = fold(x, w, scale, zp, level, config, unroll, split)
    assert torch.equal(got, fold_ref(x, w, scale, zp, level, config, split))


@pytest.mark.parametrize("nbytes, programs, block", [
    (37 * 320, None, 64),     # ragged: 2,960 words in 47 blocks of 64, the last part-filled; a program a block
    (37 * 320, 5, 64),        # 5 programs striding over the 47 blocks (10 or 9 each)
    (4 * 1000, 64, 16),       # more programs than blocks' worth: capped at the 63 blocks
])
def test_stream_read_equals_reference(nbytes, programs, block):
    """The size-matched read ceiling reads every word once: its per-program sums equal torch's."""
    torch.manual_seed(nbytes)
    w = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    got = stream_read(w, programs, block)
    expected = stream_read_ref(w, programs, block)
    assert got.shape == expected.shape and torch.equal(got, expected)
    assert int(got.long().sum()) != 0


def test_levels_fold_what_they_add():
    """Each level changes the fold (its loads are in it): random scales and x are never all zero."""
    w, scale, zp = _weights(37, 640, 128, False)
    x = torch.randn(1, 640, dtype=torch.bfloat16)
    folds = [fold_ref(x, w, scale, zp, level, (1, 4, 256, 2)) for level in range(3)]
    assert not torch.equal(folds[0], folds[1]) and not torch.equal(folds[1], folds[2])


def test_real_level_is_gemv_fast():
    """(d): the ladder times gemv(fast=True) at the level-(a) config; at a ragged shape it matches the
    fp32 reference on the dequantized weight."""
    n, k, group = 37, 640, 128
    w, scale, zp = _weights(n, k, group, False)
    x = torch.randn(1, k, dtype=torch.bfloat16)
    cfg, level, _, _ = variant_config("d_real", n, k, group)
    assert level == 3 and cfg == variant_config("a_codes", n, k, group)[0]
    got = gemv(x, w, quant="int4", scale=scale, fast=True, config=cfg)
    expected = ref.int4_linear_fast_ref(x, w, scale, None)
    assert ((got.float() - expected.float()).norm() / expected.float().norm()) < 1e-2


def test_bad_input_is_named():
    w, scale, zp = _weights(8, 256, 128, False)
    with pytest.raises(ValueError, match="level"):
        fold(torch.randn(1, 256), w, scale, zp, 3, (1, 4, 256, 2))
    with pytest.raises(ValueError, match="x"):
        fold(torch.randn(2, 256), w, scale, zp, 0, (1, 4, 256, 2))


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_variants_tile_the_7b_shapes(shape):
    n, k, _ = SHAPES[shape]
    assert set(VARIANTS) >= set(E_VARIANTS) | set(LEVELS)
    for name in VARIANTS:
        (block_m, block_n, block_k, warps), level, unroll, split = variant_config(name, n, k, 128)
        assert block_m == 1 and block_n >= 1 and warps in (2, 4, 8) and unroll >= 1 and split >= 1
        gpt, wpg = _fast_words("int4", 128, block_k)
        assert gpt * wpg * 8 == block_k and block_k <= 8192


SM90_LADDER = """
import json
from experiments.int4_bound import VARIANTS, sass_stats
from experiments.quant_gemv_sweep import SHAPES
for shape in ("o_proj", "down"):
    for name in VARIANTS:
        if name != "d_real_pdl" and (shape == "down" or not name.startswith("e_")):
            print(json.dumps(sass_stats(name, *SHAPES[shape][:2])))
"""


def test_ladder_compiles_for_sm90_and_keeps_its_loads():
    """Every variant compiles for sm_90 (the interpreter runs what ptxas may refuse); the folds keep
    the loads: the codes as 128-bit loads at every level, the scales (32-bit) from level (b) on, none
    in f_empty, and the load-only levels spill nothing (their timings are of loads, not local memory)."""
    from test_quant_gemv_fast import _compile_sm90

    recs = [json.loads(line) for line in _compile_sm90(SM90_LADDER).strip().splitlines() if line.startswith("{")]
    assert len(recs) == 2 * 5 + len(E_VARIANTS)
    for rec in recs:
        ldg, name = rec["ldg"], rec["variant"]
        if name == "f_empty":
            assert not ldg, rec
            continue
        assert ldg.get("LDG.E.128", 0) > 0, rec
        assert ("LDG.E" in ldg) == (name in ("b_scales", "c_x", "d_real")), rec
        if name != "d_real":
            assert rec["spill_bytes"] == 0 or name == "e_k4096", rec


def test_main_flow_on_cpu(monkeypatch, tmp_path):
    """main's flow at a tiny shape on CPU (timing and ceiling stubbed; the GPU times them): a JSON
    line per variant, none an error, each with its config, programs and bytes."""
    import experiments.int4_bound as B

    monkeypatch.setattr(B, "DEVICE", "cpu")
    monkeypatch.setattr(B, "SHAPES", {"tiny": (12, 512, "none")})
    monkeypatch.setattr(B, "COPY_BYTES", 1)
    monkeypatch.setattr(B, "graph_seconds", lambda run: (run(), 1e-5)[1])
    monkeypatch.setattr(B, "copy_ceiling_tbps", lambda: 4.0)
    B.main(["--json", str(tmp_path / "b.jsonl")])
    recs = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    measures = [r for r in recs if r["kind"] == "measure"]
    ladder = [v for v in VARIANTS if not v.startswith("e_")]
    assert [r["variant"] for r in measures] == ladder + G_VARIANTS + list(E_VARIANTS) and recs[-1]["kind"] == "done"
    for r in measures:
        assert "error" not in r and r["us"] == pytest.approx(10.0 / 8), r  # 8 weight copies a graph
        if r["variant"] in G_VARIANTS:  # what each ceiling moves: the codes' bytes, or the bf16 weight's
            assert r["read_bytes"] == (12 * 512 * 2 if r["variant"] == "g_copy_bf16" else 12 * 256), r
            assert r["read_of_copy_ceiling"] == pytest.approx(r["read_bytes"] / 1.25e-6 / 4e12), r
        else:
            assert r["programs"] == -(-12 // r["config"][1]) * r["split"]
    assert measures[0]["read_bytes"] == 0 and measures[1]["read_bytes"] == 12 * 256

"""experiments/int4_bound.py on CPU (the interpreter): each load-only level's per-program fold equals
its torch reference on random codes at ragged N and K (so the kernels read exactly the words,
scales and inputs the fast path's tiles cover, once each), with deeper unrolling and split-K; the
real level (d) is gemv's fast path itself; every variant's config is one the fast path can tile at
the Llama-2-7B shapes (the timings need the GPU). The tile-major rows (t_*): the repack is a lossless
permutation whose every (BLOCK_N x BLOCK_K) tile is one contiguous chunk, and the tiled GEMV equals the
dequantize-then-matmul reference (groups 32 / 64 / 128, with and without zero points, split-K, runs of 4
and 8 words, ragged N and K), its codes-only walk reading each word once."""

from __future__ import annotations

import json

import pytest
import torch

from experiments.int4_bound import (E_VARIANTS, G_VARIANTS, LEVELS, TILED_CODES, TILED_CONFIGS, T_VARIANTS, VARIANTS,
                                    fold, fold_ref, stream_read, stream_read_ref, tile_int4, tiled_bytes, tiled_check,
                                    tiled_fold_ref, tiled_gemv, tiled_gemv_ref, untile_int4, variant_config)
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


# (n, k, group, zero, (BLOCK_N, BLOCK_K, RUN, num_warps, SPLIT)): ragged N (padded rows) and K (a compact
# last chunk), every group size the tests ask for, split parts of unequal length, runs of 8 words.
TILED_CASES = [
    (37, 640, 128, False, (8, 256, 4, 4, 1)),   # ragged N and K (2 whole steps and a half), g128
    (37, 640, 128, True, (4, 128, 8, 2, 2)),    # 5 steps in parts of 3 and 2, runs of 8 words, zero points
    (40, 704, 64, True, (8, 256, 4, 2, 2)),     # g64: 2 whole steps and a ragged 192, split 2 (tail: the last's)
    (24, 512, 64, False, (16, 128, 4, 1, 4)),   # one step a part, N padded to 32
    (16, 768, 32, True, (8, 256, 8, 2, 3)),     # g32 with runs of 8 words: a scale a word (runs span groups)
    (21, 352, 32, False, (4, 64, 4, 1, 2)),     # g32, 5 whole steps and a ragged 32 (one run)
]


@pytest.mark.parametrize("n, k, group, zero, config", TILED_CASES)
def test_tile_int4_is_a_lossless_tile_major_permutation(n, k, group, zero, config):
    """unpack(repack(x)) == x for codes, scales and zero points; every whole (BLOCK_N x BLOCK_K) tile of a
    column block's codes (and its scales) is one contiguous chunk, the block's tiles in K order, the ragged
    rest after them; no byte more than the padded rows'."""
    block_n, block_k = config[:2]
    torch.manual_seed(n * k + group)
    w, scale, zp = _weights(n, k, group, zero)
    t = tile_int4(w, scale, zp, block_n, block_k)
    w2, s2, z2 = untile_int4(t)
    assert torch.equal(w2, w) and torch.equal(s2, scale) and (z2 is None if zp is None else torch.equal(z2, zp))
    np_ = -(-n // block_n) * block_n
    assert t.words.numel() == np_ * k // 8 and t.scale.numel() == np_ * (k // group)
    words = torch.cat([w.view(torch.int32), torch.zeros(np_ - n, k // 8, dtype=torch.int32)])
    scales = torch.cat([scale, torch.zeros(np_ - n, k // group)])
    full = k // block_k
    for b in range(np_ // block_n):
        rows = slice(b * block_n, (b + 1) * block_n)
        for s in range(full):
            at = (b * k // 8 + s * block_k // 8) * block_n
            tile = words[rows, s * block_k // 8:(s + 1) * block_k // 8].reshape(-1)
            assert torch.equal(t.words[at:at + tile.numel()], tile)
            at_g = (b * (k // group) + s * (block_k // group)) * block_n
            tile_g = scales[rows, s * block_k // group:(s + 1) * block_k // group].reshape(-1)
            assert torch.equal(t.scale[at_g:at_g + tile_g.numel()], tile_g)
        tail = words[rows, full * block_k // 8:].reshape(-1)
        end = (b + 1) * block_n * k // 8
        assert torch.equal(t.words[end - tail.numel():end], tail)


@pytest.mark.parametrize("n, k, group, zero, config", TILED_CASES)
def test_tiled_gemv_equals_reference(n, k, group, zero, config):
    """The tiled GEMV on random codes, scales, zero points and x (never zeros) equals x times the fp32
    dequantized weight: fp32 output within fp32 rounding of the sums (a bound per column from |x| @ |W|^T),
    bf16 output within one rounding of the reference's."""
    torch.manual_seed(n + k + group + config[4])
    w, scale, zp = _weights(n, k, group, zero)
    x = torch.randn(1, k, dtype=torch.bfloat16)
    t = tile_int4(w, scale, zp, *config[:2])
    got = tiled_gemv(x, t, config, out_dtype=torch.float32)
    expected = tiled_gemv_ref(x, w, scale, zp, torch.float32)
    dense = ref.dequantize_grouped(ref.unpack_int4(w), scale, zp)
    bound = 1e-6 * (x.float().abs() @ dense.abs().T) * k ** 0.5 + 1e-30
    assert got.shape == (1, n) and expected.abs().min() > 0
    assert ((got - expected).abs() <= bound).all(), ((got - expected).abs() / bound).max()
    got_bf16 = tiled_gemv(x, t, config).float()
    expected_bf16 = tiled_gemv_ref(x, w, scale, zp).float()
    assert ((got_bf16 - expected_bf16).abs() <= expected_bf16.abs() * 2 ** -7).all()


@pytest.mark.parametrize("n, k, group, zero, config", TILED_CASES[:4])
def test_tiled_codes_only_walk_reads_each_word_once(n, k, group, zero, config):
    """The codes-only walk's per-program folds equal torch's over each program's rows and K steps."""
    torch.manual_seed(n + k)
    w, scale, zp = _weights(n, k, group, zero)
    t = tile_int4(w, scale, zp, *config[:2])
    got = tiled_gemv(torch.randn(1, k, dtype=torch.bfloat16), t, config, codes_only=True)
    assert torch.equal(got, tiled_fold_ref(w, config))


def test_tiled_split_leaves_the_counts_at_zero():
    """Split-K's arrival counts are back at zero after a launch (the next launch, and a graph replay, sum
    correctly): two launches give the same result."""
    n, k, group, config = 40, 704, 64, (8, 256, 4, 2, 2)
    w, scale, zp = _weights(n, k, group, True)
    x = torch.randn(1, k, dtype=torch.bfloat16)
    t = tile_int4(w, scale, zp, *config[:2])
    first = tiled_gemv(x, t, config, out_dtype=torch.float32)
    assert torch.equal(first, tiled_gemv(x, t, config, out_dtype=torch.float32))


def test_tiled_bad_input_is_named():
    w, scale, zp = _weights(16, 512, 128, False)
    t = tile_int4(w, scale, zp, 8, 256)
    with pytest.raises(ValueError, match="tile"):
        tiled_gemv(torch.randn(1, 512), t, (16, 256, 4, 4, 1))
    with pytest.raises(ValueError, match="x"):
        tiled_gemv(torch.randn(2, 512), t, (8, 256, 4, 4, 1))
    with pytest.raises(ValueError, match="parts"):
        tiled_gemv(torch.randn(1, 512), t, (8, 256, 4, 4, 4))  # 2 whole steps for 4 parts
    with pytest.raises(ValueError, match="BLOCK_K"):
        tile_int4(w, scale, zp, 8, 192)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_tiled_configs_fit_the_7b_shapes(shape):
    """Every tiled config runs at every Llama-2-7B shape (g128), pads nothing there, and counts the bytes
    it moves: the codes and scales once (as the ladder's weight bytes), x once from DRAM."""
    n, k, _ = SHAPES[shape]
    assert set(TILED_CODES) <= set(TILED_CONFIGS) and T_VARIANTS == ["t_codes", "t_gemv", "t_gemv_pdl"]
    for name, config in TILED_CONFIGS.items():
        tiled_check(config, n, k, 128)
        block_n, block_k, run, warps, split = config
        assert n % block_n == 0 and block_k <= k and warps in (1, 2, 4, 8), name
        moved = tiled_bytes(config, n, k, 128, False, False)
        assert moved["code_bytes"] + moved["scale_bytes"] == n * k // 2 + n * k // 128 * 4
        assert moved["read_bytes"] == moved["code_bytes"] + moved["scale_bytes"] + 2 * k
        assert tiled_bytes(config, n, k, 128, True, True)["read_bytes"] == n * k // 2


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
    # two tiled configs that fit K 512 (the 7B ones step 512-4096 wide), one with split-K
    monkeypatch.setattr(B, "TILED_CONFIGS", {"a": (4, 256, 4, 2, 1), "b": (4, 128, 4, 2, 2)})
    monkeypatch.setattr(B, "TILED_CODES", ["a"])
    B.main(["--json", str(tmp_path / "b.jsonl"), "--formats", "int4_g128", "int4_g128_zero",
            "--variants", *VARIANTS, *G_VARIANTS, *T_VARIANTS])
    recs = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    measures = [r for r in recs if r["kind"] == "measure"]
    ladder = [v for v in VARIANTS if not v.startswith("e_")]
    tiled = ["t_codes", "t_gemv", "t_gemv", "t_gemv_pdl"]
    one = ladder + G_VARIANTS + tiled + list(E_VARIANTS)
    assert [r["variant"] for r in measures] == one + one and recs[-1]["kind"] == "done"
    assert [r["format"] for r in measures] == ["int4_g128"] * len(one) + ["int4_g128_zero"] * len(one)
    assert not recs[-1]["budget_skipped"]
    for r in measures:
        assert "error" not in r and r["us"] == pytest.approx(10.0 / 8), r  # 8 weight copies a graph
        if r["variant"] in G_VARIANTS:  # what each ceiling moves: the codes' bytes, or the bf16 weight's
            assert r["read_bytes"] == (12 * 512 * 2 if r["variant"] == "g_copy_bf16" else 12 * 256), r
            assert r["read_of_copy_ceiling"] == pytest.approx(r["read_bytes"] / 1.25e-6 / 4e12), r
        elif r["variant"].startswith("t_"):  # checked against the reference before timing
            assert r["check_ok"] and r["programs"] == -(-12 // r["config"][0]) * r["split"], r
            assert r["read_bytes"] == 12 * 256 + (0 if r["variant"] == "t_codes" else
                                                  12 * 4 * 4 * (2 if r["format"].endswith("zero") else 1) + 1024)
        else:
            assert r["programs"] == -(-12 // r["config"][1]) * r["split"]
    assert measures[0]["read_bytes"] == 0 and measures[1]["read_bytes"] == 12 * 256
    summaries = [r for r in recs if r["kind"] == "tiled_summary"]
    assert [s["format"] for s in summaries] == ["int4_g128", "int4_g128_zero"]
    assert all(s["t_gemv_of_g_read"] == pytest.approx(1.0) and s["t_gemv_config"] in "ab" for s in summaries)


def test_budget_cuts_the_tiled_rows(monkeypatch, tmp_path):
    """Past --budget-s the t_* rows still to come are skipped and listed in the done line; the ladder runs."""
    import experiments.int4_bound as B

    monkeypatch.setattr(B, "DEVICE", "cpu")
    monkeypatch.setattr(B, "SHAPES", {"tiny": (12, 512, "none")})
    monkeypatch.setattr(B, "COPY_BYTES", 1)
    monkeypatch.setattr(B, "graph_seconds", lambda run: 1e-5)
    monkeypatch.setattr(B, "copy_ceiling_tbps", lambda: 4.0)
    B.main(["--json", str(tmp_path / "b.jsonl"), "--variants", "a_codes", "t_codes", "t_gemv", "--budget-s", "0"])
    recs = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in recs if r["kind"] == "measure"] == ["a_codes"]
    assert len(recs[-1]["budget_skipped"]) == len(TILED_CONFIGS) + len(TILED_CODES)


SM90_TILED = """
import json
from experiments.int4_bound import tiled_sass_stats
from experiments.quant_gemv_sweep import SHAPES
for shape, name, codes_only, zero in [("o_proj", "n8k2048", True, False), ("o_proj", "n8k2048", False, False),
                                      ("down", "n8k2048", False, True), ("down", "n16k2048s2", False, False),
                                      ("down", "n8k2048r8", True, False), ("o_proj", "n32k1024w8", False, True)]:
    print(json.dumps(tiled_sass_stats(name, *SHAPES[shape][:2], codes_only, zero)))
"""


def test_tiled_compiles_for_sm90_with_128_bit_code_loads():
    """The tiled kernels compile for sm_90 at the 7B shapes (down: a ragged last step; split-K; runs of 8
    words; zero points): the codes as 128-bit loads (the tile-major layout keeps the runs), the scales
    32-bit from the GEMV only, and nothing spilled (the timings are of loads, not local memory)."""
    from test_quant_gemv_fast import _compile_sm90

    recs = [json.loads(line) for line in _compile_sm90(SM90_TILED).strip().splitlines() if line.startswith("{")]
    assert len(recs) == 6
    for rec in recs:
        assert rec["ldg"].get("LDG.E.128", 0) > 0 and rec["spill_bytes"] == 0, rec
        assert ("LDG.E" in rec["ldg"]) == (rec["variant"] == "t_gemv"), rec

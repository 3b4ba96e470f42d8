"""experiments/quant_gemv_sweep.py on CPU: its candidate fast configs are ones gemv can run at the
7B shapes, its weights are layouts gemv takes (exact and fast), and its suggestion picks the
least total time (the timings themselves need the GPU)."""

from __future__ import annotations

import pytest
import torch

from experiments.quant_gemv_sweep import (EXACT_SPLITS, EXACT_TILES, FAST_CANDIDATES, FORMATS, SHAPES, fmt_quant,
                                          make_weights, suggest)
from kernels import quant as ref
from kernels._triton import next_pow2
from kernels.gemv import FAST_M1_CONFIGS, _fast_words, fast_dequant_fits, fast_gemv_config, gemv, gemv_config, gemv_ref
from support import widen_m1_gemv_programs


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_fast_candidates_fit_the_shape(shape, fmt):
    n, k, fusion = SHAPES[shape]
    quant, group, _ = fmt_quant(fmt)
    assert fast_dequant_fits(quant, k, group)
    entries = [FAST_M1_CONFIGS[quant]] + FAST_CANDIDATES
    assert len(set(FAST_CANDIDATES)) == len(FAST_CANDIDATES)
    for entry in entries:
        block_m, block_n, block_k, warps = fast_gemv_config(n // 2 if fusion == "swiglu" else n, k, quant, group,
                                                            fusion == "swiglu", entry=entry)
        assert block_m == 1 and block_n >= 1 and warps in (2, 4, 8)
        assert block_k % group == 0 and block_k <= next_pow2(k), (shape, fmt, entry)
        gpt, wpg = _fast_words(quant, group, block_k)  # raises on a shape the kernel cannot tile
        assert gpt * wpg * (8 if quant == "int4" else 4) == block_k


def test_exact_tiles_are_distinct_16_row_tiles_from_the_heuristic():
    """int8's M > 1 candidates: gemv_config's tile first (the "exact" rows' own), each a 16-row
    tl.dot tile that fits every shape's K."""
    assert len(set(EXACT_TILES)) == len(EXACT_TILES)
    assert EXACT_TILES[0] == gemv_config(16, 4096, 4096)
    assert len(set(EXACT_SPLITS)) == len(EXACT_SPLITS) and all(split > 1 for _, split in EXACT_SPLITS)
    for block_m, block_n, block_k, warps in EXACT_TILES + [tile for tile, _ in EXACT_SPLITS]:
        assert block_m == 16 and block_n >= 16 and warps in (2, 4, 8)
        assert all(block_k <= k for _, k, _ in SHAPES.values())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fast", [False, True])
def test_sweep_weights_are_gemv_layouts(fmt, fast):
    """Each format's weight runs through gemv and equals the reference on its dequantized weight
    (fast: one row, the fast path)."""
    n, k = 24, 256
    (w, q), = make_weights(fmt, n, k, 1, dev="cpu")[0]
    x = torch.randn(1 if fast else 2, k)
    if fmt in ("int8", "w8a8_int8"):
        dense = w.float() * q["scale"][:, None]
    else:
        dense = ref.dequantize_grouped(ref.unpack_int4(w), q["scale"], q["zero"])
    if fmt == "w8a8_int8":
        xq, xs = ref.quantize_per_token_int8(x)
        expected = gemv_ref(xq.float(), w.float()) * xs * q["scale"]
    else:
        expected = gemv_ref(x, dense)
    got = gemv(x, w, **q, pdl=False, fast=fast)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)


def test_suggest_takes_the_least_total_over_every_shape():
    def rec(shape, entry, seconds, path="fast_sweep"):
        return {"kind": "measure", "format": "int4_g128", "shape": shape, "M": 1, "path": path,
                "entry": list(entry), "seconds": seconds}

    heuristic = FAST_M1_CONFIGS["int4"]
    records = [rec("qkv", heuristic, 3.0, "fast"), rec("down", heuristic, 3.0, "fast"),
               rec("qkv", (4, 4096, 4), 1.0), rec("down", (4, 4096, 4), 4.0),  # total 5 < 6
               rec("qkv", (32, 1024, 8), 0.5),  # fastest on qkv, never timed on down: not a candidate
               {**rec("down", (8, 1024, 4), 0.1), "M": 16}]  # another M
    got = suggest(records, "int4_g128")
    assert got["entry"] == [4, 4096, 4] and got["total_us"] == pytest.approx(5e6)
    assert got["heuristic_total_us"] == pytest.approx(6e6) and got["shapes"] == ["down", "qkv"]
    assert suggest(records, "int8") is None


def test_sweep_flow_on_cpu(monkeypatch, tmp_path):
    """The whole script on tiny shapes on CPU (interpreted kernels, a fake clock and ceiling): every
    record it promises is there, with numbers, for every format, shape and M."""
    import json

    import experiments.quant_gemv_sweep as sweep
    import kernels.gemv as gemv_module

    def one_run_seconds(run, reps: int = 10) -> float:
        run()
        return 1e-3

    monkeypatch.setattr(sweep, "DEVICE", "cpu")
    # An H200 occupancy target: on these widths it makes the fast path's programs one column each,
    # which the interpreter runs one at a time. Wider programs time the same records.
    monkeypatch.setattr(gemv_module, "FAST_MIN_PROGRAMS", 1)
    # Every timing first checks its launch against gemv's exact heuristic, at M == 1 one column a
    # program on these widths (interpreted one at a time): 16 columns, the same kernel and sums
    # (support.widen_m1_gemv_programs; the records name the sweep's own gemv_config, imported by name).
    widen_m1_gemv_programs(monkeypatch)
    shapes = {"gate_up": (32, 128, "swiglu"), "down": (16, 256, "residual")}  # small: interpreted
    monkeypatch.setattr(sweep, "SHAPES", shapes)
    monkeypatch.setattr(sweep, "COPY_BYTES", 1)
    monkeypatch.setattr(sweep, "FAST_CANDIDATES", [(2, 128, 4)])
    monkeypatch.setattr(sweep, "EXACT_TILES", [(16, 16, 64, 2)])
    monkeypatch.setattr(sweep, "EXACT_SPLITS", [((16, 16, 32, 2), 2)])
    monkeypatch.setattr(sweep, "graph_seconds", one_run_seconds)
    monkeypatch.setattr(sweep, "copy_ceiling_tbps", lambda: 1.0)
    # Two weight copies of each format, not at least eight (a GPU's copies outsize L2): each timing
    # still checks the first, warms up on both and replays all: the same launches on fewer copies.
    make_weights = sweep.make_weights
    monkeypatch.setattr(sweep, "make_weights", lambda fmt, n, k, copies, **kw: make_weights(fmt, n, k, 2, **kw))
    out = tmp_path / "sweep.jsonl"
    formats = ["int8", "int4_g128_zero"]
    sweep.main(["--formats", *formats, "--m", "1", "2", "--budget-s", "1000", "--json", str(out)])
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    measures = [r for r in recs if r["kind"] == "measure"]
    errors = [r for r in measures if "error" in r and r["path"] != "tinygemm"]  # tinygemm is CUDA-only
    assert not errors, errors
    for fmt in formats:
        for shape in shapes:
            paths = {(r["path"], r["M"]) for r in measures if r["format"] == fmt and r["shape"] == shape}
            assert {("exact", 1), ("fast", 1), ("fast_best", 1), ("exact", 2)} <= paths, (fmt, shape)
            assert ("fast", 2) not in paths  # fast at M > 1 is the exact path: timed once, as "exact"
            assert ("tinygemm", 1) in paths if fmt.startswith("int4") else ("tinygemm", 1) not in paths
            # int8's exact-path tiles at M > 1 (issue 13), not at M == 1 nor for int4
            assert (("exact_sweep", 2) in paths) == (fmt == "int8") and ("exact_sweep", 1) not in paths
            assert (("exact_split", 2) in paths) == (fmt == "int8") and ("exact_split", 1) not in paths
            best = next(r for r in measures if r["format"] == fmt and r["shape"] == shape and r["path"] == "fast_best")
            assert best["of_candidates"] == 2 and best["GBps"] > 0 and best["of_copy_ceiling"] > 0
    assert {(r["shape"], r["M"]) for r in measures if r["path"] == "bf16"} == {(s, m) for s in shapes for m in (1, 2)}
    assert {r["format"] for r in recs if r["kind"] == "suggest"} == set(formats)
    assert recs[0]["kind"] == "ceiling" and recs[-1]["kind"] == "done"

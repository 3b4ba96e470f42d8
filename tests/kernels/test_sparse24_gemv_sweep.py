"""experiments/sparse24_gemv_sweep.py on CPU (interpreted kernels, a fake clock and ceiling, tiny
shapes): every record it promises is there for every format, shape and M, and its suggestion is a
tile timed on every case of its path (the timings themselves need the GPU)."""

from __future__ import annotations

import json

from support import fewest_fast_programs


def one_copy_seconds(fn, items: list) -> float:
    """The sweep's copies_seconds as one run of the first copy at a fake 1 ms: its warm-up and other
    copies run the same kernel on other random weights (test_dry_run_on_cpu runs it unpatched)."""
    fn(items[0])
    return 1e-3


def test_sweep_flow_on_cpu(monkeypatch, tmp_path):
    import experiments.sparse24_gemv_sweep as sweep

    def one_run_seconds(run, reps: int = 10) -> float:
        run()
        return 1e-3

    monkeypatch.setattr(sweep, "DEVICE", "cpu")
    # An H200 occupancy target: on these widths it makes the M == 1 fast paths' programs one column
    # each, which the interpreter runs one at a time. Wider programs time the same records.
    fewest_fast_programs(monkeypatch)
    monkeypatch.setattr(sweep, "SHAPES", {"a": (48, 256), "b": (16, 384)})
    monkeypatch.setattr(sweep, "COPY_BYTES", 1)
    # One candidate tile a path besides its default, 16 columns a program (fewer interpreted programs;
    # K steps narrower than the default's, so the K loop runs several steps).
    monkeypatch.setattr(sweep, "SELECT_CANDIDATES", [(16, 64, 4)])
    monkeypatch.setattr(sweep, "DOT_CANDIDATES", [(16, 64, 4)])
    monkeypatch.setattr(sweep, "FAST_CANDIDATES", [(16, 128, 4)])
    monkeypatch.setattr(sweep, "MMA_CANDIDATES", [(16, 128, 4, 1)])
    monkeypatch.setattr(sweep, "graph_seconds", one_run_seconds)
    monkeypatch.setattr(sweep, "copies_seconds", one_copy_seconds)
    monkeypatch.setattr(sweep, "copy_ceiling_tbps", lambda: 1.0)
    out = tmp_path / "sweep.jsonl"
    sweep.main(["--m", "1", "3", "--budget-s", "1000", "--json", str(out)])
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    measures = [r for r in recs if r["kind"] == "measure"]
    errors = [r for r in measures if "error" in r]
    assert all("skipped" in r for r in measures if r["path"] == "tinygemm"), "CPU: tinygemm is skipped, not run"
    assert not errors, errors
    for shape in ("a", "b"):
        for m in (1, 3):
            got = {(r["format"], r["path"]) for r in measures if r["shape"] == shape and r["M"] == m}
            path = "select" if m == 1 else "dot"
            assert {("dense_bf16", "cublas"), ("int4_g128", "gemv_int4"), ("int4_g128", "tinygemm"),
                    ("int4_g128", "int4_mma"), ("sparse24_bf16", path), ("sparse24_int4_g128", path),
                    ("sparse24_int4_g128", "mma")} <= got, (shape, m, got)
            # the tensor-core 2:4 GEMM at every M: its heuristic tile and one candidate, both timed
            mma = [r for r in measures if r["shape"] == shape and r["M"] == m and r["path"] == "mma"]
            assert len(mma) == 2 and all(r["GBps"] > 0 for r in mma), mma
            if m > 1:  # the fast kernel once a row, beside the dot path
                assert ("sparse24_int4_g128", "fast_rows") in got
            if m == 1:  # the old and the new M == 1 int4 paths, each at its default and one candidate tile
                fast = [r for r in measures if r["shape"] == shape and r["M"] == m and r["path"] == "fast"]
                assert len(fast) == 2 and all(r["format"] == "sparse24_int4_g128" and r["GBps"] > 0 for r in fast)
            configs = [r for r in measures if r["shape"] == shape and r["M"] == m and r["format"] == "sparse24_bf16"]
            assert len(configs) == 2 and all(r["GBps"] > 0 and r["of_copy_ceiling"] > 0 for r in configs)
    # per shape: M == 1 bf16 select, int4 select, fast and mma; M == 3 bf16 and int4 dot, int4 fast_rows and mma
    assert len([r for r in recs if r["kind"] == "best"]) == 2 * 8
    suggest = {(r["format"], r["path"]): r["config"] for r in recs if r["kind"] == "suggest"}
    assert set(suggest) == {(f, p) for f in ("sparse24_bf16", "sparse24_int4_g128") for p in ("select", "dot")} | \
        {("sparse24_int4_g128", p) for p in ("fast", "fast_rows", "mma")}
    assert recs[0]["kind"] == "ceiling" and recs[-1]["kind"] == "done"


def test_dry_run_on_cpu(tmp_path, monkeypatch):
    """--dry-run: the CPU flow without monkeypatching the sweep: old, new and dense int4 rows on its shapes."""
    import experiments.sparse24_gemv_sweep as sweep

    # The kernels' H200 occupancy target only (as in test_sweep_flow_on_cpu): at these widths it makes
    # the M == 1 fast paths one column a program, interpreted one at a time; the same kernels and sums.
    fewest_fast_programs(monkeypatch)
    out = tmp_path / "dry.jsonl"
    try:
        sweep.main(["--dry-run", "--m", "1", "--budget-s", "0", "--json", str(out)])
    finally:  # --dry-run rebinds the module's device, shapes and clock: restore them for other tests
        import importlib

        importlib.reload(sweep)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    measures = [r for r in recs if r["kind"] == "measure" and "seconds" in r]
    assert not [r for r in recs if "error" in r]
    got = {(r["format"], r["path"], r["shape"]) for r in measures}
    for shape in sweep.DRY_SHAPES:
        assert {("sparse24_int4_g128", "select", shape), ("sparse24_int4_g128", "fast", shape),
                ("sparse24_int4_g128", "mma", shape), ("int4_g128", "gemv_int4", shape),
                ("int4_g128", "int4_mma", shape), ("dense_bf16", "cublas", shape)} <= got, got
    assert recs[0]["kind"] == "ceiling" and recs[-1]["kind"] == "done"


def test_paths_restricts_the_sparse_paths(tmp_path, monkeypatch):
    """--paths fast: at M == 1 only the fast 2:4 path runs (no select, no mma), the dense baselines stay."""
    import experiments.sparse24_gemv_sweep as sweep

    # One of the dry run's two shapes (the restriction is per path, not per shape: every shape of the
    # dry run is test_dry_run_on_cpu's); one run of the first copy per timing, as in test_sweep_flow_on_cpu.
    monkeypatch.setattr(sweep, "DRY_SHAPES", {"a": sweep.DRY_SHAPES["a"]})
    monkeypatch.setattr(sweep, "copies_seconds", one_copy_seconds)
    # Wider M == 1 fast-path programs, as in test_sweep_flow_on_cpu (one column a program at these widths
    # otherwise, interpreted one at a time): the same kernels and sums, and the paths that run the same.
    fewest_fast_programs(monkeypatch)
    out = tmp_path / "fast.jsonl"
    try:
        sweep.main(["--dry-run", "--m", "1", "--formats", "int4_g128", "--paths", "fast", "--budget-s", "0",
                    "--json", str(out)])
    finally:
        import importlib

        importlib.reload(sweep)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    sparse = {r["path"] for r in recs if r["kind"] == "measure" and r["format"].startswith("sparse24")}
    assert sparse == {"fast"}
    assert {r["path"] for r in recs if r["kind"] == "suggest"} == {"fast"}
    assert any(r["kind"] == "measure" and r["format"] == "int4_g128" and "seconds" in r for r in recs)

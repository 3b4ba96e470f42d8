"""The speculative verify forward as decode pseudo-rows (VerifyPaths.pseudo_row_logits,
DecodeInputs.prepare_chunks) gives the prefill verify path's logits, CPU fp32 eager, in a ragged
batch with different context lengths and a block boundary inside the k + 1 tokens; and the
dispatch: small verify batches and a draft's catch-up go through the decode path."""

from __future__ import annotations

import torch
from verify_batch import CONTEXTS, verify_chunks, verify_runner

def test_pseudo_rows_give_the_prefill_verify_logits(model_dir):
    _, runner = verify_runner(model_dir("llama_gqa_untied"))
    chunks = verify_chunks()
    assert runner.verify_paths.max_pseudo_rows == 16
    with torch.inference_mode():
        prefill = runner.verify_paths.prefill_all_logits(chunks).clone()
        pseudo = runner.verify_paths.pseudo_row_logits(chunks).clone()
        dispatched = runner.verify_paths.all_logits(chunks).clone()
    assert pseudo.shape == (10, prefill.shape[1]) and pseudo.dtype == torch.float32
    assert prefill.abs().max() > 0.1  # real logits, not zeros
    torch.testing.assert_close(pseudo, prefill, rtol=1e-5, atol=1e-5)
    assert torch.equal(dispatched, pseudo)  # 10 tokens: the decode path
    # Per row causal: the last token's logits differ from a forward of the same chunk without it.
    with torch.inference_mode():
        shorter = runner.verify_paths.pseudo_row_logits([(chunks[0][0][:-1], *chunks[0][1:])]).clone()
    torch.testing.assert_close(shorter, prefill[:4], rtol=1e-5, atol=1e-5)


def test_a_verify_larger_than_the_decode_rows_takes_the_prefill_path(model_dir, monkeypatch):
    _, runner = verify_runner(model_dir("llama_gqa_untied"))
    chunks = verify_chunks()
    big = chunks + [([60 + i for i in range(5)], 2, [5, 6]), ([70, 71, 72], 6, [3, 4, 8])]  # 18 tokens
    calls = []
    monkeypatch.setattr(runner.verify_paths, "pseudo_row_logits", lambda c: calls.append(c))
    with torch.inference_mode():
        out = runner.verify_paths.all_logits(big)
    assert out.shape[0] == 18 and calls == []


def test_catch_up_of_one_token_per_sequence_runs_as_decode_rows(model_dir, monkeypatch):
    """A draft's catch-up after a fully accepted round (VerifyPaths.last_logits): the decode path,
    whose logits at each chunk's last token equal the prefill path's."""
    _, runner = verify_runner(model_dir("llama_gqa_untied"))
    one = [(tail[:1], len(ctx), table) for ctx, tail, table in CONTEXTS]
    two = [(tail[:2], len(ctx), table) for ctx, tail, table in CONTEXTS]
    with torch.inference_mode():
        refs = [runner.verify_paths.prefill_all_logits(c)[[sum(len(x[0]) for x in c[: i + 1]) - 1
                                                           for i in range(len(c))]] for c in (one, two)]

    def no_prefill(chunks):
        raise AssertionError("the catch-up took the prefill path")

    monkeypatch.setattr(runner, "varlen_forward", no_prefill)
    with torch.inference_mode():
        for c, ref in zip((one, two), refs):
            torch.testing.assert_close(runner.verify_paths.last_logits(c), ref, rtol=1e-5, atol=1e-5)


def test_verify_path_is_the_one_timed_faster_per_token_count(model_dir, monkeypatch):
    """VerifyPaths.time (with CUDA graphs of both kinds): each token count takes the
    path whose timing was lower, timed on sequences of k + 1 = 5 tokens (the verify's layout), and
    all_logits then dispatches to it; without both graph sets nothing is timed and pseudo-rows stay
    the rule."""
    import engine.spec_decode.verify_paths as vp

    _, runner = verify_runner(model_dir("llama_gqa_untied"))
    assert runner.verify_query_len == 5
    runner.verify_paths.time(8)
    assert runner.verify_paths.path == {}  # CPU: no graphs, nothing timed
    calls = []
    paths = runner.verify_paths
    monkeypatch.setattr(paths, "pseudo_row_logits", lambda c, ids=None: calls.append(("pseudo_rows", c)) or "p")
    monkeypatch.setattr(paths, "prefill_all_logits", lambda c, ids=None: calls.append(("prefill", c)) or "f")
    # Fake timings: pseudo-rows cost 1 + n, the prefill path 6: pseudo-rows up to 5 tokens (a tie keeps them).
    def fake_seconds(run):
        path = run()
        return 1 + sum(len(c[0]) for c in calls[-1][1]) if path == "p" else 6

    monkeypatch.setattr(vp, "gpu_seconds", fake_seconds)
    runner.graphs, runner.verify_paths.verify_graphs = object(), object()
    runner.verify_paths.time(8)
    assert runner.verify_paths.path == {n: "pseudo_rows" if n <= 5 else "prefill" for n in range(2, 9)}
    for _, chunks in calls:  # n tokens as sequences of 5, the last one shorter
        n = sum(len(c[0]) for c in chunks)
        assert [len(c[0]) for c in chunks] == [5] * (n // 5) + ([n % 5] if n % 5 else [])
        assert all(c[0] == [0] * len(c[0]) for c in chunks)
    calls.clear()
    runner.verify_paths.all_logits([([1, 2, 3], 4, [0])])
    runner.verify_paths.all_logits([([1, 2, 3], 4, [0]), ([4, 5, 6], 9, [1])])
    assert [name for name, _ in calls] == ["pseudo_rows", "prefill"]


def test_multi_query_variants_are_timed_and_dispatched(model_dir, monkeypatch):
    """With the multi-query graphs too: pseudo_rows_mq is timed only where n is whole sequences of
    k + 1 (its layout), path[0] (past the pseudo-rows) is the faster prefill path at the
    largest verify, and a ragged batch takes the runner-up where pseudo_rows_mq won."""
    import engine.spec_decode.verify_paths as vp

    _, runner = verify_runner(model_dir("llama_gqa_untied"))
    cost = {"pseudo_rows": 10, "prefill": 9, "pseudo_rows_mq": 1, "prefill_mq": 5}
    calls = []
    fakes = {name: (lambda name: lambda c, ids=None: calls.append((name, c)) or name)(name) for name in cost}
    monkeypatch.setattr(runner.verify_paths, "forwards", lambda: fakes)
    monkeypatch.setattr(vp, "gpu_seconds", lambda run: cost[run()])
    paths = runner.verify_paths
    runner.graphs = paths.verify_graphs = paths.mq_graphs = paths.mq_verify_graphs = object()
    paths.time(16, wide_tokens=80)
    assert paths.path == {**{n: "pseudo_rows_mq" if n % 5 == 0 else "prefill_mq" for n in range(2, 17)},
                          0: "prefill_mq"}
    assert {len(c) for name, c in calls if name == "prefill_mq" and sum(len(x[0]) for x in c) > 16} == {16}
    calls.clear()
    paths.all_logits([([1] * 5, 4, [0])])
    paths.all_logits([([1] * 5, 4, [0]), ([1] * 3, 4, [1])])  # 8 tokens: prefill_mq
    paths.all_logits([([1] * 5, 4, [0]), ([1] * 4, 4, [1]), ([1], 4, [1])])  # 10 tokens, ragged: the runner-up
    paths.all_logits([([1] * 5, 4, [0])] * 4)  # 20 tokens: past the pseudo-rows
    assert [name for name, _ in calls] == ["pseudo_rows_mq", "prefill_mq", "prefill_mq", "prefill_mq"]
    assert paths.ragged == {n: "prefill_mq" for n in (5, 10, 15)}
    runner.config.max_num_seqs = 2  # verifies of at most 2 sequences: token counts past 10 are not timed
    paths.path.clear()
    paths.time(16)
    assert sorted(paths.path) == list(range(2, 11))

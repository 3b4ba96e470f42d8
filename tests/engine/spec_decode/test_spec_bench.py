"""experiments/spec_bench.py: the greedy replay's bookkeeping, the workloads, and `acceptance` end
to end on the CPU with tiny models and a small fake data directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support import load_experiment


@pytest.fixture(scope="module")
def bench():
    return load_experiment("spec_bench")


@pytest.fixture
def data_dir(tmp_path) -> Path:
    wiki = tmp_path / "wikitext-2-raw"
    wiki.mkdir()
    para = ("The river runs past the old mill and the mill stands by the river. " * 8).strip()
    (wiki / "wiki.test.raw").write_text(" = Title = \r\n" + para + "\r\n" + para.replace("river", "road") + "\r\n")
    cqa = tmp_path / "reasoning" / "cqa"
    cqa.mkdir(parents=True)
    (cqa / "cqa_test.json").write_text(json.dumps(
        {"id": "a", "question": "Where do fish live?", "choices": ["sea", "sky", "car", "tree", "desk"],
         "answer": "sea"}) + "\n")
    gsm = tmp_path / "reasoning" / "gsm8k"
    gsm.mkdir(parents=True)
    (gsm / "test.jsonl").write_text(json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    return tmp_path


def test_replay_with_a_perfect_and_a_useless_drafter(bench):
    outputs = [list(range(10)), list(range(5))]
    perfect = bench.replay_greedy(outputs, lambda i, t, k: outputs[i][t : t + k], k=3)
    # 10 tokens in rounds of 4 (3 accepted + 1): 4, 4, then 2 left (1 proposed + 1);
    # 5 tokens: 4, then 1 (none proposed).
    assert (perfect.num_accepted, perfect.num_emitted, perfect.num_drafts) == (3 + 3 + 1 + 3, 15, 4)
    assert perfect.acceptance_rate == 1.0
    useless = bench.replay_greedy(outputs, lambda i, t, k: [99] * k, k=3)
    assert useless.num_accepted == 0 and useless.num_emitted == 15  # one token per round, as plain decoding
    assert useless.proposed_per_position[0] == useless.num_drafts


def test_ngram_replay_finds_a_repeated_passage(bench):
    prompt = [5, 6, 7, 8, 9, 10, 11, 12]
    output = [5, 6, 7, 8, 9, 10, 11, 12]  # the output repeats the prompt
    m = bench.replay_greedy([output], bench.ngram_proposer([prompt], [output], 1, 2), k=4)
    assert m.acceptance_rate == 1.0 and m.mean_accepted_length > 3


def test_workloads_load(bench, data_dir):
    from tiny_models import byte_tokenizer

    tok = byte_tokenizer()
    wiki = bench.load_prompts("wikitext", data_dir, tok, 5, 32)
    assert len(wiki) == 2 and all(len(p) == 32 for p in wiki)  # the heading is not a paragraph
    assert tok.decode(wiki[0]).startswith("The river runs")
    grounded = bench.load_prompts("grounded", data_dir, tok, 2, 32)
    text = tok.decode(grounded[0])
    assert "Rewrite the following paragraph" in text and "the old mill" in text and len(text) < 300
    assert "Where do fish live?" in tok.decode(bench.load_prompts("cqa", data_dir, tok, 3, 32)[0])
    assert "What is 2 + 3?" in tok.decode(bench.load_prompts("gsm8k", data_dir, tok, 3, 32)[0])
    with pytest.raises(Exception, match="workloads"):
        bench.load_prompts("poetry", data_dir, tok, 1, 32)


def test_acceptance_end_to_end_on_cpu(bench, data_dir, model_dir, tmp_path, capsys):
    target = model_dir("llama_gqa_untied", with_tokenizer=True)
    draft = model_dir("llama_mha_tied", with_tokenizer=True)
    out = tmp_path / "acc.jsonl"
    bench.main(["--json", str(out), "acceptance", "--target", target, "--draft", draft, "--data-dir", str(data_dir),
                "--workloads", "grounded", "--prompts", "2", "--prompt-tokens", "24", "--new-tokens", "6",
                "--ks", "1", "3", "--engine", '{"device": "cpu", "num_decode_steps": 1}'])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["drafter"].split("[")[0], r["k"]) for r in rows] == [("ngram", 1), ("ngram", 3), (draft, 1), (draft, 3)]
    for r in rows:
        assert r["num_emitted_tokens"] == 2 * 6  # every target token, whatever was accepted
        assert 0.0 <= r["acceptance_rate"] <= 1.0 and r["implied_speedup"] > 0


def test_implied_speedup_and_policy(bench):
    # k=4, mean 3.6 tokens per round, draft 0.2 of a step, verify 1.1: 3.6 / 1.9
    assert bench.implied_speedup(3.6, 4, 0.2, 1.1) == pytest.approx(3.6 / 1.9)
    rows = [{"batch": 1, "k": 2, "speedup": 1.4}, {"batch": 1, "k": 4, "speedup": 1.7},
            {"batch": 16, "k": 2, "speedup": 1.01}, {"batch": 16, "k": 4, "speedup": 0.8},
            {"batch": 64, "k": 2, "speedup": None}]
    assert bench.recommend_policy(rows) == {1: 4, 16: 0}


def test_verify_cost_reports_every_path_against_decode_on_cpu(bench, model_dir, tmp_path):
    out = tmp_path / "v.jsonl"
    bench.main(["--json", str(out), "verify-cost", "--model", model_dir("llama_gqa_untied"), "--context", "32", "48",
                "--k", "4", "--repeat", "2", "--engine", '{"device": "cpu"}'])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    paths = ["pseudo_rows", "prefill", "pseudo_rows_mq", "prefill_mq"]
    assert [(r["path"], r["context"]) for r in rows] == [(p, c) for c in (32, 48) for p in paths]
    for r in rows:
        assert r["verify_step_us"] > 0 and r["decode_step_us"] > 0 and r["decode_forward_us"] > 0
        assert r["ratio"] == pytest.approx(r["verify_step_us"] / r["decode_step_us"])
        assert r["ratio_to_forward"] == pytest.approx(r["verify_step_us"] / r["decode_forward_us"])
        assert r["repeats"] == 2 and r["k"] == 4
        assert r["graphed"] is False and r["chosen"] == "pseudo_rows"  # CPU: no graphs, nothing timed
    assert len({r["decode_forward_us"] for r in rows[:4]}) == 1  # one decode measurement for every path


def test_verify_cost_takes_engine_overrides_that_it_also_sets(bench, model_dir, tmp_path):
    """speed mode hands its target's --engine (here max_model_len) to the verify probe: it must win
    over the probe's own sizing, not raise "multiple values for keyword argument" (H200, this session);
    one too short for the contexts is refused by name."""
    out = tmp_path / "v.jsonl"
    bench.main(["--json", str(out), "verify-cost", "--model", model_dir("llama_gqa_untied"), "--context", "32",
                "--k", "2", "--repeat", "1", "--engine", '{"device": "cpu", "max_model_len": 160}'])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == ["pseudo_rows", "prefill", "pseudo_rows_mq", "prefill_mq"]
    assert all(r["verify_step_us"] > 0 for r in rows)
    # A max_model_len past twice the probe's own length: the KV pool must still hold one sequence of it
    # (speed mode's 2048 against a 592-token probe pool: "74 blocks ... cannot hold", H200).
    bench.main(["--json", str(out), "verify-cost", "--model", model_dir("llama_gqa_untied"), "--context", "32",
                "--k", "2", "--repeat", "1", "--engine", '{"device": "cpu", "max_model_len": 512}'])
    assert len(out.read_text().splitlines()) == 8
    with pytest.raises(Exception, match="max_model_len 64"):
        bench.main(["verify-cost", "--model", model_dir("llama_gqa_untied"), "--context", "32", "--k", "2",
                    "--repeat", "1", "--engine", '{"device": "cpu", "max_model_len": 64}'])


def test_speed_runs_the_baseline_and_each_speculative_config(bench, data_dir, model_dir, tmp_path):
    """Every drafter (n-gram, a draft directory, a truncated copy of the target) is timed at each k and
    batch size with its acceptance metrics, and a policy is recommended per drafter."""
    target = model_dir("llama_gqa_untied", with_tokenizer=True)
    draft = model_dir("llama_mha_tied", with_tokenizer=True)
    out = tmp_path / "speed.jsonl"
    bench.main(["--json", str(out), "speed", "--target", target, "--draft", draft, "--data-dir", str(data_dir),
                "--workloads", "gsm8k", "--new-tokens", "4", "--batch", "1", "2", "--ks", "1", "2",
                "--truncated", "1", "--repeats", "2", "--verify-shape", "", "--engine", '{"device": "cpu"}'])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert not [r for r in rows if "error" in r or "skipped" in r]
    base = [r for r in rows if r["spec"] == "none"]
    assert [r["batch"] for r in base] == [1, 2] and all(r["tok_s"] > 0 and r["speedup"] == 1.0 for r in base)
    spec = [r for r in rows if r["bench"] == "speed" and r["spec"] != "none"]
    fixed = [r for r in spec if r["k"] != "auto"]
    assert sorted((r["spec"], r["k"], r["batch"]) for r in fixed) == sorted(
        (name, k, bs) for name in ("ngram", draft, "truncated1") for k in (1, 2) for bs in (1, 2))
    auto = [r for r in spec if r["k"] == "auto"]  # the engine's measured policy, up to k 2
    assert sorted((r["spec"], r["batch"]) for r in auto) == sorted(
        (name, bs) for name in ("ngram", draft, "truncated1") for bs in (1, 2))
    for r in auto:
        assert len(r["policy"]["steps_by_k"]) == 3 and sum(r["policy"]["steps_by_k"]) > 0
        assert r["policy"]["costs"]["batch_sizes"] == [1, 2]
        # Its choices after the warm-up and after each timed run (cumulative): which run held which steps.
        by_run = [sum(s["steps_by_k"]) for s in r["policy_by_run"]]
        assert len(by_run) == 3 and by_run == sorted(by_run) and by_run[-1] == sum(r["policy"]["steps_by_k"])
    for r in spec:
        assert r["tok_s"] > 0 and len(r["runs_tok_s"]) == 2 and r["metrics"]["num_emitted_tokens"] > 0
    model_rows = [r for r in spec if r["spec"] != "ngram"]
    assert all(r["metrics"]["num_proposed_tokens"] > 0 for r in model_rows)
    policies = {r["spec"]: r["num_speculative_tokens_per_batch_size"] for r in rows if r["bench"] == "policy"}
    assert set(policies) == {"ngram", draft, "truncated1"}
    assert all(set(p) == {"1", "2"} for p in policies.values())  # batch sizes, as JSON keys


def test_speed_frees_each_engine_before_building_the_next(bench, data_dir, model_dir, tmp_path, monkeypatch):
    """The KV pool of an engine is sized from the free memory: the engine before it must be gone."""
    import weakref

    import engine as engine_pkg

    built: list[weakref.ref] = []
    alive_at_build: list[int] = []
    real_llm = engine_pkg.LLM

    def tracking_llm(*args, **kwargs):
        import gc

        gc.collect()
        alive_at_build.append(sum(ref() is not None for ref in built))
        llm = real_llm(*args, **kwargs)
        built.append(weakref.ref(llm.engine))
        return llm

    monkeypatch.setattr(engine_pkg, "LLM", tracking_llm)
    target = model_dir("llama_gqa_untied", with_tokenizer=True)
    out = tmp_path / "speed.jsonl"
    bench.main(["--json", str(out), "speed", "--target", target, "--data-dir", str(data_dir), "--workloads", "gsm8k",
                "--new-tokens", "2", "--batch", "1", "--ks", "1", "--truncated", "1", "--repeats", "1",
                "--verify-shape", "", "--engine", '{"device": "cpu"}'])
    assert len(built) == 3 and alive_at_build == [0, 0, 0]  # none, ngram, truncated1


def test_speed_leaves_out_prompts_longer_than_max_model_len(bench, data_dir, model_dir, tmp_path):
    """Grounded prompts (a passage in a template) do not fit max_model_len 96 with 8 new tokens: a
    message and a skipped row, never a row timing requests that generated nothing."""
    target = model_dir("llama_gqa_untied", with_tokenizer=True)
    out = tmp_path / "speed.jsonl"
    bench.main(["--json", str(out), "speed", "--target", target, "--data-dir", str(data_dir),
                "--workloads", "grounded", "gsm8k", "--prompt-tokens", "24", "--new-tokens", "8", "--batch", "1",
                "--ks", "1", "--truncated", "--repeats", "1", "--verify-shape", "",
                "--engine", '{"device": "cpu", "max_model_len": 96}'])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    grounded = [r for r in rows if r["workload"] == "grounded"]
    assert "max_model_len 96" in grounded[0]["warning"] and grounded[1]["skipped"] == "no prompt fits max_model_len"
    assert len(grounded) == 2
    timed = [r for r in rows if r["bench"] == "speed" and "tok_s" in r]
    assert timed and all(r["workload"] == "gsm8k" and r["tok_s"] > 0 for r in timed)
    assert not [r for r in rows if "error" in r]


def test_a_request_that_ends_short_is_an_error_not_a_row(bench):
    from types import SimpleNamespace

    class ShortLLM:
        def generate(self, batch, params):
            return [SimpleNamespace(token_ids=[1] * min(params.max_tokens, 3), finish_reason="length") for _ in batch]

    with pytest.raises(Exception, match="request 0 generated 3 of 8 tokens"):
        bench._median_tok_s(ShortLLM(), [[[1, 2]]], 8, 1)


def test_stop_at_eos_counts_answers_that_end_and_still_refuses_cut_ones(bench):
    """--stop-at-eos (the grounded workload as served: a chat answer ends at its EOS): a request that
    stopped is counted with its own length, one cut by anything else is still an error, and every
    batch is generated, one after another."""
    from types import SimpleNamespace

    class LLM:
        def __init__(self, reason):
            self.reason, self.calls = reason, []

        def generate(self, batch, params):
            self.calls.append((len(batch), params.ignore_eos))
            n = 8 if params.max_tokens == 8 else 3
            return [SimpleNamespace(token_ids=[1] * n, finish_reason=self.reason, prompt_token_ids=p,
                                    num_cached_tokens=0) for p in batch]

    llm = LLM("stop")
    tok_s, runs, outputs, _ = bench._median_tok_s(llm, [[[1]], [[2]], [[3]]], 16, 2, stop_at_eos=True)
    assert tok_s > 0 and len(runs) == 2 and outputs == [[1] * 3] * 3
    assert llm.calls[1:] == [(1, False)] * 6  # after the warm-up: 3 batches a run, EOS honoured
    with pytest.raises(Exception, match="request 0 generated 3 of 16 tokens"):
        bench._median_tok_s(LLM("length"), [[[1]]], 16, 1, stop_at_eos=True)


def test_batches_walk_every_prompt(bench):
    """Batch 1 times every prompt in turn (it timed the first prompt alone); larger batches take the
    prompts in order, a short remainder left out; a batch wider than the prompts repeats them."""
    ps = [[i] for i in range(5)]
    assert bench.batches_of(ps, 1) == [[p] for p in ps]
    assert bench.batches_of(ps, 2) == [ps[0:2], ps[2:4]]
    assert bench.batches_of(ps, 8) == [(ps * 8)[:8]]


def test_chat_prompts_take_a_batch_encoding(bench):
    """transformers 5.17's apply_chat_template(tokenize=True) returns a BatchEncoding (a UserDict, not
    a dict): the GSM8K/CQA prompts crashed on the H200 with "invalid literal for int(): 'input_ids'"."""
    from collections import UserDict

    class Tokenizer:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return UserDict({"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]})

    assert bench._chat(Tokenizer(), "2 + 2?") == [5, 6, 7]


def test_speed_times_device_resident_rounds_per_model_drafter(bench, data_dir, model_dir, tmp_path):
    """--num-rounds 4: n-gram and each model drafter again with speculative_config num_rounds 4 at the
    largest k and auto (the policy choosing between plain steps and steps of 4 rounds), their rows marked."""
    target = model_dir("llama_gqa_untied", with_tokenizer=True)
    draft = model_dir("llama_mha_tied", with_tokenizer=True)
    out = tmp_path / "speed.jsonl"
    bench.main(["--json", str(out), "speed", "--target", target, "--draft", draft, "--data-dir", str(data_dir),
                "--workloads", "gsm8k", "--new-tokens", "12", "--batch", "1", "2", "--ks", "1", "2",
                "--truncated", "--num-rounds", "1", "4", "--repeats", "1", "--verify-shape", "",
                "--engine", '{"device": "cpu"}'])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert not [r for r in rows if "error" in r or "skipped" in r]
    for name in (f"{draft}-rounds4", "ngram-rounds4"):
        rounds = [r for r in rows if r["bench"] == "speed" and r["spec"] == name]
        assert sorted((str(r["k"]), r["batch"], r["num_rounds"]) for r in rounds) == [
            ("2", 1, 4), ("2", 2, 4), ("auto", 1, 4), ("auto", 2, 4)]
        assert all(r["tok_s"] > 0 for r in rounds)
        fixed = [r["metrics"] for r in rounds if r["k"] == 2]
        assert all(m["num_emitted_tokens"] > 0 for m in fixed)  # the rounds ran
        # A model drafter proposes every round; n-gram only where a lookup matches (none may on 12 tokens).
        assert all(m["num_proposed_tokens"] > 0 for m in fixed) or name.startswith("ngram")
        for r in rounds:
            if r["k"] == "auto":  # the rounds' cost per round, measured at startup, at both batch sizes
                assert len(r["policy"]["costs"]["rounds_s"]) >= 2 and sum(r["policy"]["steps_by_k"]) > 0
    assert {r["spec"] for r in rows if r["bench"] == "speed"} == {"none", "ngram", draft, f"{draft}-rounds4",
                                                                 "ngram-rounds4"}
    assert all(r["num_rounds"] == 1 for r in rows if r["bench"] == "speed" and "-rounds4" not in r["spec"])


def _speed_row(spec: str, k, tok_s: float, schedule=(34, 32, 0, 16), **extra) -> dict:
    run = dict(zip(("steps", "multi_steps", "spec_steps", "prefill_tokens"), schedule), wall_s=0.2, cpu_per_wall=1.0)
    return {"bench": "speed", "workload": "wikitext", "spec": spec, "k": k, "batch": 1, "tok_s": tok_s,
            "runs": [run, run], "host": {"utc": "2026-11-30T04:18:30+00:00"}, **extra}


@pytest.mark.parametrize("rows, verdict", [
    # The twelfth H200 lease: plain 1198 tok/s, the truncated2 engine with drafting off 1960, same steps.
    ([_speed_row("none", 0, 1198), _speed_row("truncated2", 0, 1960)], "plain_slower"),
    # ... and the plain engine timed again after the drafters at its usual speed: the machine changed.
    ([_speed_row("none", 0, 1198), _speed_row("truncated2", 0, 1960), _speed_row("none", 0, 1950, rerun=True)],
     "baseline_unstable"),
    ([_speed_row("none", 0, 1950), _speed_row("truncated2", 0, 1960), _speed_row("none", 0, 1990, rerun=True)], "ok"),
    ([_speed_row("none", 0, 1950), _speed_row("ngram", 0, 1960, schedule=(40, 30, 0, 16))], "schedule_differs"),
    ([_speed_row("none", 0, 1950), _speed_row("ngram", 0, 1960), _speed_row("truncated2", 0, 1500)], "off_slower"),
])
def test_check_rows_say_whether_the_baseline_is_measured_like_the_others(rows, verdict):
    from experiments.spec_baseline import check_rows

    speculative = [_speed_row("truncated2", 4, 900)]  # a drafting row: not a comparison point
    (check,) = check_rows(rows + speculative)
    assert check["verdict"] == verdict and check["batch"] == 1 and check["workload"] == "wikitext"
    assert check["plain_tok_s"] == [r["tok_s"] for r in rows if r["spec"] == "none"]
    assert set(check["off_tok_s"]) == {r["spec"] for r in rows if r["spec"] != "none"}


def test_speed_check_times_drafting_off_and_the_baseline_again(bench, data_dir, model_dir, tmp_path):
    """--check: each speculative engine also at k 0 (first, as the plain engine's rows come first
    after its build), the plain engine again after the drafters, and a check row per batch size whose
    schedules agree; every row records its runs' steps and the host's state."""
    target = model_dir("llama_gqa_untied", with_tokenizer=True)
    out = tmp_path / "speed.jsonl"
    bench.main(["--json", str(out), "speed", "--target", target, "--data-dir", str(data_dir), "--workloads",
                "wikitext", "--prompts", "2", "--prompt-tokens", "40", "--new-tokens", "6", "--batch", "1", "2",
                "--ks", "2",
                "--truncated", "1", "--no-auto", "--repeats", "2", "--check", "--verify-shape", "",
                "--engine", '{"device": "cpu", "num_decode_steps": 2}'])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert not [r for r in rows if "error" in r or "skipped" in r]
    speed = [r for r in rows if r["bench"] == "speed"]
    assert [(r["spec"], r["k"], r["batch"], r.get("rerun", False)) for r in speed] == [
        ("none", 0, 1, False), ("none", 0, 2, False),
        ("ngram", 0, 1, False), ("ngram", 0, 2, False), ("ngram", 2, 1, False), ("ngram", 2, 2, False),
        ("truncated1", 0, 1, False), ("truncated1", 0, 2, False), ("truncated1", 2, 1, False),
        ("truncated1", 2, 2, False), ("none", 0, 1, True), ("none", 0, 2, True)]
    for r in speed:
        assert len(r["runs"]) == 2 and r["host"]["utc"] and r["host"]["loadavg_1m"] >= 0
        for run in r["runs"]:
            assert run["wall_s"] > 0 and run["cpu_per_wall"] > 0 and run["steps"] > 0
            assert run["spec_steps"] == (0 if r["k"] == 0 else run["spec_steps"])
        assert ("speedup_vs_off" in r) == (r["spec"] != "none" and r["k"] != 0)
    drafting = [r for r in speed if r["k"] == 2]
    assert all(r["runs"][0]["spec_steps"] > 0 for r in drafting if r["spec"] == "truncated1")
    plain = speed[0]
    # Batch 1 times both prompts in turn. First run: the warmed-up first prompt's 8 tokens past its last
    # full block (40 = 2 x 16 + 8) computed again and the second prompt's 40; each prompt's first token
    # from the prefill, then 2 multi-steps of 2 tokens and one single step.
    assert plain["runs"][0]["prefill_tokens"] == 8 + 40 and plain["runs"][0]["multi_steps"] == 2 * 2
    checks = [r for r in rows if r["bench"] == "check"]
    assert [c["batch"] for c in checks] == [1, 2]
    for c in checks:
        assert c["same_schedule"] == {"ngram": True, "truncated1": True}
        assert c["verdict"] != "schedule_differs" and len(c["plain_tok_s"]) == 2
    policies = {r["spec"]: r["num_speculative_tokens_per_batch_size"] for r in rows if r["bench"] == "policy"}
    assert set(policies) == {"ngram", "truncated1"}  # k 0 rows recommend nothing of their own


def test_speed_warns_when_another_process_shares_the_gpu(bench, data_dir, model_dir, tmp_path, monkeypatch):
    """A row that begins with another process on the GPU says so (as the twelfth lease's plain
    wikitext rows, timed while other jobs ran on the host, could not)."""
    import experiments.spec_baseline as baseline

    monkeypatch.setattr(baseline, "gpu_processes", lambda: 2)
    out = tmp_path / "speed.jsonl"
    bench.main(["--json", str(out), "speed", "--target", model_dir("llama_gqa_untied", with_tokenizer=True),
                "--data-dir", str(data_dir), "--workloads", "gsm8k", "--new-tokens", "2", "--batch", "1", "--ks", "1",
                "--truncated", "--no-auto", "--repeats", "1", "--verify-shape", "", "--engine", '{"device": "cpu"}'])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    warnings = [r for r in rows if "warning" in r]
    timed = [r for r in rows if "tok_s" in r]
    assert [(w["spec"], w["k"]) for w in warnings] == [(r["spec"], r["k"]) for r in timed] == [("none", 0), ("ngram", 1)]
    assert all("1 other process(es) on the GPU" in w["warning"] for w in warnings)
    assert all(r["host"]["gpu_processes"] == 2 for r in timed)


def test_speed_times_a_medusa_arm_against_the_plain_engine(bench, data_dir, model_dir, tmp_path):
    """--medusa DIR: the heads' arm (method "medusa", row spec "medusa:DIR") at each k up to its
    num_heads (k 3 is past its 2 heads: left out), with auto, drafting off (--check) and its check rows."""
    from drafts import medusa_heads

    target = model_dir("llama_gqa_untied", with_tokenizer=True)
    heads = medusa_heads(target, str(tmp_path / "heads"), 2, 0.05)
    out = tmp_path / "speed.jsonl"
    bench.main(["--json", str(out), "speed", "--target", target, "--medusa", heads, "--data-dir", str(data_dir),
                "--workloads", "gsm8k", "--new-tokens", "6", "--batch", "1", "2", "--ks", "1", "2", "3",
                "--truncated", "--repeats", "1", "--check", "--verify-shape", "", "--engine", '{"device": "cpu"}'])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert not [r for r in rows if "error" in r or "skipped" in r]
    name = f"medusa:{heads}"
    arm = [r for r in rows if r["bench"] == "speed" and r["spec"] == name]
    assert sorted((str(r["k"]), r["batch"]) for r in arm) == sorted(
        (k, bs) for k in ("0", "1", "2", "auto") for bs in (1, 2))
    assert all(r["tok_s"] > 0 for r in arm)
    assert all(r["metrics"]["num_proposed_tokens"] > 0 for r in arm if r["k"] in (1, 2))
    assert {c["batch"] for c in rows if c["bench"] == "check"} == {1, 2}
    assert all(name in c["same_schedule"] for c in rows if c["bench"] == "check")

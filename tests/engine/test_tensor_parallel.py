"""Tensor parallelism on CPU processes (gloo): 2 ranks give the same tokens as 1 (also with
speculative decoding: n-gram or a draft model on rank 0, the verify forward on both ranks), the
weights each rank loads are its share, bad settings fail before any process starts, and the worker
processes always exit. Every test runs under a hang guard: past TIMEOUT_S the process dumps its stacks and
exits (the workers then see rank 0 gone and exit too)."""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "spec_decode"))
from drafts import perturbed_copy  # noqa: E402
from support import run_interpreted  # noqa: E402
from tiny_models import COMMON, looping_model_dir, prompts  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.parallel.channel import WorkerExited  # noqa: E402
from engine.spec_decode.config import SpeculativeConfigError  # noqa: E402

TIMEOUT_S = 300
REPO = Path(__file__).resolve().parents[2]
# Small pool and budget: prompts longer than 48 tokens are prefilled in chunks.
ENGINE = dict(device="cpu", dtype="float32", max_model_len=160, num_kv_blocks=96, max_num_batched_tokens=48)


@pytest.fixture(autouse=True)
def hang_guard():
    faulthandler.dump_traceback_later(TIMEOUT_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _requests(n: int, vocab: int = 256) -> tuple[list[list[int]], list[SamplingParams]]:
    """A ragged batch (1 to 69 tokens); mostly plain greedy of different lengths (the multi-step
    decode runs once the others are done), one with logprobs, one with prompt logprobs."""
    ps = [[t % vocab for t in p] for p in prompts(n, seed=5, lo=1, hi=70)]
    params = [SamplingParams(temperature=0.0, max_tokens=8 + 3 * i, ignore_eos=True) for i in range(n)]
    params[1] = SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, ignore_eos=True)
    params[2] = SamplingParams(temperature=0.0, max_tokens=5, prompt_logprobs=2, ignore_eos=True)
    return ps, params


def _generate(path: str, tp: int, ps, params, prepare=None, **kw):
    """Outputs and the engine (closed). ``prepare(llm)`` runs before generating. With tp > 1 it also
    checks that the workers exit on close: one worker process per extra rank, alive until close,
    exit code 0 after it, and a second close is fine."""
    llm = LLM(path, tensor_parallel_size=tp, **{**ENGINE, **kw})
    procs = llm.engine.runner.tp_workers.processes if tp > 1 else []
    assert len(procs) == tp - 1 and all(p.is_alive() for p in procs)
    try:
        if prepare is not None:
            prepare(llm)
        outs = llm.generate(ps, params)
    finally:
        llm.close()
    assert all(not p.is_alive() and p.exitcode == 0 for p in procs)
    llm.close()  # twice is fine
    return outs, llm.engine


def _rank0_shape(engine) -> tuple[int, int]:
    """Rank 0's query heads and KV heads (of the first layer)."""
    attn = engine.runner.attn_layers[0]
    return attn.num_heads, attn.k_cache.shape[2]


def _assert_same(one, two) -> None:
    assert [o.token_ids for o in two] == [o.token_ids for o in one]
    for a, b in zip(one, two):
        for x, y in zip(a.logprobs or [], b.logprobs or []):
            assert x.keys() == y.keys() and all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)
        for x, y in zip(a.prompt_logprobs or [], b.prompt_logprobs or []):
            assert (x is None) == (y is None)
            assert x is None or all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)
    assert any(o.logprobs for o in two) and any(o.prompt_logprobs for o in two)


@pytest.mark.parametrize("arch,heads,kv_heads", [
    ("llama_gqa_untied", 2, 1),  # 4 heads, 2 KV heads: one of each per rank; untied LM head
    ("qwen2_bias", 2, 1),  # qkv bias split with the heads; tied embedding and LM head
    ("llama3_rope_mqa", 2, 1),  # one KV head, 2 ranks: replicated on both
    ("qwen3_qknorm", 2, 1),  # head_dim 32 (not hidden / heads), q/k norms per head
])
def test_two_ranks_give_the_tokens_of_one(model_dir, arch, heads, kv_heads):
    """Same tokens and logprobs at 2 ranks as at 1, rank 0 holds its share of the heads, and the
    worker exits on close (checked in _generate)."""
    ps, params = _requests(8)
    one, _ = _generate(model_dir(arch), 1, ps, params)
    two, engine = _generate(model_dir(arch), 2, ps, params)
    _assert_same(one, two)
    assert _rank0_shape(engine) == (heads, kv_heads)
    assert engine.num_multi_steps > 0  # the multi-step decode ran in lock step too


def test_odd_vocabulary_and_row_parallel_biases(tmp_path):
    """251 tokens over 2 ranks: 126 rows each, the last shard's padding row cut off after the
    gather; o_proj and down_proj biases (added once, on rank 0, before the all-reduce)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**{**COMMON, "vocab_size": 251}, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # transformers initialises biases to zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.25)
    model.save_pretrained(tmp_path / "m")
    ps, params = _requests(6, vocab=251)
    one, _ = _generate(str(tmp_path / "m"), 1, ps, params)
    two, _ = _generate(str(tmp_path / "m"), 2, ps, params)
    _assert_same(one, two)


def test_each_rank_loads_its_share(model_dir):
    """Rank 1 of 2 (no process group: loading runs no collective) holds query heads 2-3, the one
    KV head they read, its half of the MLP channels and of the vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.layers.options import ModelOptions
    from engine.models.llama import LlamaForCausalLM

    path = model_dir("llama3_rope_mqa")  # 4 heads of 16, 1 KV head, tied embedding
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(path), options=ModelOptions(tp_rank=1, tp_size=2))
    model.load_weights(path)
    ref = dict(hf.named_parameters())
    layer = "model.layers.1"
    q, k, v = (ref[f"{layer}.self_attn.{n}_proj.weight"] for n in "qkv")
    ours = dict(model.named_parameters())
    assert torch.equal(ours[f"{layer}.self_attn.qkv_proj.weight"], torch.cat([q[32:64], k, v]))
    assert torch.equal(ours[f"{layer}.self_attn.o_proj.weight"], ref[f"{layer}.self_attn.o_proj.weight"][:, 32:64])
    gate, up = ref[f"{layer}.mlp.gate_proj.weight"], ref[f"{layer}.mlp.up_proj.weight"]
    assert torch.equal(ours[f"{layer}.mlp.gate_up_proj.weight"], torch.cat([gate[64:], up[64:]]))
    assert torch.equal(ours[f"{layer}.mlp.down_proj.weight"], ref[f"{layer}.mlp.down_proj.weight"][:, 64:])
    assert torch.equal(ours["model.embed_tokens.weight"], ref["model.embed_tokens.weight"][128:])
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("rank,q_heads,kv_head", [(0, [0], 0), (1, [1], 0), (2, [2], 1), (3, [3], 1)])
def test_kv_heads_fewer_than_ranks_are_replicated_where_read(model_dir, rank, q_heads, kv_head):
    """4 ranks, 4 query heads, 2 KV heads: ranks 0-1 hold KV head 0 (read by query heads 0-1),
    ranks 2-3 KV head 1, as vLLM replicates them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.layers.options import ModelOptions
    from engine.models.llama import LlamaForCausalLM

    path = model_dir("llama_gqa_untied")  # head_dim 16
    ref = dict(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).named_parameters())
    model = LlamaForCausalLM(AutoConfig.from_pretrained(path), options=ModelOptions(tp_rank=rank, tp_size=4))
    model.load_weights(path)
    attn = model.model.layers[0].self_attn
    assert list(attn.q_heads) == q_heads and list(attn.kv_heads) == [kv_head]
    q, k, v = (ref[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")
    rows = lambda w, h: w[16 * h : 16 * (h + 1)]  # noqa: E731
    assert torch.equal(attn.qkv_proj.weight, torch.cat([rows(q, q_heads[0]), rows(k, kv_head), rows(v, kv_head)]))
    assert attn.attn.num_heads == 1 and attn.attn.num_kv_heads == 1


@pytest.mark.parametrize("overrides,tp,words", [
    ({}, 3, "tensor_parallel_size: 3 does not divide the model's 4 attention heads"),
    ({"num_attention_heads": 6, "num_key_value_heads": 3}, 2, "the model's 3 KV heads: one must divide the other"),
    ({"intermediate_size": 129}, 2, "does not divide the model's intermediate_size 129"),
    ({}, 0, "tensor_parallel_size: must be an integer >= 1"),
])
def test_bad_tensor_parallel_size_fails_before_any_work(model_dir, overrides, tp, words):
    from transformers import AutoConfig

    path = model_dir("llama_gqa_untied")
    hf = AutoConfig.from_pretrained(path)
    for key, value in overrides.items():
        setattr(hf, key, value)
    with pytest.raises(ValueError, match=words):
        EngineConfig(model=path, hf_config=hf, device="cpu", tensor_parallel_size=tp)


def test_more_ranks_than_cuda_devices_is_refused(model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"tensor_parallel_size: 2 exceeds the 1 visible CUDA device"):
        EngineConfig(model=model_dir("llama_gqa_untied"), device="cuda", tensor_parallel_size=2)


# -- speculative decoding ----------------------------------------------------------------------------
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
SPEC_TARGET = "llama_gqa_untied"


@pytest.fixture(scope="module")
def looping_model(tmp_path_factory) -> str:
    """n-gram drafts on it are accepted about half the time."""
    return looping_model_dir(tmp_path_factory.mktemp("looping"))


def _spec_requests(n: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """A ragged batch of ``n`` whose odd prompts repeat their first half: plain greedy rows of
    different lengths, one with logprobs (its verify steps take rejection sampling's path, the
    others the host comparison), one with prompt logprobs. A verify of many sequences has more
    tokens than decode pseudo-rows take (16: the prefill path), once fewer are left it has fewer."""
    ps = prompts(n, seed=3, lo=2, hi=40)
    ps = [p + p[: len(p) // 2] if i % 2 else p for i, p in enumerate(ps)]
    lengths = (5, 17, 9, 30, 3, 12, 23, 2, 14, 8, 26, 11)[:n]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in lengths]
    params[1] = SamplingParams(temperature=0.0, max_tokens=lengths[1], logprobs=3, ignore_eos=True)
    params[2] = SamplingParams(temperature=0.0, max_tokens=lengths[2], prompt_logprobs=2, ignore_eos=True)
    return ps, params


def _record_paths(llm, taken: list[str], force_multi_query: bool = False) -> None:
    """Record the verify path rank 0 chooses for each step (the workers replay it); with
    ``force_multi_query``, the multi-query variants (pseudo_rows_mq where every sequence verifies
    k + 1 tokens, prefill_mq for ragged and wide verifies), untimed on the CPU otherwise."""
    paths = llm.engine.runner.verify_paths
    if force_multi_query:
        rows = range(2, paths.max_pseudo_rows + 1)
        paths.path = {**{n: "pseudo_rows_mq" for n in rows}, 0: "prefill_mq"}
        paths.ragged = {n: "prefill_mq" for n in rows}
    choose = paths.choose
    paths.choose = lambda chunks: taken.append(choose(chunks)) or taken[-1]


def _assert_some_accepted(engine) -> None:
    m = engine.spec_metrics
    assert engine.num_spec_steps > 0
    assert 0 < m.num_accepted < m.num_proposed  # drafts accepted and drafts rejected


def _speculation_matches_one_rank(case: str, looping_model: str, model_dir, tmp_path, **kw):
    """Generate with 1 rank without speculation and with 2 ranks with it (``case``: "ngram",
    "ngram_multi_query" (the verifies forced through the multi-query paths) or "draft_model");
    assert the same tokens and logprobs, drafts accepted and rejected. Returns the 2-rank engine and
    the verify paths rank 0 chose."""
    if case == "draft_model":  # the target plus noise: same vocabulary, accepted part of the time
        path = model_dir(SPEC_TARGET, with_tokenizer=True)
        spec = {"model": perturbed_copy(path, str(tmp_path / "draft"), 0.008), "num_speculative_tokens": 3}
        ps, params = _spec_requests(8)
    else:
        path, spec = looping_model, NGRAM
        ps, params = _spec_requests(12)
    one, _ = _generate(path, 1, ps, params, **kw)
    taken: list[str] = []
    two, engine = _generate(path, 2, ps, params, speculative_config=spec, **kw,
                            prepare=lambda llm: _record_paths(llm, taken, case == "ngram_multi_query"))
    _assert_same(one, two)
    _assert_some_accepted(engine)
    return engine, set(taken)


@pytest.mark.parametrize("case", ["ngram", "ngram_multi_query", "draft_model"])
def test_two_ranks_with_speculation_give_the_tokens_of_one(looping_model, model_dir, tmp_path, case):
    """2 ranks + speculation equal 1 rank without it, tokens and logprobs, with drafts accepted and
    rejected. The drafter runs on rank 0 only: the n-gram lookup, or a draft model whole there with
    its K/V (the verify then reads the draft's tokens from rank 0's device: a broadcast). The verify
    forward runs on both ranks through the path rank 0 chose, each of the four (pseudo-rows,
    prefill, and their multi-query variants)."""
    engine, taken = _speculation_matches_one_rank(case, looping_model, model_dir, tmp_path)
    assert taken == ({"pseudo_rows_mq", "prefill_mq"} if case == "ngram_multi_query" else {"pseudo_rows", "prefill"})
    assert _rank0_shape(engine) == (2, 1)  # the target is sharded: 2 of 4 heads, 1 of 2 KV heads
    if case == "draft_model":
        draft = engine.draft_runner
        assert draft.tp_workers is None and draft.config.tensor_parallel_size == 1
        assert (draft.attn_layers[0].num_heads, draft.attn_layers[0].k_cache.shape[2]) == (4, 2)  # whole


def test_a_verify_step_replays_the_path_rank_0_chose(model_dir):
    """What a worker receives (the VerifyStep as the channel pickles it) runs the path rank 0 chose
    on the chunks it carries, with rank 0's device tokens where it has them. On the CPU every path
    gives the same logits, so the tests above cannot tell which one a worker ran."""
    import pickle

    from engine.parallel.workers import step_message
    from engine.spec_decode.verify_paths import VerifyStep

    runner = LLM(model_dir(SPEC_TARGET), speculative_config=NGRAM, **ENGINE).engine.runner
    calls = []
    fakes = {name: (lambda name: lambda c, ids=None: calls.append((name, c, ids)) or name)(name)
             for name in runner.verify_paths.forwards()}
    runner.verify_paths.forwards = lambda: fakes
    # This rank's own timings disagree with rank 0's every choice (its tables, its untimed default):
    # a step never reads them (issue 17's first suspect).
    rows = range(2, runner.verify_paths.max_pseudo_rows + 1)
    runner.verify_paths.path = {**{n: "prefill_mq" for n in rows}, 0: "pseudo_rows_mq"}
    runner.verify_paths.ragged = {n: "prefill" for n in rows}
    runner.verify_paths.choose = lambda chunks: pytest.fail("a worker chose a path")
    chunks = [([5, 0, 0], 7, [0, 3]), ([9, 0], 2, [1])]
    for name in fakes:
        sent = pickle.loads(pickle.dumps(step_message(VerifyStep(name, chunks, False))))
        assert sent.run(runner) == name
    assert [(name, c) for name, c, _ in calls] == [(name, chunks) for name in fakes]
    assert set(fakes) == {"pseudo_rows", "prefill", "pseudo_rows_mq", "prefill_mq"}
    calls.clear()
    ids = torch.tensor([5, 11, 12, 9, 13])
    VerifyStep("prefill", chunks, True).run(runner, ids)
    assert calls[0][2].tolist() == ids.tolist()


def test_a_sharded_draft_model_is_refused(model_dir):
    """What speculative decoding under tensor parallelism still refuses, before any process starts:
    a draft model sharded itself (vLLM's draft_tensor_parallel_size other than 1)."""
    draft = model_dir("llama_mha_tied", with_tokenizer=True)
    spec = {"model": draft, "num_speculative_tokens": 3, "draft_tensor_parallel_size": 2}
    words = r"speculative_config\.draft_tensor_parallel_size: 2: the draft model runs unsharded on rank 0"
    with pytest.raises(SpeculativeConfigError, match=words):
        EngineConfig(model=model_dir(SPEC_TARGET), device="cpu", tensor_parallel_size=2, speculative_config=spec)


def test_a_failure_on_rank_0_stops_the_workers(model_dir):
    llm = LLM(model_dir("llama_gqa_untied"), tensor_parallel_size=2, **ENGINE)
    runner, procs = llm.engine.runner, llm.engine.runner.tp_workers.processes

    def fail(batch):
        raise RuntimeError("injected failure on rank 0")

    runner._run = fail  # the workers got the step and wait for rank 0 in its first collective
    with pytest.raises(RuntimeError, match="injected failure"):
        llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3))
    assert not procs[0].is_alive()
    with pytest.raises(WorkerExited, match="closed after a failure"):
        llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3))


def test_a_dead_worker_is_an_error_not_a_hang(model_dir):
    llm = LLM(model_dir("llama_gqa_untied"), tensor_parallel_size=2, **ENGINE)
    procs = llm.engine.runner.tp_workers.processes
    procs[0].kill()
    procs[0].join()
    with pytest.raises(WorkerExited, match="worker rank 1 exited"):
        llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3))
    llm.close()


def test_workers_exit_when_rank_0_is_killed(model_dir, tmp_path):
    """Rank 0's process dies without closing anything: its worker notices and exits."""
    pid_file = tmp_path / "worker.pid"
    code = ("import sys, os, time; from engine import LLM\n"
            f"llm = LLM({model_dir('llama_gqa_untied')!r}, tensor_parallel_size=2, **{ENGINE!r})\n"
            f"open({str(pid_file)!r}, 'w').write(str(llm.engine.runner.tp_workers.processes[0].pid))\n"
            "os.kill(os.getpid(), 9)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == -9, result.stderr[-2000:]
    pid = int(pid_file.read_text())
    for _ in range(100):  # the worker polls twice a second
        if not _alive(pid):
            break
        time.sleep(0.1)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, parent gone but not yet reaped by init) counts as exited.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


FUSED_CHECK = """
import sys
import engine.models.llama as llama
from engine import LLM, SamplingParams
calls = []
fused = llama.row_parallel_gemv_add
llama.row_parallel_gemv_add = lambda *a, **k: calls.append(1) or fused(*a, **k)
path, ps = sys.argv[1], [[7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23, 24, 25, 26]]
out = {}
for tp in (1, 2):
    llm = LLM(path, tensor_parallel_size=tp, device="cpu", dtype="float32", use_triton=True, enforce_eager=True,
              max_model_len=64, block_size=4, num_kv_blocks=64)
    out[tp] = [o.token_ids for o in llm.generate(ps, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))]
    llm.close()
assert calls, "the fused decode path did not run"
assert out[1] == out[2], out
print("fused decode under TP: same tokens", out[2])
"""


def test_fused_decode_path_under_tensor_parallelism(model_dir, tmp_path):
    """Triton kernels (interpreted on CPU, in a fresh process: support.run_interpreted) with the
    fused small-batch decode: rank 0 adds the residual in its GEMV epilogue, the other rank's GEMV
    writes its partial product, one all-reduce sums them. Same tokens as one rank."""
    result = run_interpreted(FUSED_CHECK, model_dir("qwen2_bias"), workdir=tmp_path, timeout=TIMEOUT_S - 20)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "same tokens" in result.stdout


SPEC_TRITON_CHECK = """
import itertools
import sys
import pytest
from support import widen_m1_gemv_programs
from engine import LLM, SamplingParams
# This process's M == 1 GEMVs (the one-rank run's, rank 0's) at 16 columns a program, not one: the same
# kernels and sums (support.widen_m1_gemv_programs); the spawned rank 1 keeps the default config.
widen_m1_gemv_programs(pytest.MonkeyPatch())
path = sys.argv[1]
ps = [[7, 8, 9, 10, 11, 7, 8, 9], [3, 4, 5, 3, 4], [20, 21, 22, 23, 24, 25, 26, 20, 21], [40, 41, 42, 40],
      [50, 51, 52, 53, 50, 51]]
params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (6, 20, 12, 20, 9)]
kw = dict(device="cpu", dtype="float32", use_triton=True, enforce_eager=True, max_model_len=64, block_size=4,
          num_kv_blocks=64)
base = [o.token_ids for o in LLM(path, **kw).generate(ps, params)]
spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
llm = LLM(path, tensor_parallel_size=2, speculative_config=spec, **kw)
paths = llm.engine.runner.verify_paths
others = itertools.cycle(["pseudo_rows", "prefill", "prefill_mq"])
taken = []
def choose(chunks):  # whole sequences of k + 1: pseudo_rows_mq; else the other three in turn
    whole = all(len(c[0]) == paths.runner.verify_query_len for c in chunks)
    taken.append("pseudo_rows_mq" if whole else next(others))
    return taken[-1]
paths.choose = choose
out = [o.token_ids for o in llm.generate(ps, params)]
m = llm.engine.spec_metrics
llm.close()
assert out == base, (out, base)
assert set(taken) == {"pseudo_rows", "prefill", "pseudo_rows_mq", "prefill_mq"}, taken
assert 0 < m.num_accepted < m.num_proposed, (m.num_accepted, m.num_proposed)
print("speculative verify under TP with Triton: same tokens", taken)
"""


def test_speculative_verify_through_triton_kernels_under_tensor_parallelism(looping_model, tmp_path):
    """Triton kernels (interpreted, in a fresh process) under 2 ranks with n-gram speculation: the
    verify through each of the four paths (the fused small-batch decode for pseudo-rows, the varlen
    prefill attention, the multi-query verify attention over each rank's heads) gives the tokens
    of one rank without speculation."""
    result = run_interpreted(SPEC_TRITON_CHECK, looping_model, workdir=tmp_path, timeout=TIMEOUT_S - 20)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "same tokens" in result.stdout


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def test_serve_stage_with_two_ranks(model_dir, tmp_path):
    """``stage=serve serve.engine.tensor_parallel_size=2``: the server answers with the tokens of
    one rank, and on Ctrl-C it exits with its worker."""
    import httpx

    path = model_dir("llama_gqa_untied", with_tokenizer=True)
    ids = [5, 6, 7, 8, 9]
    expected = LLM(path, **ENGINE).generate([ids], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "shrink", "stage=serve", f"model={path}", f"run={tmp_path}", "device=cpu",
         f"serve.port={port}", "serve.engine.max_model_len=128", "serve.engine.tensor_parallel_size=2",
         "serve.log_level=warning"],
        cwd=REPO, env={**os.environ, "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 200
        while True:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        body = {"model": Path(path).name, "prompt": ids, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                "logprobs": 0}
        reply = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        assert len(choice["logprobs"]["tokens"]) == 6 and choice["text"] == expected[0].text
        children = _children(proc.pid)
        assert children  # the worker (and multiprocessing's resource tracker)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(c) for c in children)


def test_a_failure_while_starting_leaves_no_worker(model_dir, tmp_path):
    """A checkpoint that does not fill the model fails on every rank while loading: one error,
    and the worker is gone."""
    import multiprocessing

    from safetensors.torch import load_file, save_file

    from engine.loader import CheckpointMismatchError

    src = Path(model_dir("llama_gqa_untied"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    before = {p.pid for p in multiprocessing.active_children()}
    start = time.monotonic()
    with pytest.raises(CheckpointMismatchError, match="1 missing: model.layers.1.mlp.up_proj.weight"):
        LLM(str(broken), tensor_parallel_size=2, **ENGINE)
    assert not [p for p in multiprocessing.active_children() if p.pid not in before and p.name.startswith("shrink-tp")]
    assert time.monotonic() - start < 60


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("arch", ["llama_gqa_untied", "qwen2_bias"])
def test_two_gpus_give_the_tokens_of_one(model_dir, monkeypatch, arch):
    """NCCL, CUDA graphs (decode, multi-step and prefill; their all-reduces and the logits'
    all-gather captured) and the fused small-batch decode, in fp32 so that the ranks' summation
    order cannot flip a token: same tokens as one GPU."""
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off; the workers inherit it
    ps, params = _requests(8)
    gpu = dict(ENGINE, device="cuda", num_kv_blocks=256)
    one, _ = _generate(model_dir(arch), 1, ps, params, **gpu)
    two, engine = _generate(model_dir(arch), 2, ps, params, **gpu)
    _assert_same(one, two)
    assert engine.num_multi_steps > 0


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("case", ["ngram", "ngram_multi_query", "draft_model"])
def test_two_gpus_with_speculation_give_the_tokens_of_one(looping_model, model_dir, tmp_path, monkeypatch, case):
    """NCCL, CUDA graphs on (the decode, verify and multi-query graphs, their collectives captured;
    each rank times the verify paths, rank 0's choice is replayed on both), fp32: 2 GPUs with
    n-gram speculation (or a draft model on GPU 0) give the tokens and logprobs of one GPU without."""
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    gpu = dict(ENGINE, device="cuda", num_kv_blocks=256)
    engine, taken = _speculation_matches_one_rank(case, looping_model, model_dir, tmp_path, **gpu)
    paths = engine.runner.verify_paths
    assert engine.runner.graphs is not None and paths.verify_graphs is not None and paths.mq_graphs is not None
    if case == "ngram_multi_query":
        assert taken == {"pseudo_rows_mq", "prefill_mq"}
    else:
        assert taken  # the paths rank 0 timed fastest

"""Helpers shared by the tests: tiny random Llama-family models, a tiny tokenizer, the CLI.

A module of its own (not conftest.py): several test folders have a conftest.py, and
`from conftest import ...` would pick whichever was imported first.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, rms_norm_eps=1e-5)
    values.update(overrides)
    return LlamaConfig(**values)


def make_tiny_tokenizer(vocab_size: int = 320):
    """A real byte-level BPE tokenizer whose vocabulary fits a tiny model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # every byte has a token: no <unk>
        vocab[ch] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def save_tiny_artifact(path: Path, seed: int = 0, **config_overrides) -> Path:
    """A tiny random Llama saved as a complete artifact (teacher-shaped, 4 layers)."""
    from transformers import AutoModelForCausalLM

    from shrink.modeling import save_model_artifact

    torch.manual_seed(seed)
    config = tiny_llama_config(**config_overrides)
    model = AutoModelForCausalLM.from_config(config).eval()
    save_model_artifact(path, model, make_tiny_tokenizer(config.vocab_size), stage="import",
                        config={"teacher": {"source": "tiny-random"}}, metrics={})
    return path


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m shrink ...` in a subprocess, from the repo root."""
    full_env = {**os.environ, "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run([sys.executable, "-m", "shrink", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def run_main(*args: str) -> subprocess.CompletedProcess:
    """`python -m shrink ...`'s main() in this process, from the repo root, with what it printed and
    its exit status as run_cli returns them: for tests whose subject is a stage's work (its artifact,
    metrics, caches, printed progress), not the command line's process (its one-line errors are
    run_cli's). Spares each run an interpreter, torch and transformers starting up (~4 s). An
    exception other than the ones main() turns into status 2 propagates."""
    import contextlib
    import io

    from shrink.__main__ import main

    out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(["shrink", *args], code, out.getvalue(), err.getvalue())


INTERPRETED_HEADER = """import sys
sys.path.insert(0, {tests!r})
import triton_interpreter
triton_interpreter.install()
if __name__ == "__main__":
"""


def run_interpreted(script: str, *args: str, workdir: Path, timeout: int) -> subprocess.CompletedProcess:
    """``script`` (with ``args``) in a fresh Python process under Triton's CPU interpreter (chosen
    at import), saved as a file in ``workdir`` first: multiprocessing's spawn makes each
    tensor-parallel worker import the parent's main file (as __mp_main__), so the header installs
    tests/triton_interpreter.py's patch (the interpreter's per-call re-patching skipped, nothing
    else changed: half the interpreted time) on every rank, while ``script`` runs in the parent
    only, under the ``__main__`` guard. Run with ``-c``, the workers would interpret without it."""
    path = Path(workdir) / "interpreted_check.py"
    body = "".join("    " + line if line.strip() else line for line in script.strip().splitlines(keepends=True))
    path.write_text(INTERPRETED_HEADER.format(tests=str(REPO / "tests")) + body + "\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(path), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def with_pairwise(cases: list[tuple], values: list) -> list[tuple]:
    """Each case (a tuple of factor values) extended by one of ``values``, chosen greedily so that
    every value meets every value of each factor in the cases at least once: a pairwise cover of
    the extra factor, where the full cross-product would take len(values) times as many cases."""
    width = len(cases[0])
    wanted = {(i, case[i], v) for case in cases for i in range(width) for v in values}
    out = []
    for case in cases:
        best = max(values, key=lambda v: sum((i, case[i], v) in wanted for i in range(width)))
        wanted -= {(i, case[i], best) for i in range(width)}
        out.append((*case, best))
    assert not wanted, f"no pairwise cover: {sorted(wanted, key=str)[:5]} ..."
    return out


def load_experiment(name: str):
    """experiments/<name>.py loaded as a fresh module (the scripts are run as files, not imported)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def count_fused_rows(monkeypatch) -> list[int]:
    """The rows of every fused decode forward's layers as they run (engine/models/llama.py calls
    gemv_rope_store once per layer on the fused path only), appended to the returned list."""
    import engine.models.llama as llama_module

    rows: list[int] = []
    real = llama_module.gemv_kernels.gemv_rope_store

    def counting(h, *args, **kwargs):
        rows.append(h.shape[0])
        return real(h, *args, **kwargs)

    monkeypatch.setattr(llama_module.gemv_kernels, "gemv_rope_store", counting)
    return rows


def fewest_fast_programs(monkeypatch) -> None:
    """FAST_MIN_PROGRAMS (an H200's occupancy target) at 1 in kernels.gemv and kernels.quant_gemv: at
    tiny widths it makes the M == 1 fast paths one column a program, which the interpreter runs one at
    a time; at 1 the same kernels and sums run in wider programs (one column a program stays the
    kernel tests' at the default)."""
    monkeypatch.setattr("kernels.gemv.FAST_MIN_PROGRAMS", 1)
    monkeypatch.setattr("kernels.quant_gemv.FAST_MIN_PROGRAMS", 1)


def widen_m1_gemv_programs(monkeypatch, columns: int = 16) -> None:
    """kernels/gemv.py's gemv_config at M == 1 with at least ``columns`` columns a program: without
    PDL (as on the CPU) it takes one column a program below 512 columns, programs the interpreter
    runs one at a time (most of an interpreted engine test's decode time). The same kernels and
    sums (each column's is the same at any BLOCK_N); one column a program stays covered by the
    kernel tests at the default config (tests/kernels/test_gemv.py, test_quant_gemv.py)."""
    import kernels.gemv as gemv_module

    default = gemv_module.gemv_config

    def wider(m: int, n: int, k: int, **kwargs) -> tuple[int, int, int, int]:
        block_m, block_n, block_k, warps = default(m, n, k, **kwargs)
        return (block_m, max(block_n, columns), block_k, warps) if m == 1 else (block_m, block_n, block_k, warps)

    monkeypatch.setattr(gemv_module, "gemv_config", wider)

"""experiments/medusa_acceptance.py: the engine's acceptance of Medusa heads and each head's agreement computed
outside the engine on the same greedy text, with a tiny teacher on the CPU. Zero heads are the LM head at the
same row (they predict token t + 1 for position t + 2 + i), so their offline agreement is known from the text."""

from __future__ import annotations

import json

from drafts import medusa_heads
from support import load_experiment, save_tiny_artifact


def test_offline_agreement_of_zero_heads_is_the_texts_repeats(tmp_path, capsys):
    from engine import LLM, SamplingParams

    # seed 3 at this init scale: greedy text that repeats and changes, head 0 and head 1 agree on different shares
    teacher = str(save_tiny_artifact(tmp_path / "teacher", seed=3, num_hidden_layers=2, initializer_range=0.15))
    heads = medusa_heads(teacher, str(tmp_path / "heads"), 2, 0.0)
    wiki = tmp_path / "data" / "wikitext-2-raw"
    wiki.mkdir(parents=True)
    para = ("The river runs past the old mill and the mill stands by the river. " * 8).strip()
    (wiki / "wiki.test.raw").write_text(" = Title = \r\n" + para + "\r\n")
    load_experiment("medusa_acceptance").main(
        ["--teacher", teacher, "--heads", heads, "--data-dir", str(tmp_path / "data"), "--prompts", "1",
         "--prompt-tokens", "24", "--new-tokens", "16", "--ks", "1", "2"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    engine_rows = [r for r in rows if r["bench"] == "medusa_acceptance"]
    (offline,) = [r for r in rows if r["bench"] == "medusa_offline"]
    assert [r["k"] for r in engine_rows] == [1, 2] and all(r["greedy_equal"] for r in engine_rows)

    llm = LLM(teacher, device="cpu", dtype="float32")
    prompt = llm.tokenizer.encode(para)[:24]
    (out,) = llm.generate([{"prompt_token_ids": prompt}],
                          SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    ids = prompt + list(out.token_ids)
    positions = range(len(prompt) - 1, len(ids) - 2 - 2 + 1)
    expected = [sum(ids[t + 1] == ids[t + 2 + i] for t in positions) / len(positions) for i in range(2)]
    assert offline["positions"] == len(positions)
    assert 0.0 < min(expected) and max(expected) < 1.0 and expected[0] != expected[1]  # an off-by-one would show
    assert offline["head_agreement"] == expected

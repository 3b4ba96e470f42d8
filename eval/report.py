"""The run report: one row per artifact, written as report.md and report.json, with a table that
says in plain words how much smaller, faster and worse each artifact is than the teacher.

    python -m eval.report RUN/eval/report.json      # prints the report's path and that table
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from eval.perplexity import WindowProtocol
from eval.settings import HarnessSettings, WikitextSettings

QUALITY_KEYS = ("ppl_wikitext2", "ppl_heldout")


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) >= 1 else f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def columns_of(rows: list[dict[str, Any]], first: list[str]) -> list[str]:
    seen = list(first)
    for row in rows:
        seen.extend(k for k in row if k not in seen)
    return seen


def quality_key(rows: list[dict[str, Any]]) -> str | None:
    """The perplexity the comparisons use: WikiText-2 where measured, else held-out."""
    return next((k for k in QUALITY_KEYS if any(r.get(k) is not None for r in rows)), None)


def speed_key(rows: list[dict[str, Any]]) -> str | None:
    """The engine's decode tok/s at the smallest batch measured."""
    keys = sorted({k for r in rows for k in r if k.startswith("decode_tok_s_b")}, key=lambda k: int(k[14:]))
    return keys[0] if keys else None


# Column groups of the table, in this order (within a group, in the order the rows have them).
COLUMN_ORDER = ("artifact", "stage", "status", "size_MB", "params", "ppl_", "acc_", "top1_agreement",
                "kl_to_teacher", "decode_tok_s_", "hf_decode_tok_s_", "hf_generate", "prefill_tok_s_", "ttft_", "itl_",
                "load_output_tok_s", "spec_", "kv_", "load_peak_kv_MB", "engine_weights_MB", "engine_compressed_linears",
                "peak_memory_MB")


def ordered_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every column of the rows, grouped as COLUMN_ORDER says; others (stage_s, errors) last."""
    cols = columns_of(rows, [])

    def rank(col: str) -> int:
        return next((i for i, p in enumerate(COLUMN_ORDER) if col == p or (p.endswith("_") and col.startswith(p))),
                    len(COLUMN_ORDER))

    return sorted(cols, key=rank)  # stable: a group keeps the rows' order


def _times(ratio: float, more: str, less: str, what: str) -> str:
    if abs(ratio - 1) < 0.05:
        return f"about the same {what}"
    return f"{ratio:.1f}x {more}" if ratio >= 1 else f"{1 / ratio:.1f}x {less}"


def plain_words(rows: list[dict[str, Any]], teacher: str = "teacher") -> list[str]:
    """One sentence per artifact: 'quantize: 3.1x smaller, 1.4x faster decode, perplexity +12% vs
    teacher', then task accuracy (the mean change over the tasks, in points), agreement and draft
    acceptance; what was not measured is left out of its sentence."""
    base = next((r for r in rows if r["artifact"] == teacher and r.get("status") == "ok"), None)
    if base is None:
        return []
    q, s = quality_key(rows), speed_key(rows)
    lines = []
    for row in rows:
        if row is base:
            continue
        if row.get("status") != "ok":
            lines.append(f"{row['artifact']}: not measured ({row.get('status')})")
            continue
        parts = []
        if row.get("size_MB") and base.get("size_MB"):
            parts.append(_times(base["size_MB"] / row["size_MB"], "smaller", "larger", "size"))
        if s and row.get(s) and base.get(s):
            parts.append(_times(row[s] / base[s], "faster decode", "slower decode", "decode speed"))
        if q and row.get(q) and base.get(q):
            parts.append(f"perplexity {100 * (row[q] / base[q] - 1):+.0f}%")
        # acc_norm_cqa_mc is CommonsenseQA again (acc_cqa_mc normalised): one task counts once
        tasks = [k for k in row if k.startswith("acc_") and not k.startswith("acc_norm_")
                 and row[k] is not None and base.get(k) is not None]
        if tasks:  # one number: the mean change over the tasks both measured
            change = sum(row[k] - base[k] for k in tasks) / len(tasks)
            parts.append(f"task accuracy {100 * change:+.0f} points")
        if row.get("top1_agreement") is not None:
            parts.append(f"top-1 agreement {100 * row['top1_agreement']:.0f}%")
        if row.get("spec_acceptance_rate") is not None:
            parts.append(f"draft acceptance {100 * row['spec_acceptance_rate']:.0f}%")
        if row.get("gate_ratio") is not None:  # what its stage cost, on the gates' held-out text
            verdict = ("over its budget, reverted: the pipeline went on without it" if row.get("gate_reverted") else
                       "over its budget" if row.get("gate_passed") is False else "within its budget")
            parts.append(f"its stage's gate ratio {row['gate_ratio']:.2f} ({verdict})")
        lines.append(f"{row['artifact']}: {', '.join(parts) or 'no comparable numbers'} vs {teacher}")
    return lines


REFERENCE_WIKITEXT2 = WikitextSettings()  # the project's fixed protocol (issue 11)


def perplexity_notes(protocols: dict[str, WindowProtocol]) -> list[str]:
    """One note per dataset: what it is and how it was cut into windows."""
    reference = WindowProtocol(REFERENCE_WIKITEXT2.context, REFERENCE_WIKITEXT2.stride, None,
                               REFERENCE_WIKITEXT2.full_windows_only)
    notes = []
    for name, protocol in protocols.items():
        if name == "wikitext2":
            same = protocol == reference
            verdict = ("the project's fixed protocol (issue 11; 148 windows for SmolLM2's tokenizer)" if same else
                       "NOT the project's fixed protocol (non-overlapping 2048-token windows, full windows only, all "
                       "of them): not comparable with its published numbers")
            notes.append("ppl_wikitext2: WikiText-2 raw test (rows keep their \"\\n\", joined with \"\\n\\n\", "
                         f"no BOS), {protocol.describe()}: {verdict}")
        elif name == "heldout":
            notes.append(f"ppl_heldout: the validation split of the run's data, {protocol.describe()}")
        else:
            notes.append(f"ppl_{name}: {protocol.describe()}")
    return notes


def measurement_notes(rows: list[dict[str, Any]], protocols: dict[str, WindowProtocol], cap_notes: list[str],
                      harness: HarnessSettings, dtype: str, device: str) -> list[str]:
    """What every column of the report means and how it was measured."""
    t, sp = harness.tasks, harness.speed
    compiled = [r["artifact"] for r in rows if str(r.get("hf_generate", "")).endswith("compiled")]
    return [
        *perplexity_notes(protocols), *cap_notes,
        f"perplexity and agreement: transformers, {dtype} on {device}",
        "status: ok when the files match the content hash in shrink.json; a damaged artifact gets no numbers",
        "kv_bytes_per_token: the planner (2 x layers x kv_heads x head_dim x 2 bytes, bf16); "
        "kv_bytes_per_token_planned / _measured: the planner at the engine's dtype and the engine's allocated "
        "pool per token; kv_capacity_tokens: the pool's size",
        f"acc_cqa / acc_svamp / acc_gsm8k: greedy answers through the engine to the \"[label] question\\nA:\" "
        "prompts, parsed and scored exactly: the format the rationale distillation (Distilling Step-by-Step) "
        f"trains, so a model never trained on it (the teacher) scores near zero; first {t.limit} {t.split} examples "
        "per task",
        "acc_cqa_mc / acc_norm_cqa_mc: CommonsenseQA as lm-eval scores a multiple_choice task, the format-free "
        "measure of the same questions: each choice's log-likelihood as the continuation of \"Question: "
        "...\\nAnswer:\" (the engine's prompt logprobs); acc_cqa_mc: the choice with the largest summed "
        "log-likelihood, acc_norm_cqa_mc: the largest per character of the choice (lm-eval's acc_norm); chance is "
        f"0.2; the first {t.limit} {t.split} questions" + ("" if t.cqa_mc else " (off: eval.tasks.cqa_mc=false)"),
        f"top1_agreement / kl_to_teacher (nats/token): on {harness.agreement.windows} held-out windows of "
        f"{harness.agreement.window_len} tokens",
        "prefill/decode_tok_s_bN: the engine at batch N on random prompts; hf_decode_tok_s_bN: transformers "
        "generate on the same shapes, same run; hf_generate: its cache (static where the model takes one) and "
        f"whether its decode step ran torch.compile'd (eval.speed.hf_compile={sp.hf_compile}; compiled: "
        f"{', '.join(compiled) or 'none'}); an eager generate loop is no fair baseline on a GPU",
        "engine_weights_MB / engine_compressed_linears: the weights the engine holds in memory and how many "
        f"linears it serves compressed (eval.engine.compressed_weights={harness.engine.compressed_weights}: auto "
        "serves int8/int4/2:4 dequantized on a CPU, and on a GPU where the decode forward times faster dense)",
        f"ttft/itl p50/p99: {harness.load.requests} streamed requests, {harness.load.concurrency} at a time, over "
        "AsyncLLM in-process; peak_memory_MB: CUDA peak allocation (none on CPU)",
        "the speculative row serves the teacher with the draft: its perplexity is the teacher's (speculative "
        "decoding keeps the target's distribution); its speed and accuracy are measured",
        "stage_s: the stage's wall time",
    ]


def render_report(title: str, rows: list[dict[str, Any]], notes: list[str], plots: list[str] = ()) -> str:
    cols = ordered_columns(rows)
    body = [f"# {title}", ""]
    words = plain_words(rows)
    if words:
        body += ["## Against the teacher", ""] + [f"- {w}" for w in words] + [""]
    body += ["## Every artifact", "", markdown_table(rows, cols), ""]
    if plots:
        body += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    body += ["## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(body) + "\n"


def write_report(directory: Path, title: str, rows: list[dict[str, Any]], notes: list[str],
                 settings: dict[str, Any], details: dict[str, Any] | None = None, plots: list[str] = ()) -> None:
    (directory / "report.md").write_text(render_report(title, rows, notes, plots))
    (directory / "report.json").write_text(json.dumps(
        {"title": title, "settings": settings, "rows": rows, "notes": notes, "plots": list(plots),
         "against_teacher": plain_words(rows), "details": details or {}}, indent=2, default=str))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m eval.report RUN/eval/report.json", file=sys.stderr)
        return 2
    path = Path(argv[0])
    if not path.is_file():
        print(f"no report at {path}", file=sys.stderr)
        return 1
    report = json.loads(path.read_text())
    print(f"report: {path.with_name('report.md').resolve()}")
    for line in report.get("against_teacher") or plain_words(report["rows"]):
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Distillation experiments of issue #3, on one GPU, within a few minutes:

  1. layer importance (Block Influence and drop-one loss) -> candidate 15-layer students, the one
     with the lowest WikiText-2 perplexity at init is kept (parity every:2 is a candidate too);
  2. KD beats CE: (a) CE only, (b) forward KL, (c) JSD(0.5), (d) forward KL + intermediate layers,
     the same token budget each; WikiText-2 raw test perplexity (non-overlapping 1024-token windows,
     full windows only, no BOS) of each, of the teacher and of the student at init; with
     --teacher-generated N, every run trains on the corpus mixed with N teacher samples (our engine);
  3. speed and memory: tokens/s and MFU of the KD step, peak memory of the KD step vs a plain CE
     step (transformers' own loss) and our chunked CE step (vocab of the model, sequence 2048);
  4. Distilling Step-by-Step on CommonsenseQA: the teacher fine-tuned (a) label only, (b) label +
     PaLM rationale (alpha 0.5), the same steps; test accuracy of each.

    PYTHONUNBUFFERED=1 python experiments/distill.py --teacher RUN/teacher --data-dir ../shared/data \
        --out outputs/distill_exp --tokens 4000000 --save-student outputs/student15
    python experiments/distill.py --teacher TINY --data-dir ../shared/data --out DIR --tokens 4096 --quick
    python experiments/distill.py --teacher SMOL --data-dir ../shared/data --out DIR --parts importance,kd \
        --runs fkl,ce --tokens 100000000 --context 2048 --teacher-generated 200000 --teacher-ratio 0.5

OUT/results.json is rewritten after every measurement (a killed run keeps what it measured);
training logs go to OUT/<run>.train_log.jsonl. The best 15-layer student is saved (atomically, as
an artifact) to --save-student after each run that beats the previous best.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.errors import ShrinkError  # noqa: E402
from common.results import ResultsFile  # noqa: E402
from eval.perplexity import encode, wikitext2_text  # noqa: E402
from shrink.artifacts import Artifact  # noqa: E402
from shrink.modeling import load_model, load_tokenizer, num_parameters, save_model_artifact  # noqa: E402
from shrink.stages.distill import TaskData, TaskDataSpec, load_task_data  # noqa: E402
from shrink.stages.gqa import measure_ppl  # noqa: E402
from shrink.teacher_data import LINEAGE_FILE, TeacherDataSettings, teacher_generated_blocks  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.data import CORPUS_FILE, budget_blocks, mix_to_budget  # noqa: E402

T0 = time.time()
PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher model directory (artifact with tokenizer)")
    p.add_argument("--data-dir", required=True, help="shared data: wikitext-2-raw/, corpus/, reasoning/")
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, required=True, help="training tokens of each KD/CE run (the same for all)")
    p.add_argument("--quick", action="store_true", help="tiny settings: a CPU smoke run in seconds")
    p.add_argument("--save-student", default=None, help="where the best student artifact goes")
    p.add_argument("--keep", type=int, default=None, help="student layers (default 15; --quick: 2)")
    p.add_argument("--runs", default="ce,fkl,jsd,fkl_layers")
    p.add_argument("--teacher-generated", type=int, default=0,
                   help="kd: teacher samples (our engine) mixed into the corpus for every run; 0: corpus only")
    p.add_argument("--teacher-ratio", type=float, default=0.5, help="share of the kd training blocks they fill")
    p.add_argument("--teacher-max-tokens", type=int, default=256, help="tokens the teacher generates per sample")
    p.add_argument("--teacher-cache", default=None, help="cache of the samples, by lineage (default OUT/cache)")
    p.add_argument("--parts", default="importance,kd,speed,dss")
    p.add_argument("--block-size", type=int, default=None, help="default 1024 (--quick: 64)")
    p.add_argument("--batch-size", type=int, default=None, help="default 16 (--quick: 4)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=None, help="default 30 (--quick: 1)")
    p.add_argument("--context", type=int, default=None, help="perplexity window; default 1024 (--quick: 64)")
    p.add_argument("--max-windows", type=int, default=None, help="default all (--quick: 2)")
    p.add_argument("--select-windows", type=int, default=None, help="windows to pick the layers; default 40")
    p.add_argument("--bench-seq", type=int, default=None, help="default 2048 (--quick: 64)")
    p.add_argument("--bench-batch", type=int, default=None, help="default 8 (--quick: 2)")
    p.add_argument("--cqa-steps", type=int, default=None, help="default 300 (--quick: 2)")
    p.add_argument("--cqa-batch", type=int, default=32)
    p.add_argument("--cqa-lr", type=float, default=1e-4)
    p.add_argument("--cqa-max-train", type=int, default=None, help="default all (--quick: 24)")
    p.add_argument("--cqa-max-eval", type=int, default=None, help="default all 1221 (--quick: 4)")
    p.add_argument("--wiki-chars", type=int, default=None, help="truncate WikiText-2 (default all; --quick: 20000)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    q = args.quick
    defaults = {"keep": (15, 2), "block_size": (1024, 64), "batch_size": (16, 4), "warmup_steps": (30, 1),
                "context": (1024, 64), "max_windows": (None, 2), "select_windows": (40, 2), "bench_seq": (2048, 64),
                "bench_batch": (8, 2), "cqa_steps": (300, 2), "cqa_max_train": (None, 24), "cqa_max_eval": (None, 4),
                "wiki_chars": (None, 20000)}
    for key, (full, small) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if q else full)
    if q:
        args.cqa_batch = min(args.cqa_batch, 2)
    args.runs = [r for r in args.runs.split(",") if r]
    args.parts = [r for r in args.parts.split(",") if r]
    if args.teacher_generated < 0:
        p.error(f"--teacher-generated must be >= 0 (0: off), got {args.teacher_generated}")
    try:
        teacher_data_settings(args)
    except ShrinkError as e:
        p.error(f"--teacher-ratio / --teacher-max-tokens: {e}")
    return args


def teacher_data_settings(args: argparse.Namespace) -> TeacherDataSettings | None:
    """--teacher-* as the distill stage's data.teacher_generated (its defaults for the rest: 32-token
    corpus prefixes, temperature 1, top-p 1, seed --seed); None when off."""
    if not args.teacher_generated:
        return None
    if args.teacher_ratio <= 0:
        raise ShrinkError(f"the ratio must be in (0, 1] with --teacher-generated, got {args.teacher_ratio}")
    return TeacherDataSettings.from_cfg({"ratio": args.teacher_ratio, "num_samples": args.teacher_generated,
                                         "max_tokens": args.teacher_max_tokens}, args.seed)


def autocast(device: torch.device):
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def wiki_ppl(model, ids, args, max_windows=None) -> float:
    """WikiText-2 perplexity in the experiment's protocol (non-overlapping windows, full windows only)."""
    return measure_ppl(model, {"w": ids}, args.context, args.context, max_windows, "bf16", full_windows_only=True)["w"]


def cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def teacher_mix(train: torch.Tensor, tokenizer, args, device) -> tuple[torch.Tensor, dict]:
    """kd's training blocks with the teacher's samples (issue 16, item 1: the corpus' ~11.4M tokens repeat
    ~9 times in 100M). The samples come from the teacher through our engine (shrink/teacher_data.py, the
    distill stage's code), generated once and cached by lineage under --teacher-cache, and fill
    --teacher-ratio of the blocks of the budget (train.data.mix_to_budget, which experiments/gqa.py
    --teacher-samples uses on the same cache entry). What is recorded is measured on the mix."""
    settings = teacher_data_settings(args)
    teacher_art = Artifact.from_model_dir(args.teacher)
    cache = Path(args.teacher_cache) if args.teacher_cache else Path(args.out) / "cache"
    t = time.time()
    samples, info = teacher_generated_blocks(settings, teacher_art, tokenizer, train, cache, str(device))
    secs = time.time() - t
    cleanup(device)  # the engine's KV cache
    mixed, stats = mix_to_budget(train, samples, settings.ratio, args.tokens, tokenizer.eos_token_id, settings.seed)
    entry = Path(info["teacher_data"])
    row = {**info, "lineage": json.loads((entry / LINEAGE_FILE).read_text()), "generate_or_load_s": secs, **stats}
    return mixed, row


# ---------------------------------------------------------------- 1. layer importance
def choose_layers(teacher, calib, wiki, args, device, results) -> list[int]:
    from train.importance import block_influence, drop_one_loss, top_layers
    from train.student_init import student_from_teacher

    n = teacher.config.num_hidden_layers
    t = time.time()
    with autocast(device):
        bi = block_influence(teacher, calib, batch_size=4)
        drop = drop_one_loss(teacher, calib, batch_size=4)
    results.put("importance", "block_influence", bi)
    results.put("importance", "drop_one_loss", drop)
    log(f"importance: BI and drop-one loss of {n} layers on {calib.numel()} tokens ({time.time() - t:.1f}s)")
    k = args.keep
    ends = (0, n - 1)
    candidates = {"every_2": list(range(0, n, 2))[:k] if n // 2 >= k else list(range(k)),
                  "bi": top_layers(bi, k, ends), "drop_loss": top_layers(drop, k, ends),
                  "first": list(range(k))}
    scores = {}
    for name, keep in candidates.items():
        if len(keep) != k:
            continue
        student = student_from_teacher(teacher, keep)
        scores[name] = wiki_ppl(student, wiki, args, args.select_windows)
        results.put("importance", "candidates", name, {"layers": keep, "init_ppl_subset": scores[name]})
        log(f"importance: {name:9s} layers {keep} -> init ppl {scores[name]:.1f} ({args.select_windows} windows)")
        del student
    best = min(scores, key=scores.get)
    results.put("importance", "chosen", {"name": best, "layers": candidates[best]})
    log(f"importance: chosen {best} {candidates[best]}")
    return candidates[best]


# ---------------------------------------------------------------- 2. KD beats CE
RUNS = {
    "ce": dict(losses={"ce": 1.0}),
    "fkl": dict(losses={"forward_kl": 1.0}),
    "jsd": dict(losses={"jsd": {"beta": 0.5}}),
    "fkl_layers": dict(losses={"forward_kl": 1.0}, layer_map="auto", layer_loss="cosine", layer_weight=1.0),
}


def kd_runs(teacher, tokenizer, keep, train, val, wiki, args, device, results, out) -> None:
    from train.layer_distill import parse_layer_map
    from train.loop import train_distill
    from train.student_init import student_from_teacher

    n_teacher = teacher.config.num_hidden_layers
    init = student_from_teacher(teacher, keep)
    results.put("kd", "student_init_ppl", wiki_ppl(init, wiki, args, args.max_windows))
    results.put("kd", "student_params", num_parameters(init))
    log(f"kd: student at init ppl {results.data['kd']['student_init_ppl']:.1f} ({num_parameters(init) / 1e6:.1f}M params)")
    del init
    steps = max(1, math.ceil(args.tokens / (args.batch_size * args.block_size)))
    best = math.inf
    for name in args.runs:
        spec = dict(RUNS[name])
        t = time.time()
        student = student_from_teacher(teacher, keep)
        tc = TrainConfig(max_steps=steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                         chunk_size=4096, temperature=1.0, checkpoint_every=0, val_batches=4, seed=args.seed,
                         losses=spec["losses"], layer_loss=spec.get("layer_loss", "cosine"),
                         layer_weight=spec.get("layer_weight", 0.0))
        if spec.get("layer_map"):
            tc.layer_map = parse_layer_map(spec["layer_map"], len(keep), n_teacher, keep)
        uses_teacher = name != "ce"
        result = train_distill(student, teacher if uses_teacher else None, train, val, tc, out / f"kd-{name}")
        model = result["model"]
        secs = time.time() - t
        row = {"losses": spec["losses"], "layer_weight": tc.layer_weight, "steps": steps,
               "train_tokens": result["metrics"]["train_tokens"], "tokens_per_s": result["metrics"]["tokens_per_s"],
               "final_loss": result["metrics"]["final_loss"], "train_s": secs}
        row["wikitext2_ppl"] = wiki_ppl(model, wiki, args, args.max_windows)
        results.put("kd", "runs", name, row)
        log(f"kd {name}: {row['train_tokens']} tokens in {secs:.1f}s ({row['tokens_per_s']:.0f} tok/s), "
            f"WikiText-2 ppl {row['wikitext2_ppl']:.2f}")
        if args.save_student and row["wikitext2_ppl"] < best:
            best = row["wikitext2_ppl"]
            save_model_artifact(args.save_student, model, tokenizer, stage="distill",
                                config={"experiment": "experiments/distill.py", "run": name, "layers": keep,
                                        "tokens": args.tokens},
                                metrics={"wikitext2_ppl": best, "train_tokens": row["train_tokens"],
                                         "kept_layers": keep}, dtype="bf16")
            results.put("kd", "saved_student", {"path": str(args.save_student), "run": name, "ppl": best})
            log(f"kd: saved {name} student to {args.save_student}")
        del student, model, result
        cleanup(device)


# ---------------------------------------------------------------- 3. speed and memory
def flops_per_token(config, seq: int, train: bool) -> float:
    """Matmul FLOPs per token: 2 per parameter-multiply forward (x3 with backward), plus attention
    scores and values (causal: half of the T x T products)."""
    d, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or d // heads
    per_layer = d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * config.intermediate_size
    n = L * per_layer + V * d  # lm_head multiply counted once
    attn = L * 2 * heads * hd * seq  # QK^T and PV, causal half of 2 * 2 * T * heads * hd
    fwd = 2 * n + attn
    return 3 * fwd if train else fwd


def bench(teacher, keep, args, device, results) -> None:
    from train.chunked_loss import LossTerm
    from train.loop import distill_batch_loss
    from train.losses import make_loss
    from train.student_init import student_from_teacher

    B, T = args.bench_batch, args.bench_seq
    V = teacher.config.vocab_size
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    steps, warm = (6, 2) if device.type == "cuda" else (2, 1)

    def run(kind: str) -> dict:
        student = student_from_teacher(teacher, keep).to(device)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
        if kind.startswith("kd"):
            terms, t_model = [LossTerm("forward_kl", 1.0, make_loss("forward_kl"))], teacher
        else:
            terms, t_model = [LossTerm("ce", 1.0, make_loss("ce"))], None
        cleanup(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times = []
        for i in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.time()
            with autocast(device):
                if kind == "hf_ce":
                    loss = student(input_ids=ids, labels=ids).loss
                else:
                    # kd: fused head+loss (compiled on CUDA); kd_checkpoint: the per-chunk checkpoint path.
                    loss, _ = distill_batch_loss(student, t_model, ids, terms, 4096,
                                                 fused_head_loss=kind != "kd_checkpoint")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warm:
                times.append(time.time() - t)
        sec = sum(times) / len(times)
        row = {"step_s": sec, "tokens_per_s": B * T / sec}
        if device.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
            row["peak_mem_above_teacher_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
        flops = flops_per_token(student.config, T, train=True)
        if kind.startswith("kd"):
            flops += flops_per_token(teacher.config, T, train=False)
        row["model_tflops_per_s"] = flops * B * T / sec / 1e12
        row["mfu"] = row["model_tflops_per_s"] * 1e12 / PEAK_BF16_FLOPS
        del student, opt
        return row

    for kind in ("hf_ce", "chunked_ce", "kd_checkpoint", "kd"):
        row = run(kind)
        results.put("speed", kind, row)
        log(f"speed {kind}: {row['tokens_per_s']:.0f} tok/s, MFU {row['mfu']:.3f}, "
            f"peak {row.get('peak_mem_gb', float('nan')):.2f} GB")
    sp = results.data["speed"]
    if "peak_mem_gb" in sp["kd"]:
        results.put("speed", "kd_over_hf_ce_peak", sp["kd"]["peak_mem_gb"] / sp["hf_ce"]["peak_mem_gb"])
        results.put("speed", "kd_over_chunked_ce_peak", sp["kd"]["peak_mem_gb"] / sp["chunked_ce"]["peak_mem_gb"])
    results.put("speed", "kd_over_kd_checkpoint_tokens_per_s",
                sp["kd"]["tokens_per_s"] / sp["kd_checkpoint"]["tokens_per_s"])
    results.put("speed", "shape", {"batch": B, "seq": T, "vocab": V, "device": str(device),
                                   "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"})


# ---------------------------------------------------------------- 4. Distilling Step-by-Step
def dss(teacher, tokenizer, args, device, results, out) -> None:
    from eval.tasks import task_accuracy
    from train.loop import train_distill

    def cqa(rationale: str) -> TaskData:
        spec = TaskDataSpec("cqa", rationale, alpha=0.5, max_len=256, min_val=2, max_train=args.cqa_max_train,
                            max_eval=args.cqa_max_eval)
        return load_task_data(spec, Path(args.data_dir), tokenizer)

    variants = {"label_only": cqa("none"), "label_rationale": cqa("palm")}
    task, test = variants["label_only"].task, variants["label_only"].test
    base = copy.deepcopy(teacher).float()
    with autocast(device):
        acc0 = task_accuracy(base, tokenizer, task, test, batch_size=128)["accuracy"]
    results.put("dss", "teacher_zero_shot_accuracy", acc0)
    log(f"dss: untuned model test accuracy {acc0:.4f} (label prompt, {len(test)} examples)")
    del base
    for name, data in variants.items():
        t = time.time()
        student = copy.deepcopy(teacher).float().requires_grad_(True).train()
        tc = TrainConfig(max_steps=args.cqa_steps, batch_size=args.cqa_batch, lr=args.cqa_lr,
                         warmup_steps=max(1, args.cqa_steps // 20), losses={"ce": 1.0}, temperature=1.0,
                         checkpoint_every=0, val_batches=2, seed=args.seed, chunk_size=4096)
        result = train_distill(student, None, data.train, data.val, tc, out / f"dss-{name}")
        with autocast(device):
            acc = task_accuracy(result["model"], tokenizer, task, test, batch_size=128)
        row = {"steps": args.cqa_steps, "batch": args.cqa_batch, "alpha": 0.5 if data.train.with_rationale else 1.0,
               "train_examples": len(data.train), "test_accuracy": acc["accuracy"], "test_n": acc["n"],
               "train_s": time.time() - t, "final_loss": result["metrics"]["final_loss"], "examples": acc["examples"]}
        results.put("dss", name, row)
        log(f"dss {name}: test accuracy {acc['accuracy']:.4f} ({acc['n']} examples, {row['train_s']:.1f}s)")
        del student, result
        cleanup(device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results = ResultsFile(out / "results.json", {"settings": {k: v for k, v in vars(args).items()}})
    import transformers

    results.put("versions", {"torch": torch.__version__, "transformers": transformers.__version__,
                             "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"})
    teacher = load_model(Path(args.teacher), dtype="fp32", device=device).requires_grad_(False)
    tokenizer = load_tokenizer(Path(args.teacher))
    text = wikitext2_text(Path(args.data_dir))
    wiki = encode(tokenizer, text[: args.wiki_chars] if args.wiki_chars else text)
    log(f"loaded teacher ({num_parameters(teacher) / 1e6:.1f}M params, {teacher.config.num_hidden_layers} layers); "
        f"WikiText-2 {wiki.numel()} tokens")
    results.put("teacher_wikitext2_ppl", wiki_ppl(teacher, wiki, args, args.max_windows))
    log(f"teacher WikiText-2 ppl {results.data['teacher_wikitext2_ppl']:.2f}")
    keep = list(range(0, teacher.config.num_hidden_layers, 2))[: args.keep]
    need_lm = any(p in args.parts for p in ("importance", "kd"))
    if need_lm:
        t = time.time()
        source = "pydoc" if args.quick else str(Path(args.data_dir) / CORPUS_FILE)
        calib_blocks = 8 if not args.quick else 2
        train, val = budget_blocks(source, tokenizer, args.tokens + calib_blocks * args.block_size, args.block_size,
                                  16 if not args.quick else 2, args.seed, docs_per_batch=256)
        calib, train = train[:calib_blocks], train[calib_blocks:]
        log(f"data: {train.shape[0]} train blocks of {args.block_size} ({train.numel()} tokens) from {source} "
            f"({time.time() - t:.1f}s)")
        results.put("data", {"source": source, "train_tokens_available": train.numel(), "block_size": args.block_size})
        if "kd" in args.parts and args.teacher_generated:
            train, row = teacher_mix(train, tokenizer, args, device)
            results.put("data", "teacher_generated", row)
            log(f"data: {row['teacher_data_samples']} teacher samples ({row['generate_or_load_s']:.1f}s, "
                f"{row['teacher_data']}) fill {row['generated_blocks']} of {row['blocks']} blocks; "
                f"{row['distinct_tokens']} distinct tokens")
        if "importance" in args.parts:
            keep = choose_layers(teacher, calib, wiki, args, device, results)
        if "kd" in args.parts:
            kd_runs(teacher, tokenizer, keep, train, val, wiki, args, device, results, out)
    if "speed" in args.parts:
        bench(teacher, keep, args, device, results)
    if "dss" in args.parts:
        dss(teacher, tokenizer, args, device, results, out)
    log(f"done; results in {results.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

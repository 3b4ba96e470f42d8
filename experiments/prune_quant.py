"""Prune and quantize measurements for BENCHMARKS.md: WikiText-2 perplexity and size on disk of
every compression variant of one or more models.

    PYTHONUNBUFFERED=1 python experiments/prune_quant.py --model DIR [DIR ...] --data-dir ../shared/data \
        --out outputs/prune_quant [--windows N] [--ft-steps 150] [--variants a,b,...] [--quick]

Protocol (the project's): WikiText-2 raw test read as lines joined with "\\n\\n", tokenized once
without BOS, non-overlapping 2048-token windows, ppl = exp(mean NLL over full windows), fp32.
Calibration: 128 segments of 2048 tokens from the corpus (documents in a seed-0 random order,
joined with EOS, cut into consecutive segments). Results are written after every variant
(results.json, results.md under --out), so a timeout loses only the variant in flight.
--quick runs everything end to end on a tiny random model on the CPU in seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.perplexity import encode, perplexity, wikitext2_text  # noqa: E402
from shrink.compress.calib_data import CalibConfig, calibration_ids  # noqa: E402
from shrink.compress.calibration import Report, compress_model  # noqa: E402
from shrink.compress.compressed_tensors_io import load_compressed, save_compressed  # noqa: E402
from shrink.compress.finetune import mask_preserving_finetune  # noqa: E402
from shrink.compress.prune_methods import PruneMethod  # noqa: E402
from shrink.compress.quant import QuantSpec  # noqa: E402
from shrink.compress.quant_methods import QuantMethod  # noqa: E402
from shrink.compress.sparsity import SparsitySpec, is_nm_sparse  # noqa: E402
from shrink.modeling import dir_size_bytes, load_tokenizer  # noqa: E402
from train.loop import TrainConfig  # noqa: E402

SKIP = ["lm_head", "*embed_tokens"]
PRUNERS = ("magnitude", "wanda", "sparsegpt")


def all_variants(group: int = 128) -> list[str]:
    """Variant names; the int4 ones carry their group size (128 does not divide every width:
    SmolLM2's hidden size 576 needs 64 or 32, or its q/k/v/o/gate/up stay unquantized)."""
    g = f"int4_g{group}"
    return (["dense"] + [f"{p}_2:4" for p in PRUNERS] + [f"{p}_2:4+ft" for p in PRUNERS]
            + ["int8_rtn", f"{g}_rtn", f"{g}_gptq", f"{g}_awq", "w8a8_smoothquant", "fp8", f"sparsegpt_2:4+{g}_gptq"])


ALL_VARIANTS = all_variants()
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def tiny_model_dir(root: Path) -> Path:
    """A tiny random Llama with a byte-level tokenizer, for --quick."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="</s>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    path = root / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class Runner:
    """Runs the variants of one model, evaluating and saving each, recording results as it goes."""

    def __init__(self, args: argparse.Namespace, model_dir: Path, label: str, results: dict) -> None:
        self.args, self.model_dir, self.label = args, model_dir, label
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
        self.out = Path(args.out) / label
        self.results = results.setdefault(label, {})
        self.tokenizer = load_tokenizer(model_dir)
        self.dense = load_compressed(model_dir, dtype=torch.float32)
        data_dir = Path(args.data_dir) if args.data_dir else None
        if data_dir is not None and (data_dir / "wikitext-2-raw").is_dir():
            self.eval_ids = encode(self.tokenizer, wikitext2_text(data_dir))
        else:  # --quick without shared data
            from train.data import pydoc_documents

            self.eval_ids = encode(self.tokenizer, "\n\n".join(pydoc_documents()[:200]))
        corpus = "corpus" if data_dir is not None and (data_dir / "corpus").is_dir() else "pydoc"
        self.calib_cfg = CalibConfig(source=corpus, num_samples=args.calib_samples, seq_len=args.calib_len,
                                     seed=0, batch_size=args.calib_batch)
        t = time.time()
        self.calib = calibration_ids(self.calib_cfg, self.tokenizer, data_dir, "calibration")
        log(f"{label}: calibration {tuple(self.calib.shape)} from {corpus} in {time.time() - t:.1f}s; "
            f"eval text {self.eval_ids.numel()} tokens")
        self.data_dir = data_dir
        self.pruned: dict[str, tuple[torch.nn.Module, dict]] = {}

    # -- helpers ---------------------------------------------------------------------------------
    def wanted(self, name: str) -> bool:
        return not self.args.variants or name in self.args.variants

    def record(self, name: str, model: torch.nn.Module, seconds: float, report: Report | None = None,
               sparsity: dict | None = None, extra: dict | None = None) -> None:
        t = time.time()
        torch.backends.cuda.matmul.allow_tf32 = False  # evaluation in true fp32
        model.to(self.device)
        ppl = perplexity(model, self.eval_ids, context=self.args.context, stride=self.args.context,
                         max_windows=self.args.windows, full_windows_only=True)
        model.cpu()
        eval_s = time.time() - t
        path = self.out / name.replace(":", "").replace("+", "_")
        save_compressed(model, path, dtype=torch.bfloat16, sparsity=sparsity, tokenizer=self.tokenizer)
        row = {"ppl": ppl.ppl, "nll": ppl.nll, "windows": ppl.windows, "tokens": ppl.tokens,
               "size_MB": dir_size_bytes(path) / 1e6, "compress_s": round(seconds, 1), "eval_s": round(eval_s, 1),
               "artifact": str(path)}
        if report is not None and report.peak_device_bytes is not None:
            row["peak_calib_MiB"] = round(report.peak_device_bytes / 2**20, 1)
        row.update(extra or {})
        self.results[name] = row
        write_results(self.args)
        log(f"{self.label} {name}: ppl {ppl.ppl:.3f} ({ppl.windows} windows) size {row['size_MB']:.1f} MB "
            f"compress {seconds:.1f}s eval {eval_s:.1f}s")

    def compress(self, base: torch.nn.Module, method) -> tuple[torch.nn.Module, Report, float]:
        torch.backends.cuda.matmul.allow_tf32 = self.args.tf32
        model = copy.deepcopy(base)
        t = time.time()
        report = compress_model(model, method, self.calib if method.needs_data else None, self.device, skip=SKIP,
                                batch_size=self.calib_cfg.batch_size, log=lambda s: None)
        return model, report, time.time() - t

    @staticmethod
    def sparsity_meta(masks: dict) -> dict:
        total = sum(m.numel() for m in masks.values())
        zeros = sum(int((~m).sum()) for m in masks.values())
        return {"structure": "2:4", "global_sparsity": zeros / total, "targets": sorted(masks)}

    # -- variants --------------------------------------------------------------------------------
    def run(self) -> None:
        group = self.args.group_size
        g = f"int4_g{group}"
        if self.wanted("dense"):
            self.record("dense", self.dense, 0.0)
        for p in PRUNERS:
            name = f"{p}_2:4"
            needed = [name, f"{name}+ft"] + ([f"sparsegpt_2:4+{g}_gptq"] if p == "sparsegpt" else [])
            if not any(self.wanted(n) for n in needed):
                continue
            model, report, secs = self.compress(self.dense, PruneMethod(p, SparsitySpec("2:4")))
            ok = all(is_nm_sparse(model.get_submodule(n).weight) for n in report.masks)
            self.pruned[p] = (model, report.masks)
            if self.wanted(name):
                self.record(name, model, secs, report, self.sparsity_meta(report.masks), {"2:4_holds": ok})
            if self.wanted(f"{name}+ft") and self.args.ft_steps > 0:
                self.finetune(p, model, report.masks)
        quant = {
            "int8_rtn": QuantMethod("rtn", QuantSpec(8, None, True)),
            f"{g}_rtn": QuantMethod("rtn", QuantSpec(4, group, True)),
            f"{g}_gptq": QuantMethod("gptq", QuantSpec(4, group, True), act_order=True),
            f"{g}_awq": QuantMethod("awq", QuantSpec(4, group, True)),
            "w8a8_smoothquant": QuantMethod("smoothquant", QuantSpec(8, None, True), alpha=self.args.alpha),
        }
        if self.device.type == "cpu" or torch.cuda.get_device_capability() >= (8, 9):
            quant["fp8"] = QuantMethod("fp8", QuantSpec(8, None, True))
        for name, method in quant.items():
            if self.wanted(name):
                model, report, secs = self.compress(self.dense, method)
                self.record(name, model, secs, report)
                if name == f"{g}_gptq":
                    self.roundtrip_check(name)
        name = f"sparsegpt_2:4+{g}_gptq"
        if self.wanted(name) and "sparsegpt" in self.pruned:
            base, masks = self.pruned["sparsegpt"]
            model, report, secs = self.compress(base, QuantMethod("gptq", QuantSpec(4, group, True), masks=masks))
            ok = all(bool((model.get_submodule(n).weight[~k] == 0).all()) for n, k in masks.items())
            self.record(name, model, secs, report, self.sparsity_meta(masks), {"zeros_kept": ok})

    def finetune(self, pruner: str, pruned: torch.nn.Module, masks: dict) -> None:
        from omegaconf import OmegaConf

        from train.data import load_packed

        torch.backends.cuda.matmul.allow_tf32 = self.args.tf32
        t = time.time()
        data_cfg = OmegaConf.create({"source": self.calib_cfg.source,
                                     "block_size": self.args.ft_seq, "val_fraction": 0.02,
                                     "max_docs": self.args.ft_docs, "seed": 0, "text_field": "text"})
        data = load_packed(data_cfg, self.tokenizer, str(self.data_dir) if self.data_dir else None)
        tc = TrainConfig(max_steps=self.args.ft_steps, batch_size=self.args.ft_batch, lr=self.args.ft_lr,
                         warmup_steps=max(1, self.args.ft_steps // 10), losses={"forward_kl": 1.0},
                         temperature=1.0, checkpoint_every=0, val_batches=2, chunk_size=1024)
        student = copy.deepcopy(pruned).to(self.device)
        teacher = copy.deepcopy(self.dense).to(self.device)
        with tempfile.TemporaryDirectory() as ckpt:
            result = mask_preserving_finetune(student, teacher, masks, data.train, data.val, tc,
                                              Path(ckpt) / "ft", log=lambda s: log(f"{self.label} {pruner}: {s}"))
        model = result["model"].cpu().float()
        del teacher, student
        ok = all(is_nm_sparse(model.get_submodule(n).weight) for n in masks)
        self.record(f"{pruner}_2:4+ft", model, time.time() - t, None, self.sparsity_meta(masks),
                    {"2:4_holds": ok, "ft_steps": tc.max_steps, "ft_tokens": tc.max_steps * tc.batch_size * self.args.ft_seq,
                     "ft_final_loss": result["metrics"].get("final_loss")})

    def roundtrip_check(self, name: str) -> None:
        """The saved artifact through transformers + compressed-tensors, against our reader."""
        path = Path(self.results[name]["artifact"])
        try:
            import compressed_tensors  # noqa: F401
            from transformers import AutoModelForCausalLM
        except ImportError:
            self.results[name]["transformers_roundtrip"] = "skipped: compressed-tensors not installed"
            return
        ids = self.eval_ids[: self.args.context].unsqueeze(0)
        with torch.no_grad():
            ours = load_compressed(path, dtype=torch.float32)(ids).logits
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits
        diff = float((ours - hf).abs().max())
        self.results[name]["transformers_roundtrip_max_abs_logit_diff"] = diff
        write_results(self.args)
        log(f"{self.label} {name}: transformers round trip max |logit diff| {diff:.2e}")


def write_results(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"settings": {k: v for k, v in vars(args).items()}, "device": device_name(),
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "results": RESULTS}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, out / "results.json")
    (out / "results.md").write_text(markdown(payload))


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def markdown(payload: dict) -> str:
    lines = [f"Device: {payload['device']}, torch {payload['torch']}, {payload['date']}", ""]
    for label, rows in payload["results"].items():
        lines += [f"### {label}", "", "| variant | WikiText-2 ppl | windows | size MB | compress s | peak calib MiB |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, r in rows.items():
            lines.append(f"| {name} | {r['ppl']:.2f} | {r['windows']} | {r['size_MB']:.1f} | {r['compress_s']} | "
                         f"{r.get('peak_calib_MiB', '')} |")
        lines.append("")
    return "\n".join(lines)


RESULTS: dict = {}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="*", default=[], help="model/artifact directories (HF layout)")
    ap.add_argument("--data-dir", default=os.environ.get("SHRINK_DATA_DIR"), help="shared data (wikitext, corpus)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--windows", type=int, default=None, help="eval windows (default: all full windows)")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=2048)
    ap.add_argument("--calib-batch", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant alpha")
    ap.add_argument("--ft-steps", type=int, default=150)
    ap.add_argument("--ft-batch", type=int, default=8)
    ap.add_argument("--ft-seq", type=int, default=1024)
    ap.add_argument("--ft-lr", type=float, default=2e-5)
    ap.add_argument("--ft-docs", type=int, default=3000, help="corpus documents read for the fine-tune data")
    ap.add_argument("--tf32", action="store_true", help="TF32 matmuls for calibration and fine-tune (eval stays fp32)")
    ap.add_argument("--variants", default="", help=f"comma list (default all): {','.join(ALL_VARIANTS)}")
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size (64 for SmolLM2's width 576)")
    ap.add_argument("--quick", action="store_true", help="tiny random model on the CPU, seconds end to end")
    args = ap.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    known = all_variants(args.group_size)
    unknown = [v for v in args.variants if v not in known]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {known}")
    if args.quick:
        args.context, args.calib_samples, args.calib_len, args.calib_batch = 128, 8, 128, 4
        args.windows = args.windows or 4
        args.ft_steps, args.ft_batch, args.ft_seq, args.ft_docs = min(args.ft_steps, 3), 2, 64, 200
        if args.data_dir and not Path(args.data_dir).is_dir():
            args.data_dir = None
    elif not args.model:
        ap.error("--model is required unless --quick")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    RESULTS.clear()
    log(f"device {device_name()}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        models = [Path(m) for m in args.model] or [tiny_model_dir(Path(tmp))]
        for i, model_dir in enumerate(models):
            label = model_dir.name if model_dir.name not in {m.name for m in models[:i]} else f"{model_dir.name}_{i}"
            Runner(args, model_dir, label, RESULTS).run()
    write_results(args)
    print(markdown({"device": device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                    "results": RESULTS}))
    return RESULTS


if __name__ == "__main__":
    main()

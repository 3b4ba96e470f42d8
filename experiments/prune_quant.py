"""Prune and quantize measurements for BENCHMARKS.md: WikiText-2 perplexity and size on disk of
every compression variant of one or more models.

    PYTHONUNBUFFERED=1 python experiments/prune_quant.py --model DIR [DIR ...] --data-dir ../shared/data \
        --out outputs/prune_quant [--windows N] [--ft-steps 150] [--variants a,b,...] [--quick]

Protocol (the project's): WikiText-2 raw test read as lines joined with "\\n\\n", tokenized once
without BOS, non-overlapping 2048-token windows, ppl = exp(mean NLL over full windows), fp32.
Calibration: 128 segments of 2048 tokens from the corpus (documents in a seed-0 random order,
joined with EOS, cut into consecutive segments). Every variant is made by the stages' typed
functions (`shrink.stages.prune.prune`, `shrink.stages.quantize.quantize`), saved as an artifact
under --out (bf16 like the stages' default), and evaluated as saved. Results are written after
every variant (results.json, results.md under --out), so a timeout loses only the variant in flight.
--quick runs everything end to end on a tiny random model on the CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.perplexity import encode, perplexity, wikitext2_text  # noqa: E402
from shrink.artifacts import Artifact  # noqa: E402
from shrink.compress.calib_data import CalibConfig  # noqa: E402
from shrink.compress.compress_artifact import CompressionSettings  # noqa: E402
from shrink.compress.compressed_tensors_io import load_compressed, sparsity_masks  # noqa: E402
from shrink.compress.quant import QuantSpec  # noqa: E402
from shrink.compress.recipe import pruning_method, quantization_recipe  # noqa: E402
from shrink.compress.sparsity import SparsitySpec, is_nm_sparse  # noqa: E402
from shrink.modeling import dir_size_bytes, load_tokenizer  # noqa: E402
from shrink.stages.prune import Finetune, prune  # noqa: E402
from shrink.stages.quantize import quantize  # noqa: E402
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
    """Makes the variants of one model through the stages' typed functions, evaluating each saved
    artifact, recording results as it goes."""

    def __init__(self, args: argparse.Namespace, model_dir: Path, label: str, results: dict) -> None:
        self.args, self.label = args, label
        self.source = Artifact(path=model_dir)  # any HF directory; an artifact's shrink.json is optional here
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
        self.out = Path(args.out) / label
        self.results = results.setdefault(label, {})
        self.tokenizer = load_tokenizer(model_dir)
        data_dir = Path(args.data_dir) if args.data_dir else None
        if data_dir is not None and (data_dir / "wikitext-2-raw").is_dir():
            self.eval_ids = encode(self.tokenizer, wikitext2_text(data_dir))
        else:  # --quick without shared data
            from train.data import pydoc_documents

            self.eval_ids = encode(self.tokenizer, "\n\n".join(pydoc_documents()[:200]))
        corpus = "corpus" if data_dir is not None and (data_dir / "corpus").is_dir() else "pydoc"
        self.calib_cfg = CalibConfig(source=corpus, num_samples=args.calib_samples, seq_len=args.calib_len,
                                     seed=0, batch_size=args.calib_batch)
        log(f"{label}: calibration {args.calib_samples} x {args.calib_len} from {corpus}; "
            f"eval text {self.eval_ids.numel()} tokens")
        self.data_dir = data_dir
        self.pruned: dict[str, Artifact] = {}

    # -- helpers ---------------------------------------------------------------------------------
    def wanted(self, name: str) -> bool:
        return not self.args.variants or name in self.args.variants

    def dest(self, name: str) -> Path:
        return self.out / name.replace(":", "").replace("+", "_")

    def settings(self, recipe: list) -> CompressionSettings:
        torch.backends.cuda.matmul.allow_tf32 = self.args.tf32
        return CompressionSettings(recipe=recipe, calibration=self.calib_cfg, save_dtype=torch.bfloat16)

    def record(self, name: str, artifact: Artifact, seconds: float, extra: dict | None = None) -> None:
        t = time.time()
        torch.backends.cuda.matmul.allow_tf32 = False  # evaluation in true fp32
        model = load_compressed(artifact.path, dtype=torch.float32).to(self.device)
        ppl = perplexity(model, self.eval_ids, context=self.args.context, stride=self.args.context,
                         max_windows=self.args.windows, full_windows_only=True)
        del model
        eval_s = time.time() - t
        row = {"ppl": ppl.ppl, "nll": ppl.nll, "windows": ppl.windows, "tokens": ppl.tokens,
               "size_MB": dir_size_bytes(artifact.path) / 1e6, "compress_s": round(seconds, 1),
               "eval_s": round(eval_s, 1), "artifact": str(artifact.path)}
        if artifact.metrics.get("peak_device_MiB") is not None:
            row["peak_calib_MiB"] = round(artifact.metrics["peak_device_MiB"], 1)
        row.update(extra or {})
        self.results[name] = row
        write_results(self.args)
        log(f"{self.label} {name}: ppl {ppl.ppl:.3f} ({ppl.windows} windows) size {row['size_MB']:.1f} MB "
            f"compress {seconds:.1f}s eval {eval_s:.1f}s")

    @staticmethod
    def two_four_holds(artifact: Artifact) -> bool:
        model = load_compressed(artifact.path)
        masks, structure = sparsity_masks(model, artifact.path)
        return structure == "2:4" and bool(masks) and all(is_nm_sparse(model.get_submodule(n).weight) for n in masks)

    # -- variants --------------------------------------------------------------------------------
    def run(self) -> None:
        group = self.args.group_size
        g = f"int4_g{group}"
        if self.wanted("dense"):
            self.record("dense", self.source, 0.0)
        for p in PRUNERS:
            name = f"{p}_2:4"
            needed = [name] + ([f"sparsegpt_2:4+{g}_gptq"] if p == "sparsegpt" else [])
            if any(self.wanted(n) for n in needed):
                t = time.time()
                art = prune(self.source, self.settings([pruning_method(p, {}, SparsitySpec("2:4"))]),
                            dest=self.dest(name), device=self.device, data_dir=self.data_dir)
                self.pruned[p] = art
                self.record(name, art, time.time() - t, {"2:4_holds": self.two_four_holds(art)})
            if self.wanted(f"{name}+ft") and self.args.ft_steps > 0:
                self.finetune(p)
        int4 = QuantSpec(4, group, True)
        w8 = QuantSpec(8, None, True)
        quant = {"int8_rtn": (["rtn"], w8), f"{g}_rtn": (["rtn"], int4), f"{g}_gptq": (["gptq"], int4),
                 f"{g}_awq": (["awq", "rtn"], int4), "w8a8_smoothquant": (["smoothquant", "rtn"], w8)}
        if self.device.type == "cpu" or torch.cuda.get_device_capability() >= (8, 9):
            quant["fp8"] = (["fp8"], w8)
        options = {"smoothquant": {"alpha": self.args.alpha}, "gptq": {"act_order": True}}
        for name, (names, scheme) in quant.items():
            if self.wanted(name):
                t = time.time()
                art = quantize(self.source, self.settings(quantization_recipe(names, options, scheme)),
                               dest=self.dest(name), device=self.device, data_dir=self.data_dir)
                self.record(name, art, time.time() - t)
                if name == f"{g}_gptq":
                    self.roundtrip_check(name)
        name = f"sparsegpt_2:4+{g}_gptq"
        if self.wanted(name) and "sparsegpt" in self.pruned:
            t = time.time()
            art = quantize(self.pruned["sparsegpt"], self.settings(quantization_recipe(["gptq"], options, int4)),
                           dest=self.dest(name), device=self.device, data_dir=self.data_dir)
            self.record(name, art, time.time() - t, {"zeros_kept": self.zeros_kept(self.pruned["sparsegpt"], art)})

    @staticmethod
    def zeros_kept(pruned: Artifact, quantized: Artifact) -> bool:
        before = load_compressed(pruned.path)
        masks, _ = sparsity_masks(before, pruned.path)
        after = load_compressed(quantized.path)
        return bool(masks) and all(bool((after.get_submodule(n).weight[~k] == 0).all()) for n, k in masks.items())

    def finetune(self, pruner: str) -> None:
        from omegaconf import OmegaConf

        t = time.time()
        data_cfg = OmegaConf.create({"source": self.calib_cfg.source,
                                     "block_size": self.args.ft_seq, "val_fraction": 0.02,
                                     "max_docs": self.args.ft_docs, "seed": 0, "text_field": "text"})
        tc = TrainConfig(max_steps=self.args.ft_steps, batch_size=self.args.ft_batch, lr=self.args.ft_lr,
                         warmup_steps=max(1, self.args.ft_steps // 10), losses={"forward_kl": 1.0},
                         temperature=1.0, checkpoint_every=0, val_batches=2, chunk_size=1024)
        name = f"{pruner}_2:4+ft"
        with tempfile.TemporaryDirectory() as ckpt:
            art = prune(self.source, self.settings([pruning_method(pruner, {}, SparsitySpec("2:4"))]),
                        dest=self.dest(name), device=self.device, data_dir=self.data_dir,
                        finetune=Finetune(tc, data_cfg, Path(ckpt) / "ft"))
        ft = art.metrics.get("finetune", {})
        self.record(name, art, time.time() - t,
                    {"2:4_holds": self.two_four_holds(art), "ft_steps": tc.max_steps,
                     "ft_tokens": tc.max_steps * tc.batch_size * self.args.ft_seq, "ft_final_loss": ft.get("final_loss")})

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

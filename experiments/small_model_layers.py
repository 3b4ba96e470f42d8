"""Batch-1 decode tok/s of SmolLM2-shaped models with few layers under engine option variants (one timed run each, as engine_bench decode times)."""
import json, os, sys, tempfile, time, traceback
import torch
from transformers import LlamaConfig
sys.path.insert(0, os.getcwd())
from eval.bench import common as eb, decode as eb_decode

out = []
def shape(layers):
    p = os.path.join(tempfile.gettempdir(), f"smol-{layers}")
    os.makedirs(p, exist_ok=True)
    cfg = LlamaConfig(**{**eb.SHAPES["smollm2-135m"], "num_hidden_layers": layers}, bos_token_id=1, eos_token_id=2)
    cfg.architectures = ["LlamaForCausalLM"]; cfg.save_pretrained(p); return p

variants = {"default": {}, "steps1": {"num_decode_steps": 1}, "nopdl": {"pdl": False}, "nofused": {"fused_decode": False},
            "noprefillgraph": {"prefill_graph_max_tokens": 0}, "eager": {"enforce_eager": True}}
for layers in [int(x) for x in os.environ.get("LAYERS", "1 2 3 4 8").split()]:
    for name, kw in variants.items():
        if layers not in (2, 4) and name not in ("default",):
            continue
        try:
            r = eb_decode.engine_decode(shape(layers), True, [1, 4], 256, 16, **kw)
            rec = {"layers": layers, "variant": name, "tok_s": r}
        except Exception as e:
            rec = {"layers": layers, "variant": name, "error": repr(e)[:300]}
        print(json.dumps(rec), flush=True); out.append(rec)
open(os.path.join(os.environ.get("OUT", "."), "small_layers.json"), "w").write(json.dumps(out, indent=1))

"""Per-step wall times (synchronised) of batch-1 decode on few-layer SmolLM2 shapes, to find the slow step."""
import json, os, sys, tempfile, time
import torch
from transformers import LlamaConfig
sys.path.insert(0, os.getcwd())
from eval.bench import common as eb, decode as eb_decode
from engine import LLM, SamplingParams

def shape(layers):
    p = os.path.join(tempfile.gettempdir(), f"smol-{layers}")
    os.makedirs(p, exist_ok=True)
    cfg = LlamaConfig(**{**eb.SHAPES["smollm2-135m"], "num_hidden_layers": layers}, bos_token_id=1, eos_token_id=2)
    cfg.architectures = ["LlamaForCausalLM"]; cfg.save_pretrained(p); return p

res = []
for layers in (4, 2, 30):
    for kw in ({}, {"prefill_graph_max_tokens": 0}):
        llm = LLM(shape(layers), load_format="dummy", max_num_seqs=4, cuda_graph_max_bs=4, max_model_len=300,
                  enable_prefix_caching=False, num_kv_blocks=64, **kw)
        eng = llm.engine
        orig = eng.step
        times = []
        def timed_step():
            torch.cuda.synchronize(); t = time.perf_counter(); r = orig(); torch.cuda.synchronize()
            b = eng.num_steps
            times.append(round((time.perf_counter() - t) * 1e3, 3)); return r
        eng.step = timed_step
        for rep in range(4):
            times.clear()
            prompts = eb.prompts(1, 16, eng.vocab_size, rep)
            t = time.perf_counter(); llm.generate(prompts, SamplingParams(temperature=0, max_tokens=256 if rep else 8, ignore_eos=True)); torch.cuda.synchronize()
            dt = time.perf_counter() - t
            rec = {"layers": layers, "kw": kw, "rep": rep, "total_ms": round(dt * 1e3, 2), "steps": len(times),
                   "top": sorted(times, reverse=True)[:5], "first": times[:3]}
            print(json.dumps(rec), flush=True); res.append(rec)
        del llm, eng, timed_step, orig; import gc; gc.collect(); torch.cuda.empty_cache()
open(os.path.join(os.environ.get("OUT", "."), "step_times.json"), "w").write(json.dumps(res, indent=1))

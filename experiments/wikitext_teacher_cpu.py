"""Teacher perplexity on WikiText-2 (reference protocol, 2048-token non-overlapping full windows) on the CPU; MAXW=N limits the windows."""
import json, sys, time, torch
from pathlib import Path
from common.paths import default_cache_dir, default_data_dir
from shrink.sources import load_source
from eval.perplexity import perplexity, wikitext2_text, encode
torch.set_num_threads(1)
model, tok = load_source('embedded:smollm2-135m-instruct', default_cache_dir())
model.eval()
ids = encode(tok, wikitext2_text(default_data_dir()))
t = time.time()
import os
mw = int(os.environ.get('MAXW', '0')) or None
r = perplexity(model, ids, context=2048, stride=2048, full_windows_only=True, max_windows=mw)
print(json.dumps({"model": "SmolLM2-135M-Instruct (GGUF, fp32)", "device": "cpu", "tokens_total": int(ids.numel()),
                  "context": 2048, "stride": 2048, "full_windows_only": True, "max_windows": mw, **r.as_dict(),
                  "wall_s": round(time.time() - t, 1)}), flush=True)

"""What the harness measures through transformers for one model: perplexity on each dataset
(cached by the artifact's content hash between runs), agreement with the teacher, and the
`generate` baseline. The model is loaded once, and only when something needs it."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Callable

import torch

from eval.agreement import Reference, agreement, fixed_windows, teacher_reference
from eval.perplexity import WindowProtocol, perplexity
from eval.settings import HarnessSettings
from eval.speed import hf_compiles, hf_generate_speed


class TransformersMeasurements:
    def __init__(self, harness: HarnessSettings, texts: dict[str, torch.Tensor],
                 protocols: dict[str, WindowProtocol], run_key: dict[str, Any], cache: dict[str, Any]) -> None:
        """``protocols``: each dataset's windows; ``run_key``: what else changes a perplexity (dtype,
        device); ``cache``: perplexity results by content hash and settings, kept by the caller."""
        self.harness, self.texts, self.protocols, self.run_key, self.cache = harness, texts, protocols, run_key, cache
        self.reference: Reference | None = None  # the teacher's, once measured
        # The teacher's loader when its row came whole from the cache (a resumed eval): the
        # agreement reference of the rows still to measure is taken from it when first needed.
        self.teacher_load: Callable[[], torch.nn.Module] | None = None

    def measure(self, name: str, content_hash: str, load: Callable[[], torch.nn.Module],
                is_teacher: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """(row fields, details). The teacher must come first: agreement needs its reference."""
        model: torch.nn.Module | None = None

        def loaded() -> torch.nn.Module:
            nonlocal model
            if model is None:
                model = load()
            return model

        row: dict[str, Any] = {}
        details: dict[str, Any] = {}
        for dataset, ids in self.texts.items():
            protocol = self.protocols[dataset].as_dict()
            key = hashlib.sha256(json.dumps([content_hash, dataset, protocol, self.run_key, int(ids.numel())])
                                 .encode()).hexdigest()
            if key not in self.cache:
                self.cache[key] = perplexity(loaded(), ids, **protocol).as_dict()
                print(f"eval: {name} {dataset} ppl {self.cache[key]['ppl']:.3f} ({self.cache[key]['tokens']} tokens, "
                      f"{self.cache[key]['windows']} windows)")
            row[f"ppl_{dataset}"] = self.cache[key]["ppl"]
            details[f"ppl_{dataset}"] = {**self.cache[key], "protocol": protocol}
        ag = self.harness.agreement
        if ag.enabled:
            text = self.texts.get("heldout", next(iter(self.texts.values())))
            if is_teacher:
                self.reference = teacher_reference(loaded(), fixed_windows(text, ag.windows, ag.window_len))
            elif self.reference is None and self.teacher_load is not None:
                teacher = self.teacher_load()
                self.reference = teacher_reference(teacher, fixed_windows(text, ag.windows, ag.window_len))
                del teacher
            if self.reference is not None:
                row.update(agreement(loaded(), self.reference))
        sp = self.harness.speed
        if sp.enabled and sp.hf_baseline:
            compiled = hf_compiles(sp.hf_compile, next(loaded().parameters()).device.type, is_teacher)
            start = time.perf_counter()
            try:
                records = hf_generate_speed(loaded(), sp.batch_sizes, sp.prompt_len, sp.new_tokens, compiled)
                print(f"eval:   transformers generate baseline ({'compiled' if compiled else 'eager'}) "
                      f"[{time.perf_counter() - start:.1f} s]")
            except Exception as e:  # transformers cannot generate with this model: say so, go on
                row["hf_error"] = f"{type(e).__name__}: {e}"
                print(f"eval: transformers generate baseline of {name} failed: {row['hf_error']}")
                records = []
            details["hf_generate_speed"] = records
            for r in records:
                row[f"hf_decode_tok_s_b{r['batch']}"] = r["decode_tok_s"]
            if records:
                row["hf_generate"] = f"{records[0]['cache']} cache, {'compiled' if records[0]['compiled'] else 'eager'}"
        return row, details

"""On-policy distillation (GKD, Agarwal et al. 2024) and sequence-level KD (Kim & Rush 2016).

Each step draws its sequences from one of three sources, decided by a generator seeded with
(seed, step) so that a resumed run makes the same choices and the same samples:
  - `student`  with probability lambda: the prompts (first `prompt_len` tokens of the data's
               blocks) are continued by the current student, and the teacher scores those tokens;
  - `teacher`  otherwise, if sequence-level KD is on: the teacher writes the continuations;
  - `data`     otherwise: the data as it is.
Only the generated tokens count (the prompt and anything after the first EOS are masked). On
student samples the hard-label terms (CE) are skipped: they would teach the student its own text.
Who writes the continuations is a ContinuationSampler: transformers' `generate` by default, our
engine in the distill stage (shrink/engine_sampler.py; train/ never imports the engine).
"""

from __future__ import annotations

from typing import Protocol

import torch

from train.batches import Batch
from train.modules import causal_lm

SOURCES = ("data", "student", "teacher")


def step_source(seed: int, step: int, lmbda: float, seq_kd: bool) -> str:
    if lmbda <= 0 and not seq_kd:
        return "data"
    u = torch.rand((), generator=torch.Generator().manual_seed(seed * 7_919 + step * 104_729 + 17)).item()
    if u < lmbda:
        return "student"
    return "teacher" if seq_kd else "data"


class ContinuationSampler(Protocol):
    """Continues prompts [B, P] by `model` as it is now: the sequences [B, P + n], n the longest
    continuation (<= `max_new_tokens`), a row ended by `eos_id` padded with it (EOS never comes
    first). Temperature 0 is greedy; above, plain sampling (no top-k / top-p), the same draws for
    the same `seed`. The default is transformers' `generate` (`generate_sequences`); the distill
    stage passes the engine's (shrink/engine_sampler.py)."""

    def __call__(self, model: torch.nn.Module, prompts: torch.Tensor, max_new_tokens: int, temperature: float,
                 eos_id: int | None, seed: int) -> torch.Tensor: ...


@torch.no_grad()
def generate_sequences(model: torch.nn.Module, prompts: torch.Tensor, max_new_tokens: int, temperature: float,
                       eos_id: int | None, seed: int) -> torch.Tensor:
    """The ContinuationSampler of transformers' `generate`, seeded by `seed` (the caller's RNG kept)."""
    lm = causal_lm(model)
    was_training = lm.training
    lm.eval()
    devices = [prompts.device] if prompts.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        sampling = dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0) if temperature > 0 \
            else dict(do_sample=False)
        out = lm.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=max_new_tokens,
                          min_new_tokens=1, pad_token_id=eos_id, eos_token_id=eos_id, use_cache=True, **sampling)
    lm.train(was_training)
    return out


def sample_continuations(model: torch.nn.Module, prompts: torch.Tensor, max_new_tokens: int, temperature: float,
                         eos_id: int | None, seed: int, sampler: ContinuationSampler = generate_sequences) -> Batch:
    """Continue `prompts` [B, P] by `model` through `sampler`; labels mask the prompt and everything
    after EOS."""
    seqs = sampler(model, prompts, max_new_tokens, temperature, eos_id, seed)
    return continuation_batch(seqs.to(prompts.device), prompts.shape[1], eos_id)


def continuation_batch(seqs: torch.Tensor, prompt_len: int, eos_id: int | None) -> Batch:
    labels = seqs[:, 1:].clone()
    labels[:, : prompt_len - 1] = -100
    if eos_id is not None:
        gen = seqs[:, prompt_len:]
        is_eos = (gen == eos_id).int()
        after_eos = (is_eos.cumsum(1) - is_eos) > 0  # strictly after the first EOS
        labels[:, prompt_len - 1:][after_eos] = -100
    return Batch(seqs, labels, None, [("lm", slice(0, seqs.shape[0]), 1.0)])

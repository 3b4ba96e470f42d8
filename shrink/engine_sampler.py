"""On-policy (GKD) and sequence-level KD sampling through our engine: a train.onpolicy.ContinuationSampler
that continues the prompts of a training step with `engine.LLM` instead of transformers' `generate`.

One engine is built per sampled model at the start of training, sized for one step's batch (its KV
cache holds batch x (prompt + new tokens), never "free GPU memory": training shares the GPU). The
student's engine starts from its config alone (random weights) and, before every sampling step,
takes the live student's current weights in place (`LLM.update_weights`: mapped and verified as a
checkpoint is; CUDA graphs stay valid); a LoRA student gives its merged weights. The teacher's
engine loads the frozen teacher once. The engine runs bf16 on a GPU and fp32 on the CPU.

Every row samples with its own seed, derived from the step's seed and the row, so a resumed run
draws the same continuations."""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from common.errors import SettingError, ShrinkError
from train.modules import causal_lm

SAMPLERS = ("auto", "engine", "transformers")


def check_sampler(value: Any) -> str:
    """The `sampler` setting (auto | engine | transformers), or a SettingError naming it."""
    if value not in SAMPLERS:
        raise SettingError("sampler", f"{value!r}: expected one of {', '.join(SAMPLERS)}", sep="=")
    return value


def resolve_sampler(value: str, device: torch.device) -> str:
    """`auto`: the engine on a GPU; transformers' generate on the CPU, where the engine runs its
    plain-torch reference attention and measured 0.6x generate's speed (batch 8, 64 new tokens)."""
    if value != "auto":
        return value
    return "engine" if device.type == "cuda" else "transformers"


def row_seed(seed: int, row: int) -> int:
    """The sampling seed of one row of a step whose seed is `seed` (fits a torch.Generator)."""
    return (seed * 1_000_003 + row) % 2**63


def live_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The Hugging Face-named weights of a (DDP- or peft-wrapped) causal LM as they are now; a LoRA
    layer's base weight with its active adapters' deltas added (the weights `merge_lora` would save)."""
    lm = causal_lm(model)
    deltas: dict[str, torch.Tensor] = {}
    for name, module in lm.named_modules():
        adapters = getattr(module, "active_adapters", None)
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer") and adapters:
            deltas[f"{name}.base_layer.weight"] = sum(module.get_delta_weight(a) for a in adapters
                                                      if a in module.lora_A)
    for name, param in lm.named_parameters():
        if ".lora_" in name:
            continue
        tensor = param.detach()
        if name in deltas:
            tensor = tensor + deltas[name].to(tensor.dtype)
        yield name.replace(".base_layer.", "."), tensor


class EngineSampler:
    """Continues prompts [B, P] with an engine.LLM; `live`: push the sampled model's weights first.
    Build it with `for_student` or `for_teacher`."""

    def __init__(self, llm: Any, batch_size: int, prompt_len: int, max_new_tokens: int, live: bool) -> None:
        self.llm, self.live = llm, live
        self.batch_size, self.prompt_len, self.max_new_tokens = batch_size, prompt_len, max_new_tokens

    @staticmethod
    def engine_options(batch_size: int, prompt_len: int, max_new_tokens: int, device: torch.device) -> dict:
        max_len = prompt_len + max_new_tokens
        block_size = 16
        return dict(device=device.type, dtype="auto", max_model_len=max_len, max_num_seqs=batch_size,
                    block_size=block_size, num_kv_blocks=batch_size * math.ceil(max_len / block_size),
                    enable_prefix_caching=False)

    @classmethod
    def for_student(cls, student: torch.nn.Module, work_dir: Path, batch_size: int, prompt_len: int,
                    max_new_tokens: int, device: torch.device) -> "EngineSampler":
        """An engine of the student's architecture (its config written to a scratch directory under
        `work_dir`, removed once read), holding the student's weights from the first call on."""
        from engine import LLM

        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".engine_student-", dir=work_dir))
        try:
            lm = causal_lm(student)
            config = copy.deepcopy(lm.config)
            config.architectures = [type(lm).__name__]  # what the engine builds (from_config leaves it unset)
            config.save_pretrained(scratch)
            llm = LLM(str(scratch), load_format="dummy",
                      **cls.engine_options(batch_size, prompt_len, max_new_tokens, device))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        sampler = cls(llm, batch_size, prompt_len, max_new_tokens, live=True)
        llm.update_weights(live_parameters(student))  # a mismatch fails here, before training starts
        return sampler

    @classmethod
    def for_teacher(cls, teacher_path: Path, batch_size: int, prompt_len: int, max_new_tokens: int,
                    device: torch.device) -> "EngineSampler":
        """An engine of the frozen teacher, loaded once from its directory."""
        from engine import LLM

        llm = LLM(str(teacher_path), **cls.engine_options(batch_size, prompt_len, max_new_tokens, device))
        return cls(llm, batch_size, prompt_len, max_new_tokens, live=False)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, prompts: torch.Tensor, max_new_tokens: int, temperature: float,
                 eos_id: int | None, seed: int) -> torch.Tensor:
        from engine import SamplingParams

        rows, prompt_len = prompts.shape
        if rows > self.batch_size or prompt_len > self.prompt_len or max_new_tokens > self.max_new_tokens:
            raise ShrinkError(f"engine sampler: built for {self.batch_size} prompts of {self.prompt_len} tokens + "
                              f"{self.max_new_tokens} new, asked for {rows} of {prompt_len} + {max_new_tokens}")
        if self.live:
            self.llm.update_weights(live_parameters(model))
        # EOS as transformers' generate is told it: `eos_id` alone ends a row (not the engine's own
        # EOS ids), and never as the first token.
        params = [SamplingParams(temperature=float(temperature), top_p=1.0, top_k=0, max_tokens=max_new_tokens,
                                 min_tokens=1, seed=row_seed(seed, i), ignore_eos=True,
                                 stop_token_ids=[eos_id] if eos_id is not None else [])
                  for i in range(rows)]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts.tolist()], params)
        failed = [o.error for o in outputs if o.error]
        if failed:
            raise ShrinkError(f"engine sampler: the engine refused {len(failed)} prompts, e.g.: {failed[0]}")
        n = max(len(o.token_ids) for o in outputs)
        seqs = torch.full((rows, prompt_len + n), eos_id if eos_id is not None else 0, dtype=prompts.dtype)
        seqs[:, :prompt_len] = prompts.cpu()
        for i, o in enumerate(outputs):
            seqs[i, prompt_len : prompt_len + len(o.token_ids)] = torch.tensor(o.token_ids, dtype=prompts.dtype)
        return seqs.to(prompts.device)

    def close(self) -> None:
        self.llm.close()


def engine_samplers(student: torch.nn.Module, teacher_path: Path, batch_size: int, prompt_len: int,
                    max_new_tokens: int, on_policy: bool, seq_kd: bool, work_dir: Path,
                    device: torch.device) -> dict[str, EngineSampler]:
    """train_distill's `student_sampler` (on-policy) and `teacher_sampler` (sequence-level KD) keyword
    arguments: the engines the configured sampling needs."""
    samplers: dict[str, EngineSampler] = {}
    try:
        if on_policy:
            samplers["student_sampler"] = EngineSampler.for_student(student, work_dir, batch_size, prompt_len,
                                                                    max_new_tokens, device)
        if seq_kd:
            samplers["teacher_sampler"] = EngineSampler.for_teacher(teacher_path, batch_size, prompt_len,
                                                                    max_new_tokens, device)
    except NotImplementedError as e:  # an architecture the engine does not run
        for sampler in samplers.values():
            sampler.close()
        raise SettingError("sampler", f"engine: {e}; sample with transformers' generate instead "
                                      "(sampler=transformers)", sep="=") from None
    return samplers

"""The distillation training loop, on accelerate.

The batch of step s is a pure function of (seed, s): examples are visited in a seeded permutation
per epoch (each data-parallel rank takes its own slice), and on-policy choices and samples are
seeded by (seed, step). With the model, optimizer, scheduler and RNG restored from a checkpoint,
a resumed run therefore sees exactly the batches and updates an uninterrupted run would.
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from tqdm.auto import tqdm

from common.errors import SettingError, ShrinkError
from train.batches import Batch, TrainData, as_train_data
from train.causal_attention import unmasked_causal
from train.checkpoint import checkpoint_step, load_checkpoint, remove_checkpoint, save_checkpoint
from train.chunked_loss import LossTerm, chunked_distill_terms
from train.compiled_layers import LayerCompiler, use_compile_model
from train.config import TrainConfig
from train.distributed import (describe, gathered_head, gathered_model, is_sharded, make_accelerator, reduce_mean,
                               shard_frozen)
from train.frozen_casts import FrozenCasts, autocast_dtype
from train.layer_distill import LayerPair, LayerProjector, capture_layers, layer_loss
from train.losses import parse_loss_spec
from train.modules import causal_lm
from train.onpolicy import ContinuationSampler, generate_sequences, sample_continuations, step_source

__all__ = ["TrainConfig", "FakeQuant", "train_distill", "make_terms", "validation_loss", "batch_indices",
           "distill_batch_loss", "batch_loss"]

LOG_FILE = "train_log.jsonl"


def batch_indices(step: int, n_blocks: int, batch_size: int, seed: int) -> torch.Tensor:
    """The example indices of global micro-batch `step`: positions in a seeded permutation per epoch."""
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n_blocks)
        out.append(_epoch_permutation(seed, epoch, n_blocks)[offset])
    return torch.stack(out)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n_blocks: int) -> torch.Tensor:
    return torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def forward_hidden(model: torch.nn.Module, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states (after the last norm), before the LM head.

    A data-parallel model (DDP, which exposes `.module`; FSDP2, which shards the module in place) must
    run its own forward: DDP arms its gradient all-reduce there and FSDP2 gathers the embedding's and
    LM head's shards in the root's forward, so calling the inner decoder would train every rank alone
    (DDP) or meet sharded weights (FSDP2). Such a model runs whole with `logits_to_keep=1` (one token's
    logits per row, the chunked loss computes the rest) and a hook takes the decoder's output; FSDP2
    keeps the LM head gathered after the forward (accelerate does not reshard that unit), which is
    what the chunked loss reads. An unpadded batch runs without transformers' mask preparation, which
    reads the device in every forward (train/causal_attention.py)."""
    decoder = causal_lm(model).model
    with unmasked_causal(decoder.config, attention_mask):
        if getattr(model, "module", None) is None and not is_sharded(model):
            return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        captured: list[torch.Tensor] = []
        handle = decoder.register_forward_hook(lambda _m, _i, out: captured.append(out.last_hidden_state))
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)
        finally:
            handle.remove()
        return captured[0]


def make_terms(tc: TrainConfig) -> list[LossTerm]:
    return [LossTerm(key, w, fn) for key, w, fn in parse_loss_spec(tc.losses, tc.temperature)]


def _layer_pairs(tc: TrainConfig) -> list[LayerPair]:
    if not tc.layer_map or not tc.layer_weight:
        return []
    return [p if isinstance(p, LayerPair) else LayerPair(*p) for p in tc.layer_map]


def distill_batch_loss(student, teacher, batch: Batch | torch.Tensor, terms: list[LossTerm], chunk_size: int,
                       **kwargs: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted loss of one batch and its parts read back to the host; see batch_loss."""
    total, parts = batch_loss(student, teacher, batch, terms, chunk_size, **kwargs)
    return total, host_values(parts)


def host_values(parts: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Loss parts as floats, the device's read back in one copy (one sync instead of one per part)."""
    on_device = [k for k, v in parts.items() if isinstance(v, torch.Tensor)]
    values = torch.stack([parts[k].detach().float() for k in on_device]).tolist() if on_device else []
    return {**parts, **dict(zip(on_device, values))}


def batch_loss(student, teacher, batch: Batch | torch.Tensor, terms: list[LossTerm], chunk_size: int,
               top_k: int | None = None, pairs: list[LayerPair] | None = None,
               projector: LayerProjector | None = None, layer_kind: str = "cosine",
               layer_weight: float = 0.0, fused_head_loss: bool = True,
               compile_loss: bool | str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """The weighted loss of one batch: logit terms per row group (+ the intermediate-layer term), its
    parts as 0-d device tensors (the training step reads them back once, after its update is queued).
    `fused_head_loss` / `compile_loss`: see chunked_distill_terms."""
    if isinstance(batch, torch.Tensor):
        batch = as_train_data(batch).collate(torch.arange(batch.shape[0]))
    pairs = pairs or []
    s_layers = [p.student for p in pairs]
    t_layers = [p.teacher for p in pairs]
    with capture_layers(student, s_layers) as s_states:
        s_hidden = forward_hidden(student, batch.input_ids, batch.attention_mask)[:, :-1]
    t_hidden, t_head, t_states = None, None, {}
    if teacher is not None:
        with torch.no_grad(), capture_layers(teacher, t_layers) as t_states:
            t_hidden = forward_hidden(teacher, batch.input_ids, batch.attention_mask)[:, :-1]
        t_head = gathered_head(causal_lm(teacher).lm_head)
    s_head = gathered_head(causal_lm(student).lm_head)
    total, parts = None, {}
    for name, rows, weight in batch.groups:
        loss, means = chunked_distill_terms(s_hidden[rows], s_head, t_hidden[rows] if t_hidden is not None
                                            else None, t_head, batch.labels[rows], terms, chunk_size, top_k,
                                            fused_head_loss, compile_loss, n_tokens=batch.counted_tokens(rows))
        total = loss * weight if total is None else total + loss * weight
        tag = "" if len(batch.groups) == 1 else f"{name}_"
        parts.update({f"{tag}{t.name}": m for t, m in zip(terms, means)})
    if pairs and layer_weight:
        mask = batch.attention_mask.bool() if batch.attention_mask is not None else None
        lloss, lval = layer_loss(s_states, t_states, pairs, projector, layer_kind, mask)
        total = total + layer_weight * lloss
        parts["layers"] = lval
    parts["total"] = total.detach()
    return total, parts


def _loss_kwargs(tc: TrainConfig, projector) -> dict:
    return dict(top_k=tc.top_k, pairs=_layer_pairs(tc), projector=projector, layer_kind=tc.layer_loss,
                layer_weight=tc.layer_weight, fused_head_loss=tc.fused_head_loss, compile_loss=tc.compile_loss)


@torch.no_grad()
def validation_loss(student, teacher, val, terms, tc: TrainConfig, device, projector=None) -> dict[str, float]:
    data = as_train_data(val)
    student.eval()
    totals: dict[str, float] = {}
    n = min(tc.val_batches, math.ceil(len(data) / tc.batch_size))
    for i in range(n):
        idx = torch.arange(i * tc.batch_size, min((i + 1) * tc.batch_size, len(data)))
        _, parts = distill_batch_loss(student, teacher, data.collate(idx).to(device), terms, tc.chunk_size,
                                      **_loss_kwargs(tc, projector))
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + v / n
    student.train()
    return {f"val_{k}": v for k, v in totals.items()}


def _step_batch(data: TrainData, step_micro: int, tc: TrainConfig, accelerator, student, teacher, eos_id,
                source: str, samplers: dict[str, ContinuationSampler]) -> tuple[Batch, bool]:
    """The micro-batch of this rank, after on-policy / seq-KD generation. Returns (batch, use_ce)."""
    global_micro = step_micro * accelerator.num_processes + accelerator.process_index
    idx = batch_indices(global_micro, len(data), tc.batch_size, tc.seed)
    batch = data.collate(idx).to(accelerator.device)
    if source == "data":
        return batch, True
    if batch.attention_mask is not None:
        raise SettingError("lmbda" if tc.lmbda > 0 else "seq_kd", "needs packed LM data (prompts are block prefixes)",
                           sep=" ")
    prompts = batch.input_ids[:, : tc.prompt_len]
    model = student if source == "student" else teacher
    gen_seed = tc.seed * 1_000_003 + global_micro
    return sample_continuations(model, prompts, tc.max_new_tokens, tc.gen_temperature, eos_id, gen_seed,
                                samplers[source]), source == "teacher"


def _wrap_lora(student: torch.nn.Module, lora: Any) -> torch.nn.Module:
    from train.lora import apply_lora

    return apply_lora(student, lora)


class FakeQuant(Protocol):
    """Quantization-aware training as the loop drives it (`tc.qat`). The quantize stage's grid lives above
    train, so a stage hands the loop one: shrink/compress/fake_quant.py's FakeQuantizer."""

    def start_step(self, max_steps: int) -> int: ...   # the first optimizer step trained fake-quantized
    def prepare(self, model: torch.nn.Module) -> str: ...   # choose the linears (before any work); a log line
    def attach(self, model: torch.nn.Module) -> None: ...   # from now on the forward sees them on the grid
    def snap(self, model: torch.nn.Module) -> dict: ...   # weights onto the grid, plain linears again; the record


def train_distill(student: torch.nn.Module, teacher: torch.nn.Module | None, train: torch.Tensor | TrainData,
                  val: torch.Tensor | TrainData, tc: TrainConfig, ckpt_dir: Path, resume: bool = False,
                  tracker: Any = None, on_step: Callable[[int, dict], None] | None = None, *,
                  after_optimizer_step: Callable[[torch.nn.Module], None] | None = None,
                  evaluate: Callable[[torch.nn.Module], dict] | None = None,
                  eos_id: int | None = None, accelerator: Any = None, name: str = "train",
                  student_sampler: ContinuationSampler = generate_sequences,
                  teacher_sampler: ContinuationSampler = generate_sequences,
                  fake_quant: FakeQuant | None = None) -> dict:
    """Train `student` in place. Returns {"metrics", "model", "accelerator"} (the caller saves on the
    main process only when several are training).

    `on_step(step, logs)` runs after each step; `after_optimizer_step(model)` right after every
    optimizer update (e.g. to re-apply pruning masks); `evaluate(model)` at every `eval_every`
    and at the end (e.g. task accuracy). With `tc.lora`, the returned model has the adapters merged.
    `name` labels the progress bar and log lines only; a bad setting is a SettingError naming the
    setting alone (the caller's `config_section` names the section). `student_sampler` /
    `teacher_sampler` continue the prompts of on-policy / sequence-level KD steps
    (train.onpolicy.ContinuationSampler; default transformers' generate). `fake_quant` (given exactly when
    `tc.qat` is set): from its start step on, the forward sees the chosen linears on the quantize stage's grid
    (the validations and `evaluate` too); the returned model has them snapped onto it, `metrics["qat"]` says how.
    """
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    tc.validate()
    if bool(tc.qat) != (fake_quant is not None):
        raise ShrinkError(f"train_distill: qat={tc.qat!r} with fake_quant={fake_quant!r}: a stage with `qat` set "
                          "passes shrink.compress.fake_quant.fake_quantizer(tc.qat, save_dtype), and only then")
    ckpt_dir = Path(ckpt_dir)
    if accelerator is None:
        accelerator = make_accelerator(tc.grad_accum)
    set_seed(tc.seed)
    data, val_data = as_train_data(train), as_train_data(val)
    terms = make_terms(tc)
    pairs = _layer_pairs(tc)
    if accelerator.is_fsdp2:
        _check_shardable(tc, pairs)
    if accelerator.num_processes > 1:
        accelerator.print(f"{name}: {describe(accelerator)}")
    needs_teacher = any(t.uses_teacher for t in terms) or bool(pairs) or tc.seq_kd or tc.lmbda > 0
    if needs_teacher and teacher is None:
        raise SettingError("losses", "a teacher-based loss (or layer map / on-policy) is configured but no "
                                     "teacher was given")
    if eos_id is None:
        eos_id = getattr(causal_lm(student).config, "eos_token_id", None)
        eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
    qat_step = None
    if fake_quant is not None:
        accelerator.print(f"{name}: {fake_quant.prepare(student)}")
        qat_step = fake_quant.start_step(tc.max_steps)
    if tc.lora:
        student = _wrap_lora(student, tc.lora)
    projector = None
    if pairs:
        s_width = causal_lm(student).config.hidden_size
        t_width = causal_lm(teacher).config.hidden_size
        projector = LayerProjector(pairs, s_width, t_width)
    params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    if projector is not None:
        params += [(f"proj.{n}", p) for n, p in projector.named_parameters()]
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    if accelerator.device.type == "cuda" and getattr(accelerator, "device_placement", True):
        # prepare() would move them anyway; moving first lets the optimizer see where they live.
        student.to(accelerator.device)
        if projector is not None:
            projector.to(accelerator.device)
    # One fused CUDA kernel for the whole update instead of a few launches per parameter tensor
    # (plain tensors only: under FSDP2 the optimizer steps DTensor shards, with the foreach kernels).
    fused = (bool(params) and not accelerator.is_fsdp2
             and all(p.is_cuda and p.dtype == torch.float32 for _, p in params)) or None
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95),
                                  fused=fused)
    # Not prepared: accelerate would step it once per process; we step it once per optimizer step.
    scheduler = get_cosine_schedule_with_warmup(optimizer, tc.warmup_steps, tc.max_steps)
    if projector is not None:
        student, projector, optimizer = accelerator.prepare(student, projector, optimizer)
    else:
        student, optimizer = accelerator.prepare(student, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    if teacher is not None:
        teacher = shard_frozen(accelerator, teacher)

    start_step = 0
    if resume and checkpoint_step(ckpt_dir) is not None:
        start_step = int(load_checkpoint(accelerator, ckpt_dir)["step"])
        accelerator.print(f"{name}: resumed from {ckpt_dir} at step {start_step}")
    elif not resume and accelerator.is_main_process:
        remove_checkpoint(ckpt_dir)
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = ckpt_dir.parent / f"{ckpt_dir.name}.{LOG_FILE}"
    if accelerator.is_main_process:
        _keep_log_until(log_path, start_step)

    student.train()
    compiler = LayerCompiler([student, teacher], use_compile_model(tc.compile_model, accelerator.device,
                                                                   tc.lmbda > 0 or tc.seq_kd, accelerator.is_fsdp2))
    # The teacher's Linear weights cast once for the steps' autocast (not under FSDP2: its shards are DTensors).
    teacher_casts = FrozenCasts(None if accelerator.is_fsdp2 else teacher, autocast_dtype(accelerator.mixed_precision))
    samplers = {"student": student_sampler, "teacher": teacher_sampler}
    kw = _loss_kwargs(tc, projector)
    ce_free = [t for t in terms if t.uses_teacher]
    bar = tqdm(total=tc.max_steps, initial=start_step, desc=name, disable=not accelerator.is_local_main_process,
               dynamic_ncols=True)
    t_start, tokens_done, first_tokens, logs = time.time(), 0, 0, {}
    spent = {"first_step_s": 0.0, "checkpoint_s": 0.0, "eval_s": 0.0}  # what tokens_per_s includes besides steps
    quantized = False  # whether the fake quantization is on
    for step in range(start_step, tc.max_steps):
        if qat_step is not None and step >= qat_step and not quantized:
            fake_quant.attach(accelerator.unwrap_model(student))
            quantized = True
            accelerator.print(f"{name}: fake quantization on from step {step + 1} of {tc.max_steps}")
        parts_sum: dict[str, Any] = {}
        source = step_source(tc.seed, step, tc.lmbda, tc.seq_kd)
        step_tokens = 0
        for micro in range(tc.grad_accum):
            batch, use_ce = _step_batch(data, step * tc.grad_accum + micro, tc, accelerator, student, teacher,
                                        eos_id, source, samplers)
            step_tokens += batch.num_tokens
            step_terms = terms if use_ce else (ce_free or terms)
            with accelerator.accumulate(student), accelerator.autocast():
                with compiler.active(), teacher_casts.active():
                    loss, parts = batch_loss(student, teacher, batch, step_terms, tc.chunk_size, **kw)
                accelerator.backward(loss)
                if accelerator.sync_gradients and tc.max_grad_norm > 0:
                    clip = list(student.parameters()) + (list(projector.parameters()) if projector is not None else [])
                    accelerator.clip_grad_norm_(clip, tc.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / tc.grad_accum
        parts_sum = reduce_mean(accelerator, host_values(parts_sum))  # the step's one read of the device
        scheduler.step()
        if after_optimizer_step is not None:
            after_optimizer_step(accelerator.unwrap_model(student))
        tokens_done += step_tokens * accelerator.num_processes
        elapsed = time.time() - t_start
        if step == start_step:  # torch.compile and the allocator's warm-up
            spent["first_step_s"], first_tokens = elapsed, tokens_done
        logs = {"step": step + 1, "loss": parts_sum.pop("total"), **parts_sum, "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": tokens_done / max(elapsed, 1e-9), "source": source,
                **({"qat": quantized} if qat_step is not None else {})}
        if accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(logs) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{logs['tokens_per_s']:.0f}")
        if tracker is not None and (step + 1) % tracker.log_every == 0:
            tracker.log(logs, step=step + 1)
        if tc.eval_every and (step + 1) % tc.eval_every == 0 and step + 1 < tc.max_steps:
            t_eval = time.time()
            with compiler.active():
                vlogs = validation_loss(student, teacher, val_data, terms, tc, accelerator.device, projector)
            if evaluate is not None:
                vlogs.update(evaluate(accelerator.unwrap_model(student)))
            accelerator.print(f"{name} step {step + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in vlogs.items()))
            if tracker is not None:
                tracker.log(vlogs, step=step + 1)
            spent["eval_s"] += time.time() - t_eval
        if tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0 and step + 1 < tc.max_steps:
            t_save = time.time()
            save_checkpoint(accelerator, ckpt_dir, step + 1)
            spent["checkpoint_s"] += time.time() - t_save
        if on_step is not None:
            on_step(step + 1, logs)
    bar.close()
    steady = _steady_rate(tokens_done - first_tokens, time.time() - t_start, spent)  # before the validation
    if qat_step is not None and not quantized:  # resumed at the end: the model is still judged on its grid
        fake_quant.attach(accelerator.unwrap_model(student))
    with compiler.active():
        final_val = validation_loss(student, teacher, val_data, terms, tc, accelerator.device, projector)
    tokens_per_example = getattr(data, "block_size", None)
    metrics = {"steps": tc.max_steps, "train_tokens": tc.max_steps * tc.batch_size * tc.grad_accum
               * accelerator.num_processes * tokens_per_example if tokens_per_example else tokens_done,
               "tokens_per_s": logs.get("tokens_per_s"), **spent,
               "steady_tokens_per_s": steady,
               "final_loss": logs.get("loss"), **final_val}
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(student)
    if evaluate is not None:
        metrics.update(evaluate(unwrapped))
    if tracker is not None:
        tracker.log(metrics, step=tc.max_steps)
    if tc.lora:
        from train.lora import merge_lora

        unwrapped = merge_lora(unwrapped)
    # Sharded: the whole model on the main process (which alone saves it), the shards elsewhere.
    model = gathered_model(accelerator, unwrapped)
    if fake_quant is not None:
        metrics["qat"] = {**fake_quant.snap(model), "first_step": qat_step + 1}  # as the step log counts
    return {"metrics": metrics, "model": model, "accelerator": accelerator}


def _steady_rate(tokens: int, elapsed: float, spent: dict[str, float]) -> float | None:
    """Tokens/s of the steps after the first, checkpoints and evaluations left out (comparable with a
    bare loop's median step, which `tokens_per_s`, the whole loop's rate, is not)."""
    seconds = elapsed - sum(spent.values())
    return tokens / seconds if tokens and seconds > 0 else None


def _keep_log_until(log_path: Path, step: int) -> None:
    """The step log as the checkpoint left it: an interrupted run logged steps past its last
    checkpoint, which the resumed run logs again (step 0: no log)."""
    if step == 0 or not log_path.is_file():
        log_path.unlink(missing_ok=True)
        return
    kept = [line for line in log_path.read_text().splitlines() if _logged_step(line) <= step]
    tmp = log_path.with_name(f"{log_path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(log_path)


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf  # a line cut off by a kill: dropped


def _check_shardable(tc: TrainConfig, pairs: list[LayerPair]) -> None:
    """What FSDP2 does not run here, refused before any work (all need DDP, `conf/accelerate/ddp.yaml`)."""
    if tc.lmbda > 0 or tc.seq_kd:
        # Ranks sample continuations of different lengths, so they would run different numbers of
        # forwards, and every sharded forward is a collective: the ranks would wait on each other forever.
        raise SettingError("lmbda" if tc.lmbda > 0 else "seq_kd", "(on-policy / sequence-level sampling) needs "
                           "DDP: sampling on FSDP2-sharded models runs a different number of forwards per rank",
                           sep=" ")
    if pairs:
        raise SettingError("layer_map", "(intermediate-layer loss) needs DDP: its projector is a second trained "
                           "model, and accelerate prepares one model per optimizer under FSDP2", sep=" ")
    if tc.lora:
        raise SettingError("lora", "needs DDP: merging adapters into FSDP2-sharded weights is not supported",
                           sep=" ")
    if tc.qat:
        raise SettingError("qat", "needs DDP: the fake quantization and the final snap are not built for FSDP2's "
                           "sharded (and mixed-precision) parameters", sep=" ")

"""compile_model: the compiled decoder layers give the eager loss and gradients, share one graph per
grad mode across layers, leave nothing compiled on the models, and bad settings are named."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from support import tiny_llama_config
from common.errors import SettingError
from train.compiled_layers import LayerCompiler, decoder_layers, use_compile_model
from train.config import TrainConfig
from train.loop import batch_loss, make_terms, train_distill
from train.student_init import student_from_teacher

# One batch shape (batch_size 4, 24 tokens) for every compiled step and validation batch below: each
# graph is then compiled once for the file (shared through compiled_layers' per-class cache) and later
# tests reuse it, where a new shape would recompile every graph with dynamic dims.
SHAPE = (4, 24)


def _models(teacher_layers: int = 6, student_layers: tuple[int, ...] = (0, 2, 4)):
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config(hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=teacher_layers)).eval().requires_grad_(False)
    return teacher, student_from_teacher(teacher, list(student_layers)).float().train()

def _loss_and_grads(student, teacher, ids, device_type: str = "cpu", autocast: bool = False):
    terms = make_terms(TrainConfig())  # forward KL 1.0 + CE 0.5 at tau 2, the distill default
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        loss, _ = batch_loss(student, teacher, ids, terms, chunk_size=16, compile_loss=False)
    return loss.detach(), torch.autograd.grad(loss, list(student.parameters()))

def test_compiled_layers_match_eager_and_share_one_graph_per_grad_mode():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    teacher, student = _models()
    ids = torch.randint(3, 320, SHAPE, generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = _loss_and_grads(student, teacher, ids)
    compiler = LayerCompiler([student, teacher], enabled=True)
    with compiler.active():
        loss, grads = _loss_and_grads(student, teacher, ids)
        loss2, _ = _loss_and_grads(student, teacher, ids)  # a second step reuses the graphs
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss2, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    # 9 layers, two graphs: the teacher's no-grad forward and the student's training forward
    assert counters["stats"]["unique_graphs"] == 2
    assert not any("forward" in vars(layer) for m in (student, teacher) for layer in decoder_layers(m))
    # a later run (the pipeline's next stage) with new models of the same shapes compiles nothing new
    teacher2, student2 = _models()
    with LayerCompiler([student2, teacher2], enabled=True).active():
        loss3, _ = _loss_and_grads(student2, teacher2, ids)
    torch.testing.assert_close(loss3, ref_loss, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 2

def test_disabled_compiler_leaves_the_layers_alone():
    teacher, student = _models()
    with LayerCompiler([student, teacher, None], enabled=False).active():
        assert not any("forward" in vars(layer) for layer in decoder_layers(student))

def test_train_distill_with_compiled_layers_trains_as_eager(tmp_path):
    gen = torch.Generator().manual_seed(2)
    train, val = torch.randint(3, 320, (16, SHAPE[1]), generator=gen), torch.randint(3, 320, SHAPE, generator=gen)
    results, logs = {}, {}
    for compiled in (False, True):
        teacher, student = _models()
        tc = TrainConfig(max_steps=3, batch_size=4, warmup_steps=1, chunk_size=16, checkpoint_every=0,
                         val_batches=1, compile_loss=False, compile_model=compiled)
        logs[compiled] = []
        out = train_distill(student, teacher, train, val, tc, tmp_path / f"ckpt{compiled}",
                            on_step=lambda step, entry, k=compiled: logs[k].append(entry["loss"]))
        results[compiled] = out
        assert not any("forward" in vars(layer) for m in (student, teacher) for layer in decoder_layers(m))
    assert logs[True] == pytest.approx(logs[False], rel=1e-5)
    assert results[True]["metrics"]["val_total"] == pytest.approx(results[False]["metrics"]["val_total"], rel=1e-5)
    for (name, p), q in zip(results[False]["model"].named_parameters(), results[True]["model"].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)

def _rationale_data():
    from support import make_tiny_tokenizer
    from common.tasks import TaskExample
    from train.rationale import MultiTaskExamples

    exs = [TaskExample(str(i), f"What is {i % 5} plus {i % 5}?", str(2 * (i % 5)), {}) for i in range(8)]
    return MultiTaskExamples([(ex, f"{ex.answer} is twice {i % 5}.") for i, ex in enumerate(exs)],
                             make_tiny_tokenizer(), 0.5, 48)


@pytest.mark.parametrize("feature", ["lora", "layer_map", "padded_multitask"])
def test_compiled_layers_with_lora_layer_terms_and_padded_batches_train_as_eager(tmp_path, feature):
    """The loop's other paths through the layers: peft adapters inside them, forward hooks on them
    (capture_layers), and padded two-group batches (an attention mask)."""
    from train.layer_distill import parse_layer_map

    gen = torch.Generator().manual_seed(4)
    train, val = torch.randint(3, 320, (8, SHAPE[1]), generator=gen), torch.randint(3, 320, SHAPE, generator=gen)
    extra = {"lora": {"lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
             "layer_map": {"layer_map": parse_layer_map("auto", 3, 6, keep=[0, 2, 4]), "layer_weight": 1.0},
             "padded_multitask": {"losses": {"ce": 1.0}}}[feature]
    if feature == "padded_multitask":
        train = val = _rationale_data()
    logs = {}
    for compiled in (False, True):
        teacher, student = _models()
        tc = TrainConfig(max_steps=2, batch_size=4, warmup_steps=1, chunk_size=16, checkpoint_every=0,
                         val_batches=1, compile_loss=False, compile_model=compiled, **extra)
        logs[compiled] = []
        train_distill(student, teacher if feature != "padded_multitask" else None, train, val, tc,
                      tmp_path / f"ckpt{compiled}", on_step=lambda step, entry, k=compiled: logs[k].append(entry))
    for eager, comp in zip(logs[False], logs[True], strict=True):
        numbers = [k for k, v in eager.items() if isinstance(v, float) and k not in ("tokens_per_s", "lr")]
        assert len(numbers) >= 2
        assert {k: comp[k] for k in numbers} == pytest.approx({k: eager[k] for k in numbers}, rel=1e-4, abs=1e-6)


def test_compile_model_auto_is_cuda_only_and_off_for_generation_and_fsdp2():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_compile_model("auto", cuda, on_policy=False, sharded=False)
    assert not use_compile_model("auto", cpu, on_policy=False, sharded=False)
    assert not use_compile_model("auto", cuda, on_policy=True, sharded=False)
    assert not use_compile_model("auto", cuda, on_policy=False, sharded=True)
    assert use_compile_model(True, cpu, on_policy=False, sharded=False)
    assert not use_compile_model(False, cuda, on_policy=False, sharded=False)

@pytest.mark.parametrize("overrides, message", [
    ({"compile_model": "sometimes"}, "compile_model must be auto, true or false, got 'sometimes'"),
    ({"compile_model": True, "lmbda": 0.5}, "compile_model true does not apply to on-policy / seq-KD steps"),
    ({"compile_model": True, "seq_kd": True}, "compile_model true does not apply to on-policy / seq-KD steps"),
])
def test_bad_compile_model_is_named(overrides, message):
    with pytest.raises(SettingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**overrides).validate()

def test_compile_model_from_the_config_section():
    assert TrainConfig.from_cfg({"compile_model": "auto"}, seed=0, block_size=8).compile_model == "auto"
    with pytest.raises(SettingError, match="compile_model must be auto, true or false, got 'yes'"):
        TrainConfig.from_cfg({"compile_model": "yes"}, seed=0, block_size=8)

@pytest.mark.gpu
def test_compiled_layers_match_eager_under_bf16_autocast_on_cuda():
    teacher, student = (m.cuda() for m in _models())
    ids = torch.randint(3, 320, (4, 64), generator=torch.Generator().manual_seed(3)).cuda()
    ref_loss, ref_grads = _loss_and_grads(student, teacher, ids, "cuda", autocast=True)
    with LayerCompiler([student, teacher], enabled=True).active():
        loss, grads = _loss_and_grads(student, teacher, ids, "cuda", autocast=True)
    # bf16 matmuls either way; Inductor's fused fp32 norms and casts round differently
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=1e-3)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.nn.functional.cosine_similarity(g.flatten().float(), r.flatten().float(), dim=0) > 0.99


@pytest.mark.gpu
def test_compiled_training_step_on_cuda_reads_the_device_once_and_trains_as_eager(tmp_path):
    from train.host_reads import HostReads

    gen = torch.Generator().manual_seed(5)
    train, val = torch.randint(3, 320, (32, 64), generator=gen), torch.randint(3, 320, (4, 64), generator=gen)
    logs = {}
    for compiled in (False, True):
        teacher, student = _models()
        tc = TrainConfig(max_steps=5, batch_size=4, warmup_steps=1, chunk_size=64, checkpoint_every=0,
                         val_batches=1, compile_model=compiled)
        reads, marks, logs[compiled] = HostReads(), [], []

        def on_step(step, entry, k=compiled):
            marks.append(len(reads.where))
            logs[k].append(entry["loss"])

        with reads:
            train_distill(student, teacher.cuda(), train, val, tc, tmp_path / f"ckpt{compiled}", on_step=on_step)
        assert [b - a for a, b in zip(marks, marks[1:])] == [1] * 4, reads.where
    # bf16 autocast either way; the compiled layers round their fused fp32 norms differently
    assert logs[True] == pytest.approx(logs[False], rel=2e-2)

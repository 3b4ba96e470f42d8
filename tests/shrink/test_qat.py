"""Quantization-aware training (`qat`, shrink/compress/fake_quant.py): the fake-quantized forward is the quantize
stage's rtn and its gradient the straight-through one; snapped weights are what rtn (and GPTQ) reproduce; a QAT
run switches on at its step and ends on the grid; the quantize stage after a QAT distill costs ~nothing at its
gate; bad settings are named before any work.

What holds, exactly (int4 and int8 on random weights below, and the runs):
- rtn of the snapped weights (fp32) gives the training's codes and zero points (symmetric: and scales) exactly;
- asymmetric: the snapped weights are that grid, a fixed point: rtn and GPTQ dequantize to them bit for bit (but
  in a group where a rounding tie left an extreme code unused: it keeps scale anchors, as symmetric ones do);
- symmetric (no min-max grid is a fixed point): the artifact differs from the grid only at its scale anchors, one
  weight a group, half a step off; GPTQ compensates those half steps and so moves a few codes (about 1%);
- saved in bf16, int4: the same codes but for anchors on a rounding tie; weights within bf16 rounding (int8: a
  weight 100+ steps from zero needs more than bf16's 8 bits, and a few codes move)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from common.errors import SettingError, ShrinkError
from shrink.artifacts import Artifact
from shrink.compress.calibration import compress_model
from shrink.compress.compress_artifact import CompressionSettings
from shrink.compress.compressed_tensors_io import load_compressed
from shrink.compress.fake_quant import FakeQuantLinear, fake_quantize, fake_quantizer, snap_weight
from shrink.compress.methods.gptq import GPTQ, gptq_quantize
from shrink.compress.methods.rtn import RTN
from shrink.compress.quant import QuantSpec, compute_qparams, dequantize, quantize, rtn
from shrink.compress.recipe import quantization_recipe
from shrink.modeling import save_model_artifact
from shrink.stages.quantize import qat_note
from support import make_tiny_tokenizer, tiny_llama_config
from train.config import TrainConfig
from train.loop import train_distill
from train.student_init import student_from_teacher

SKIP = ["lm_head", "*embed_tokens"]
# (out, in, group size): odd row counts, inputs that are multiples of the group but not powers of two
SHAPES = [(7, 96, 32), (33, 192, 64), (5, 384, 128), (64, 128, 64), (3, 96, None)]
# the share of codes GPTQ moves while it compensates the anchors' half steps (0.1-0.8% on 48 x 384 weights;
# up to 2.2% on these small ones, the anchors' own ties included)
GPTQ_MOVES = 0.05


def _weights(out: int, inp: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[0, :8] *= 20  # an outlier group
    w[-1, -16:] = w[-1, -16:].abs()  # a one-signed stretch
    w[1, :32] = w[1, :32].clamp(-0.1, 0.1)
    w[1, :2] = torch.tensor([0.126953125, -0.126953125])  # min = -max: asymmetric rounding ties at both ends
    return w


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quantize_is_rtn_in_value_and_the_identity_in_gradient(bits, symmetric):
    for i, (out, inp, group) in enumerate(SHAPES):
        spec = QuantSpec(bits, group, symmetric)
        latent = _weights(out, inp, i)
        scale, zero = compute_qparams(latent, spec)
        expected = dequantize(quantize(latent, scale, zero, spec), scale, zero, spec)
        w = latent.clone().requires_grad_(True)
        y = fake_quantize(w, spec)
        assert torch.equal(y, expected) and torch.equal(y, rtn(latent, spec).dequantize())
        upstream = torch.randn(out, inp, generator=torch.Generator().manual_seed(100 + i))
        (y * upstream).sum().backward()
        assert torch.equal(w.grad, upstream)  # straight through the rounding
        linear = torch.nn.Linear(inp, out, bias=False)
        linear.weight.data.copy_(latent)
        FakeQuantLinear.attach(linear, spec)
        x = torch.randn(2, inp)
        assert torch.equal(linear(x), x @ expected.t())
        FakeQuantLinear.detach(linear)
        assert type(linear) is torch.nn.Linear and not hasattr(linear, "qat_spec")


def _hessian(inp: int, seed: int) -> torch.Tensor:
    x = torch.randn(512, inp, generator=torch.Generator().manual_seed(seed))
    return x.t() @ x


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_snapped_weights_are_what_rtn_and_gptq_reproduce(bits, symmetric):
    for i, (out, inp, group) in enumerate(SHAPES):
        spec = QuantSpec(bits, group, symmetric)
        latent = _weights(out, inp, i)
        trained = rtn(latent, spec)  # what the last fake-quantized forward used
        snapped, anchors = snap_weight(latent, spec)
        again = rtn(snapped, spec)
        gptq = gptq_quantize(snapped, _hessian(inp, i), spec)
        assert torch.equal(again.q, trained.q) and torch.equal(again.zero, trained.zero)
        off = again.dequantize() != snapped  # the scale anchors
        if symmetric:  # the training's scales too; the artifact is their grid but for the anchors, half a step off
            assert torch.equal(again.scale, trained.scale)
            assert anchors >= out * spec.groups(inp) and int(off.sum()) == anchors
            half_step = 0.5 * again.scale.repeat_interleave(inp // again.scale.shape[1], dim=1)
            torch.testing.assert_close((again.dequantize() - snapped).abs()[off], half_step[off], rtol=1e-4, atol=0)
            assert float((gptq.q != again.q).float().mean()) < GPTQ_MOVES
        else:  # a fixed point, bit for bit, but in the row whose min = -max left an extreme code unused
            assert 0 < anchors <= 2 * out and int(off.sum()) <= anchors and not off[2:].any() and not off[0].any()
            untied = torch.arange(out) != 1
            assert torch.equal(gptq.dequantize()[untied], snapped[untied])  # every rounding error is zero
        # saved in bf16: the same codes but for anchors on a rounding tie; the weights within bf16 rounding
        if bits == 4:  # int8: a weight 100+ steps from zero needs more than bf16's 8 bits, and a few codes move
            saved = snapped.to(torch.bfloat16).float()
            bf16 = rtn(saved, spec)
            assert not ((bf16.q != trained.q) & ~off).any()
            close = (bf16.dequantize() - saved).abs() <= 2 ** -7 * saved.abs()
            assert not (~close & ~off).any()


def _models():
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config()).eval().requires_grad_(False)
    return teacher, student_from_teacher(teacher, [0, 2]).float().train()


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(3, 320, (16, 32), generator=gen), torch.randint(3, 320, (4, 32), generator=gen)


def _tc(**kw) -> TrainConfig:
    return TrainConfig(**{"max_steps": 4, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "chunk_size": 64,
                          "checkpoint_every": 0, "val_batches": 1, **kw})


def test_a_qat_run_switches_on_at_its_start_and_ends_on_the_grid(tmp_path):
    """start=0.5 of 4 steps: steps 1-2 train exactly as without QAT, 3-4 fake-quantized; the returned model is
    plain and on the grid, and (saved in fp32, reloaded) rtn and GPTQ through the quantize stage's driver give
    back its weights bit for bit."""
    train, val = _data()
    plain, qat = [], []
    teacher, student = _models()
    train_distill(student, teacher, train, val, _tc(), tmp_path / "a", on_step=lambda s, log: plain.append(log))
    setting = {"bits": 4, "group_size": 32, "symmetric": False, "start": 0.5}
    teacher, student = _models()
    out = train_distill(student, teacher, train, val, _tc(qat=setting), tmp_path / "b",
                        on_step=lambda s, log: qat.append(log), fake_quant=fake_quantizer(setting, "fp32"))
    assert [log["qat"] for log in qat] == [False, False, True, True]
    assert [log["loss"] for log in qat[:2]] == [log["loss"] for log in plain[:2]]
    assert qat[2]["loss"] != plain[2]["loss"]
    record = out["metrics"]["qat"]
    assert record == {**setting, "first_step": 3, "linears": 14, "left_dense": "", "snapped": True,
                      "saved_dtype": "float32", "scale_anchors": 0, "codes_changed": 0}
    model = out["model"]
    spec = QuantSpec(4, 32, False)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    assert len(linears) == 14 and all(type(m) is torch.nn.Linear for m in linears.values())
    save_model_artifact(tmp_path / "art", model, make_tiny_tokenizer(), stage="distill", dtype="fp32")
    for method in (RTN(scheme=spec), GPTQ(scheme=spec)):
        loaded = load_compressed(tmp_path / "art")
        compress_model(loaded, [method], train, torch.device("cpu"), skip=SKIP, log=lambda s: None)
        for name, linear in linears.items():
            assert torch.equal(loaded.get_submodule(name).weight, linear.weight.detach()), (method.name, name)


def test_fake_quantized_layers_compile_to_what_eager_computes(tmp_path):
    """compile_model=true (train/compiled_layers.py): the class swap at the start step recompiles the layer (a
    guard on the module's class), so the compiled run's first fake-quantized step is the eager one's, not the
    plain one's. Later, float noise between the two moves a few latent weights across a rounding boundary, so
    the runs agree closely, and their snapped weights on all but a few codes."""
    train, val = _data()
    setting = {"bits": 4, "group_size": 64, "symmetric": True, "start": 0.5}
    logs, models = {}, {}
    for run, compiled, qat in (("plain", False, None), ("eager", False, setting), ("compiled", True, setting)):
        teacher, student = _models()
        logs[run] = []
        out = train_distill(student, teacher, train, val, _tc(qat=qat, compile_model=compiled, compile_loss=False,
                                                              lr=3e-4), tmp_path / run,
                            on_step=lambda s, log, k=run: logs[k].append(log["loss"]),
                            fake_quant=fake_quantizer(qat) if qat else None)
        models[run] = out["model"]
    assert logs["compiled"][:2] == pytest.approx(logs["plain"][:2], rel=1e-6)
    step3 = {run: losses[2] for run, losses in logs.items()}
    assert abs(step3["compiled"] - step3["eager"]) < abs(step3["eager"] - step3["plain"]) / 20
    assert logs["compiled"] == pytest.approx(logs["eager"], rel=1e-4)
    for (name, p), q in zip(models["eager"].named_parameters(), models["compiled"].parameters()):
        assert float(((q - p).abs() > 1e-4).float().mean()) < 0.01, name


class Interrupt(Exception):
    pass


def test_a_resumed_qat_run_is_the_straight_run(tmp_path):
    """Interrupted after its first fake-quantized step (the checkpoint holds the latent weights, same keys), a
    resumed run switches fake quantization on before its first step and ends where the straight run ends."""
    train, val = _data()
    setting = {"bits": 4, "group_size": 32, "symmetric": True, "start": 0.5}
    tc = _tc(qat=setting, checkpoint_every=3)
    teacher, student = _models()
    straight = train_distill(student, teacher, train, val, tc, tmp_path / "a" / "ckpt",
                             fake_quant=fake_quantizer(setting))

    def stop_at_3(step: int, log: dict) -> None:
        if step == 3:
            raise Interrupt

    teacher, student = _models()
    with pytest.raises(Interrupt):
        train_distill(student, teacher, train, val, tc, tmp_path / "b" / "ckpt", on_step=stop_at_3,
                      fake_quant=fake_quantizer(setting))
    teacher, student = _models()
    seen = []
    resumed = train_distill(student, teacher, train, val, tc, tmp_path / "b" / "ckpt", resume=True,
                            on_step=lambda step, log: seen.append((step, log["qat"])),
                            fake_quant=fake_quantizer(setting))
    assert seen == [(4, True)]
    assert resumed["metrics"]["qat"] == straight["metrics"]["qat"]
    for p, q in zip(resumed["model"].parameters(), straight["model"].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_qat_under_ddp_ends_on_the_grid(tiny_teacher: Path, tmp_path: Path):
    """Two CPU processes (torchrun, gloo), a checkpoint every step: the artifact that rank 0 writes is snapped
    (asymmetric, fp32: rtn gives back its weights bit for bit)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from support import REPO

    env = {**os.environ, "OMP_NUM_THREADS": "1", "SHRINK_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29743", "-m", "shrink", "stage=distill", f"run={tmp_path / 'run'}",
                             f"input={tiny_teacher}", *TINY, "distill.save_dtype=fp32", "distill.max_steps=3",
                             "distill.checkpoint_every=1", "distill.qat={bits: 4, group_size: 32, symmetric: false}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "distill" / "shrink.json").read_text())["metrics"]["qat"]
    assert (record["linears"], record["codes_changed"], record["first_step"]) == (14, 0, 1)
    weights = load_file(str(tmp_path / "run" / "distill" / "model.safetensors"))
    spec = QuantSpec(4, 32, False)
    linears = [k for k in weights if ".layers." in k and k.endswith("proj.weight")]
    assert len(linears) == 14
    for name in linears:
        assert torch.equal(rtn(weights[name], spec).dequantize(), weights[name]), name


TINY = ["logging=none", "data=pydoc", "data.max_docs=30", "data.block_size=64", "distill.batch_size=2",
        "distill.checkpoint_every=0", "distill.val_batches=1", "distill.max_steps=6", "distill.lr=3e-3",
        "student.keep_layers=every:2", "gates.context=64"]
QCALIB = ["quantize.calibration.source=pydoc", "quantize.calibration.num_samples=4",
          "quantize.calibration.seq_len=64", "quantize.calibration.batch_size=2"]


def test_quantize_after_a_qat_distill_costs_nothing_at_its_gate(tiny_teacher: Path, tmp_path: Path, capsys):
    """The balanced preset's scheme (int4 g64 symmetric, distill saved in bf16), through `python -m shrink`: rtn,
    then GPTQ, of the QAT-distilled student. The gate's held-out perplexity moves by less than 1.5e-3 (measured:
    rtn 4.5e-4, GPTQ 7.6e-4; what differs is the scale anchors, one weight a group half a step off the grid in
    the distill artifact, on it in the quantized one; without QAT this tiny model's int4 costs 3.2e-3 and
    1.6e-3); the distill artifact records what ran."""
    from shrink.__main__ import main

    run = tmp_path / "run"
    assert main(["stage=distill", f"run={run}", f"input={tiny_teacher}", *TINY,
                 "distill.qat={bits: 4, group_size: 64, symmetric: true, start: 0.0}"]) == 0
    meta = json.loads((run / "distill" / "shrink.json").read_text())
    record = meta["metrics"]["qat"]
    assert meta["config"]["distill"]["qat"] == {"bits": 4, "group_size": 64, "symmetric": True, "start": 0.0}
    assert (record["snapped"], record["saved_dtype"], record["linears"]) == (True, "bfloat16", 14)
    assert record["codes_changed"] <= record["scale_anchors"] // 5  # anchors on a tie that bf16 tipped
    for recipe in ("rtn", "gptq"):
        capsys.readouterr()
        assert main(["stage=quantize", f"run={run}", *TINY, *QCALIB, f"quantize.recipe={recipe}"]) == 0
        printed = capsys.readouterr().out
        assert "trained by QAT onto the int4 g64 symmetric grid" in printed and "warning" not in printed
        gate = json.loads((run / "quantize" / "shrink.json").read_text())["metrics"]["quality_gate"]
        assert gate["ratio"] == pytest.approx(1.0, abs=1.5e-3), (recipe, gate)


def test_quantize_reproduces_an_asymmetric_qat_distill_bit_for_bit(tiny_teacher: Path, tmp_path: Path):
    """Asymmetric int4 g32, everything in fp32, through `python -m shrink`: the quantized artifacts (rtn, GPTQ)
    hold exactly the distilled weights. (Gates off: transformers cannot load asymmetric int4 files, see
    tests/shrink/test_compressed_tensors_roundtrip.py; our reader does.)"""
    from safetensors.torch import load_file

    from shrink.__main__ import main

    run, off = tmp_path / "run", ["gates.enabled=false", "quantize.symmetric=false", "quantize.group_size=32"]
    assert main(["stage=distill", f"run={run}", f"input={tiny_teacher}", *TINY, *off, "distill.save_dtype=fp32",
                 "distill.qat={bits: 4, group_size: 32, symmetric: false, start: 0.5}"]) == 0
    distilled = load_file(str(run / "distill" / "model.safetensors"))
    for recipe in ("rtn", "gptq"):
        assert main(["stage=quantize", f"run={run}", *TINY, *QCALIB, *off, f"quantize.recipe={recipe}",
                     "quantize.save_dtype=fp32"]) == 0
        quantized = load_compressed(run / "quantize")
        names = [k for k in distilled if k.endswith("proj.weight")]
        assert len(names) == 14
        for name in names:
            assert torch.equal(quantized.get_submodule(name.removesuffix(".weight")).weight, distilled[name]), name


def test_quantize_warns_when_its_scheme_is_not_the_qat_one(tmp_path):
    record = {"bits": 4, "group_size": 64, "symmetric": True, "start": 0.0, "snapped": True}
    art = Artifact(tmp_path / "distill", {"metrics": {"qat": record}})

    def note(names, spec):
        return qat_note(art, CompressionSettings(recipe=quantization_recipe(names, {}, spec)))

    line = note(["gptq"], QuantSpec(4, 32, True))
    assert line.startswith("warning: quantize:") and "int4 g64 symmetric" in line and "int4 g32 symmetric" in line
    assert "int8 per channel asymmetric" in note(["rtn"], QuantSpec(8, None, False))
    assert "awq rescales" in note(["awq", "rtn"], QuantSpec(4, 64, True))
    assert not note(["rtn"], QuantSpec(4, 64, True)).startswith("warning")
    assert qat_note(Artifact(tmp_path, {"metrics": {}}), CompressionSettings(
        recipe=quantization_recipe(["rtn"], {}, QuantSpec(4, 64, True)))) is None


@pytest.mark.parametrize("overrides,needle", [
    (["distill.qat={bits: 5, group_size: 64, symmetric: true}"], "distill.qat.bits"),
    (["distill.qat={bits: 4, group_size: 0, symmetric: true}"], "distill.qat.group_size"),
    (["distill.qat={bits: 4, symmetric: true}"], "distill.qat.group_size"),
    (["distill.qat={bits: 4, group_size: 64, symmetric: yes}"], "distill.qat.symmetric"),
    (["distill.qat={bits: 4, group_size: 64, symmetric: true, start: 1.0}"], "distill.qat.start"),
    (["distill.qat={bits: 4, group_size: 64, symmetric: true, begin: 0}"], "distill.qat"),
    (["gqa.train.qat={bits: 4.5, group_size: 64, symmetric: true}"], "gqa.train.qat.bits"),
    (["prune.finetune.qat={bits: 4, group_size: 64, symmetric: true, start: -0.5}"], "prune.finetune.qat.start"),
    (["distill.qat={bits: 4, group_size: 64, symmetric: true}", "distill.lora={r: 4}"], "distill.qat"),
    (["distill.qat={bits: 4, group_size: 48, symmetric: true}"], "distill.qat.group_size"),  # fits no linear
])
def test_bad_qat_settings_fail_before_any_work_naming_the_key(tiny_teacher, tmp_path, capsys, overrides, needle):
    """Each is refused by the config check before torch is imported, except a group size that fits no linear
    of the student, refused once the student exists, before its first step."""
    from shrink.__main__ import main

    capsys.readouterr()
    assert main(["stage=distill", f"run={tmp_path}", f"input={tiny_teacher}", *TINY, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "distill").exists()


def test_qat_needs_its_fake_quantizer_and_refuses_fsdp():
    from train.loop import _check_shardable

    teacher, student = _models()
    train, val = _data()
    with pytest.raises(ShrinkError, match="fake_quant"):
        train_distill(student, teacher, train, val, _tc(qat={"bits": 4, "group_size": 32, "symmetric": True}),
                      Path("/nonexistent/ckpt"))
    with pytest.raises(SettingError, match="qat needs DDP"):
        _check_shardable(_tc(qat={"bits": 4, "group_size": 32, "symmetric": True}), [])

"""stage=prune and stage=quantize from the command line on the tiny teacher (the command's main() in this
process where the artifacts are read; bad input's one-line errors from a real `python -m shrink`), the
fine-tune's mask preservation, and the experiment driver's --quick mode."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from common.errors import ShrinkError, config_section
from support import REPO, run_cli, run_main, tiny_llama_config
from shrink.compress.calib_data import CalibConfig, calibration_ids
from shrink.compress.calibration import compress_model
from shrink.compress.compressed_tensors_io import load_compressed, read_quantization_config
from shrink.compress.finetune import mask_preserving_finetune
from shrink.compress.methods.magnitude import Magnitude
from shrink.compress.methods.rtn import RTN
from shrink.compress.modules import QuantLinear
from shrink.compress.quant import QuantSpec
from shrink.compress.sparsity import SparsitySpec, is_nm_sparse
from train.loop import TrainConfig

CALIB = ["prune.calibration.source=pydoc", "prune.calibration.num_samples=4", "prune.calibration.seq_len=64",
         "prune.calibration.batch_size=2"]
QCALIB = [c.replace("prune.", "quantize.") for c in CALIB]


def test_prune_then_quantize_cli_keeps_two_four(tiny_teacher, tmp_path):
    run = tmp_path / "run"
    r = run_main("stage=prune", f"run={run}", f"input={tiny_teacher}", "logging=none", "device=cpu",
                 "prune.method=sparsegpt", *CALIB)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((run / "prune" / "shrink.json").read_text())
    assert meta["metrics"]["sparsity_of_pruned"] == pytest.approx(0.5)
    assert read_quantization_config(run / "prune")["sparsity_config"]["sparsity_structure"] == "2:4"
    pruned = load_compressed(run / "prune")
    targets = read_quantization_config(run / "prune")["sparsity_config"]["targets"]
    assert len(targets) == 4 * 7
    assert all(is_nm_sparse(pruned.get_submodule(n).weight) for n in targets)

    r = run_main("stage=quantize", f"run={run}", f"input={run / 'prune'}", "logging=none", "device=cpu",
                 "quantize.recipe=gptq", "quantize.group_size=32", *QCALIB)
    assert r.returncode == 0, r.stderr[-2000:]
    qcfg = read_quantization_config(run / "quantize")
    assert qcfg["format"] == "pack-quantized" and qcfg["sparsity_config"]["sparsity_structure"] == "2:4"
    quant = load_compressed(run / "quantize")
    for n in targets:
        m = quant.get_submodule(n)
        assert isinstance(m, QuantLinear) and is_nm_sparse(m.weight)


def test_bad_config_values_fail_in_one_line_naming_the_key(tiny_teacher, tmp_path):
    r = run_cli("stage=prune", f"run={tmp_path}", f"input={tiny_teacher}", "logging=none", "device=cpu",
                "prune.method=obs", *CALIB)
    assert r.returncode == 2 and "prune.method" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def tiny(seed=0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_llama_config(**kw)).eval()


def test_indivisible_layers_are_skipped_with_a_warning_or_rejected():
    # intermediate 72: down_proj's 72 inputs fit 2:4 but not groups of 32.
    model = tiny(intermediate_size=72)
    ids = torch.randint(3, 320, (2, 32))
    method = RTN(scheme=QuantSpec(4, 32, True))
    with pytest.raises(ShrinkError, match="quantize.on_indivisible"), config_section("quantize"):
        compress_model(model, [method], ids, torch.device("cpu"), skip=["lm_head", "*embed_tokens"],
                       on_indivisible="error", log=lambda s: None)
    model = tiny(intermediate_size=72)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = compress_model(model, [method], ids, torch.device("cpu"), skip=["lm_head", "*embed_tokens"],
                                on_indivisible="skip", log=lambda s: None)
    assert any("down_proj" in str(w.message) for w in caught)
    # One line for all of them, not one warning per linear.
    assert len(caught) == 1 and "model.layers.*.mlp.down_proj (4)" in str(caught[0].message)
    assert set(report.skipped) == {f"model.layers.{i}.mlp.down_proj" for i in range(4)}
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)


def test_lm_head_must_stay_in_the_skip_list():
    with pytest.raises(ShrinkError, match="prune.skip"), config_section("prune"):
        compress_model(tiny(), [Magnitude(spec=SparsitySpec("2:4"))], None, torch.device("cpu"),
                       skip=["*embed_tokens"], log=lambda s: None)


def test_calibration_segments_are_deterministic_and_too_little_data_is_an_error():
    from support import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    cfg = CalibConfig(source="pydoc", num_samples=3, seq_len=50, seed=0)
    a, b = calibration_ids(cfg, tok, None), calibration_ids(cfg, tok, None)
    assert a.shape == (3, 50) and torch.equal(a, b)
    assert not torch.equal(a, calibration_ids(CalibConfig("pydoc", 3, 50, seed=1), tok, None))
    with pytest.raises(ShrinkError, match="quantize.calibration.num_samples"), config_section("quantize"):
        calibration_ids(CalibConfig("pydoc", 10**6, 4096), tok, None)


def test_mask_preserving_finetune_keeps_zeros_and_trains(tmp_path):
    import copy

    teacher = tiny(seed=1)
    student = copy.deepcopy(teacher)
    ids = torch.randint(3, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    report = compress_model(student, [Magnitude(spec=SparsitySpec("2:4"))], None, torch.device("cpu"),
                            skip=["lm_head", "*embed_tokens"], log=lambda s: None)
    before = {n: student.get_submodule(n).weight.detach().clone() for n in report.masks}
    tc = TrainConfig(max_steps=3, batch_size=2, lr=1e-2, warmup_steps=1, losses={"forward_kl": 1.0},
                     checkpoint_every=0, val_batches=1, chunk_size=64)
    out = mask_preserving_finetune(student, teacher, report.masks, ids, ids[:2], tc, tmp_path / "ck",
                                   log=lambda s: None)
    model = out["model"]
    changed = False
    for n, keep in report.masks.items():
        w = model.get_submodule(n).weight.detach()
        assert (w[~keep] == 0).all()
        changed |= not torch.equal(w, before[n])
    assert changed


def test_experiment_driver_quick(tmp_path):
    sys.path.insert(0, str(REPO / "experiments"))
    import prune_quant

    results = prune_quant.main(["--quick", "--out", str(tmp_path), "--data-dir", str(tmp_path / "none"),
                                "--variants", "dense,sparsegpt_2:4,sparsegpt_2:4+ft,int4_g128_gptq,"
                                "sparsegpt_2:4+int4_g128_gptq"])
    rows = results["tiny"]
    assert set(rows) == {"dense", "sparsegpt_2:4", "sparsegpt_2:4+ft", "int4_g128_gptq",
                         "sparsegpt_2:4+int4_g128_gptq"}
    assert rows["sparsegpt_2:4"]["2:4_holds"] and rows["sparsegpt_2:4+ft"]["2:4_holds"]
    assert rows["sparsegpt_2:4+int4_g128_gptq"]["zeros_kept"]
    assert all(r["ppl"] > 1 for r in rows.values())
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["results"]["tiny"]) == set(rows)
    assert (Path(tmp_path) / "results.md").is_file()


@pytest.mark.parametrize("stage,override,key", [
    ("quantize", "quantize.group_size=100", "quantize.group_size"),   # divides no in_features (64, 128)
    ("prune", "prune.structure=3:7", "prune.structure"),              # 7 divides no in_features
])
def test_a_setting_that_fits_no_linear_fails_before_any_work(tiny_teacher, tmp_path, stage, override, key):
    run = tmp_path / "run"
    r = run_cli(f"stage={stage}", f"run={run}", f"input={tiny_teacher}", "logging=none", "device=cpu", override,
                *(CALIB if stage == "prune" else QCALIB))
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "nothing to compress" in lines[0], lines
    assert "block 1/" not in r.stdout and not (run / stage).exists()


def test_a_skip_list_that_leaves_nothing_is_an_error_before_any_work():
    model = tiny()
    with pytest.raises(ShrinkError, match="quantize.skip: leaves no linear to compress"), config_section("quantize"):
        compress_model(model, [RTN(scheme=QuantSpec(8, None))], None, torch.device("cpu"),
                       skip=["lm_head", "*embed_tokens", "model.layers.*"], log=lambda s: None)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())

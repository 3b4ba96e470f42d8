"""Quantization-aware training (the training knob `qat`): the student's linears train through the quantize
stage's own grid, then are snapped onto it, so that the trained artifact already is the quantized model (in
bf16; symmetric grids keep one scale anchor a group off it, see snap_weight) and stage=quantize with the same
scheme finds the trained codes again.

- `fake_quantize(w, spec)`: the forward sees rtn's dequantized weight (quant.py's compute_qparams from the
  detached weight, quantize, dequantize: nothing of the grid is re-derived here); the gradient passes straight
  through the rounding to the latent weight (STE).
- `FakeQuantLinear`: an nn.Linear whose forward uses it. A linear becomes one by a class swap in place: same
  parameters, same state-dict keys, so checkpoints, the optimizer and DDP see the same tensors, and
  torch.compile's guard on the module's class recompiles a compiled layer once, when QAT switches on.
- `snap_weight`: the weight the artifact keeps; `FakeQuantizer`: train/loop.py's `FakeQuant` (which linears,
  attach, snap). The loop lives below shrink, so a stage hands it one (`fake_quantizer(tc.qat, save_dtype)`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import SettingError
from shrink.compress.calibration import DEFAULT_SKIP, Plan, plan_compression
from shrink.compress.methods.rtn import RTN
from shrink.compress.quant import compute_qparams, dequantize, quantize, rtn
from shrink.compress.scheme import QATSettings, QuantSpec
from shrink.modeling import resolve_dtype
from train.modules import causal_lm

MAX_SNAP_PASSES = 64  # an asymmetric grid settles in 1-3 passes at 4 bits, up to ~20 at 8 (scales move by ulps)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """rtn's dequantized `w` (scales from the detached weight) in value, the identity in gradient: the grid
    plus (w - w.detach()), which is exactly zero, so the forward is the grid bit for bit (w + (grid - w).detach()
    would be off by an ulp wherever the two roundings differ)."""
    latent = w.detach()
    scale, zero = compute_qparams(latent, spec)
    grid = dequantize(quantize(latent, scale, zero, spec), scale, zero, spec).to(w.dtype)
    return grid + (w - latent)


class FakeQuantLinear(nn.Linear):
    """An nn.Linear (made by `attach`, undone by `detach`) whose forward sees its weight on `qat_spec`'s grid."""

    qat_spec: QuantSpec

    @staticmethod
    def attach(linear: nn.Linear, spec: QuantSpec) -> None:
        if type(linear) not in (nn.Linear, FakeQuantLinear):
            raise TypeError(f"QAT fake-quantizes plain nn.Linear modules, got {type(linear).__name__}")
        linear.__class__ = FakeQuantLinear
        linear.qat_spec = spec

    @staticmethod
    def detach(linear: nn.Linear) -> None:
        if type(linear) is FakeQuantLinear:
            linear.__class__ = nn.Linear
            del linear.qat_spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize(self.weight, self.qat_spec), self.bias)


def snap_weight(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, int]:
    """(`w` [out, in] on `spec`'s grid, fp32; how many weights stay off it as scale anchors), such that the
    quantize stage's rtn computes the codes, zero points and scales of rtn of `w`: the training's last
    fake-quantized forward.

    Asymmetric: the grid values themselves, re-quantized until they are a fixed point (a first pass can move a
    group's scale by an ulp, and with it every value of the group), so rtn of the result is the result, bit for
    bit in fp32. Symmetric min-max grids have no fixed point: the scale is absmax / ((2^b - 1) / 2), half a step
    beyond the top code, so re-quantizing grid values rescales them (most int4 weights move). There, and in an
    asymmetric group where a rounding tie at an extreme left one of the extreme codes unused (the grid values'
    own min-max grid is then another), the group keeps its scale anchors at their latent values: the weights
    that set its min and max (and any whose grid value lies beyond them). rtn then computes exactly the
    training's scales, zero points and codes; an anchor is off the grid by up to half a step, about one weight a
    group. Saved in bf16 a value moves by at most 2^-9 of itself, far less than half an int4 step, so the codes
    hold, but for anchors on a rounding tie: a negative symmetric absmax sits at exactly -(2^b - 1)/2 steps, so
    its code (-8 or -7 at int4) is float noise, in training as in the quantize stage, and bf16 can resolve it the
    other way (one anchor in six on an H200, 0.3% of int4 g64 codes; `codes_changed` counts them; against the
    artifact, which holds the anchor between the two codes, either is half a step). Computed where `w` lives
    (CUDA divides by a Python scalar as a product with its reciprocal, which moves such ties), so quantize on the
    device type that trained."""
    w = w.detach().float()
    trained = rtn(w, spec)
    grid = trained.dequantize()
    out, inp = w.shape
    shape = (out, spec.groups(inp), -1)
    wg, gg = w.reshape(shape), grid.reshape(shape)
    lo, hi = wg.amin(dim=-1, keepdim=True).clamp(max=0.0), wg.amax(dim=-1, keepdim=True).clamp(min=0.0)
    if spec.symmetric:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    anchor = (wg == lo) | (wg == hi) | (gg < lo) | (gg > hi)
    anchored = torch.where(anchor, wg, gg)
    if spec.symmetric:
        return anchored.reshape(out, inp), int(anchor.sum())
    for _ in range(MAX_SNAP_PASSES):
        again = rtn(grid, spec).dequantize()
        if torch.equal(again, grid):
            break
        grid = again
    fixed = rtn(grid, spec)
    same = ((fixed.q == trained.q).reshape(shape).all(dim=-1) & (fixed.zero == trained.zero)).unsqueeze(-1)
    snapped = torch.where(same, grid.reshape(shape), anchored)
    return snapped.reshape(out, inp), int((anchor & ~same).sum())


def codes_changed(snapped: torch.Tensor, latent: torch.Tensor, spec: QuantSpec, dtype: torch.dtype) -> int:
    """How many of rtn's codes for `snapped` as saved in `dtype` differ from the training's (rtn of `latent`)."""
    return int((rtn(snapped.to(dtype).float(), spec).q != rtn(latent.float(), spec).q).sum())


class FakeQuantizer:
    """train/loop.py's FakeQuant for one `qat` setting: the linears the quantize stage compresses (its default
    skip list; a linear the group size does not divide is left dense, as on_indivisible=skip leaves it),
    fake-quantized from `start_step` on, snapped at the end; `dtype`: the artifact's, in which the record counts
    the codes that saving it moves (codes_changed)."""

    def __init__(self, settings: QATSettings, dtype: torch.dtype | str = torch.float32) -> None:
        self.settings, self.dtype = settings, resolve_dtype(dtype)
        self.names: list[str] = []
        self.left_dense = ""

    def start_step(self, max_steps: int) -> int:
        return self.settings.start_step(max_steps)

    def prepare(self, model: nn.Module) -> str:
        """Choose the linears of `model` (a SettingError naming qat.group_size when none fits); a log line."""
        spec = self.settings.spec
        try:
            plan = plan_compression(causal_lm(model), [RTN(scheme=spec)], list(DEFAULT_SKIP), "skip")
        except SettingError as e:
            raise e.in_section("qat") from None
        self.names = [f"model.layers.{i}.{name}" for i, names in enumerate(plan.linears) for name in names]
        self.left_dense = Plan([], {n: r for n, r in plan.skipped.items() if r != "in skip"}).skipped_line()
        return f"QAT {spec.describe()} on {len(self.names)} linears" + (
            f" (left dense: {self.left_dense})" if self.left_dense else "")

    def _linears(self, model: nn.Module) -> list[nn.Linear]:
        lm = causal_lm(model)
        return [lm.get_submodule(name) for name in self.names]

    def attach(self, model: nn.Module) -> None:
        for linear in self._linears(model):
            FakeQuantLinear.attach(linear, self.settings.spec)

    @torch.no_grad()
    def snap(self, model: nn.Module) -> dict[str, Any]:
        """Every chosen linear's weight onto the grid (snap_weight) and back to a plain nn.Linear; the record
        the artifact keeps (metrics.qat)."""
        spec, anchors, changed = self.settings.spec, 0, 0
        for linear in self._linears(model):
            FakeQuantLinear.detach(linear)
            snapped, n = snap_weight(linear.weight, spec)
            changed += codes_changed(snapped, linear.weight, spec, self.dtype)
            anchors += n
            linear.weight.copy_(snapped)
        return {**self.settings.record(), "linears": len(self.names), "left_dense": self.left_dense,
                "snapped": True, "saved_dtype": str(self.dtype).removeprefix("torch."), "scale_anchors": anchors,
                "codes_changed": changed}


def fake_quantizer(qat: Any, dtype: torch.dtype | str = torch.float32) -> FakeQuantizer | None:
    """The FakeQuantizer of a training section's `qat` value (None when off), checked."""
    settings = QATSettings.from_cfg(qat)
    return None if settings is None else FakeQuantizer(settings, dtype)

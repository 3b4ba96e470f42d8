"""The sequential calibration driver (hooks, true-sequential groups, block-output propagation)
against a direct computation: each linear's input statistics recomputed by running the *whole*
model from the token ids, with every linear calibrated before it already compressed.

The method used is a small Wanda-style pruner written here: it records the exact X^T X of its
inputs and prunes 2:4 by |W| * ||X||, so every compressed linear changes what the later ones see.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from shrink.compress.calibration import Report, compress_model
from shrink.compress.sparsity import nm_keep_mask
from support import tiny_llama_config

SKIP = ["lm_head", "*embed_tokens"]
GROUPS = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]


class Gram:
    """X^T X of everything a linear received (float64)."""

    def __init__(self, d: int) -> None:
        self.xtx = torch.zeros(d, d, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.xtx += x.t() @ x


def prune_by_gram(w: torch.Tensor, xtx: torch.Tensor) -> torch.Tensor:
    """2:4 keep mask by |W_ij| * ||X_j||."""
    return nm_keep_mask(w.abs().double() * xtx.diagonal().sqrt().unsqueeze(0), 2, 4)


class RecordingPruner:
    needs_data = True

    def __init__(self, true_sequential: bool) -> None:
        self.true_sequential = true_sequential
        self.grams: dict[str, torch.Tensor] = {}
        self.order: list[list[str]] = []

    def misfit(self, linear: nn.Linear) -> None:
        return None

    def new_stat(self, name: str, linear: nn.Linear, total_tokens: int) -> Gram:
        return Gram(linear.in_features)

    @torch.no_grad()
    def apply(self, block: nn.Module, prefix: str, names: list[str], stats: dict, report: Report) -> None:
        self.order.append([f"{prefix}.{n}" for n in names])
        for name in names:
            linear = block.get_submodule(name)
            self.grams[f"{prefix}.{name}"] = stats[name].xtx.clone()
            keep = prune_by_gram(linear.weight, stats[name].xtx)
            linear.weight.mul_(keep.to(linear.weight.dtype))
            report.masks[f"{prefix}.{name}"] = keep


def linear_names(block: nn.Module) -> list[str]:
    return [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def direct_grams(model: nn.Module, ids: torch.Tensor, true_sequential: bool) -> dict[str, torch.Tensor]:
    """The statistics the driver must produce, without its machinery: for each block in order and
    each group (all of the block's linears at once when not true-sequential), run the full model on
    all the ids with hooks on the group's linears, then prune the group the same way."""
    grams: dict[str, torch.Tensor] = {}
    for i, block in enumerate(model.model.layers):
        names = linear_names(block)
        groups = [[n for n in names if n.rsplit(".", 1)[-1] in g] for g in GROUPS] if true_sequential else [names]
        for group in groups:
            found: dict[str, Gram] = {n: Gram(block.get_submodule(n).in_features) for n in group}
            handles = [block.get_submodule(n).register_forward_hook(
                lambda _m, args, _o, g=found[n]: g.add(args[0])) for n in group]
            model(input_ids=ids, use_cache=False)
            for h in handles:
                h.remove()
            for n in group:
                lin = block.get_submodule(n)
                grams[f"model.layers.{i}.{n}"] = found[n].xtx
                lin.weight.mul_(prune_by_gram(lin.weight, found[n].xtx).to(lin.weight.dtype))
    return grams


@pytest.mark.parametrize("true_sequential", [True, False])
def test_driver_calibrates_each_linear_on_the_compressed_model_before_it(true_sequential):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(num_hidden_layers=3)).double().eval()
    reference = copy.deepcopy(model)
    ids = torch.randint(3, 320, (6, 24), generator=torch.Generator().manual_seed(1))

    method = RecordingPruner(true_sequential)
    compress_model(model, [method], ids, torch.device("cpu"), skip=SKIP, batch_size=4, log=lambda s: None)
    expected = direct_grams(reference, ids, true_sequential)

    assert sorted(method.grams) == sorted(expected)
    for name, gram in expected.items():
        torch.testing.assert_close(method.grams[name], gram, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")
    for name, p in reference.named_parameters():
        assert torch.equal(model.get_parameter(name), p), name
    # The groups the driver handed to the method, in order.
    if true_sequential:
        assert [len(g) for g in method.order] == [3, 1, 2, 1] * 3
    else:
        assert [len(g) for g in method.order] == [7] * 3

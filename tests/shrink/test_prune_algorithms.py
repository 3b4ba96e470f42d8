"""Pruning algorithms on tiny layers: masks, Wanda and SparseGPT against direct implementations
of the papers' rules."""

from __future__ import annotations

import pytest
import torch

from common.errors import ShrinkError, config_section
from shrink.compress.hessian import Hessian
from shrink.compress.methods.sparsegpt import sparsegpt_prune
from shrink.compress.methods.wanda import InputNorms, wanda_prune
from shrink.compress.sparsity import SparsitySpec, is_nm_sparse, magnitude_prune, nm_keep_mask


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    scales = torch.rand(d, generator=g) * 3 + 0.1  # uneven feature magnitudes, as in LLMs
    return (torch.randn(n, d, generator=g) @ mix) * scales


def test_nm_mask_pattern_and_ties_prune_lower_index_first():
    score = torch.tensor([[1.0, 1.0, 1.0, 1.0, 4.0, 3.0, 2.0, 1.0]])
    keep = nm_keep_mask(score, 2, 4)
    # All four tie in the first group: the two lowest indices go.
    assert keep.tolist() == [[False, False, True, True, True, True, False, False]]
    w = torch.randn(16, 32)
    assert is_nm_sparse(w * nm_keep_mask(w.abs(), 2, 4), 2, 4)
    assert not is_nm_sparse(w, 2, 4)


def test_bad_structure_names_the_key():
    with pytest.raises(ShrinkError, match="prune.structure"), config_section("prune"):
        SparsitySpec("two:four")
    with pytest.raises(ShrinkError, match="prune.ratio"), config_section("prune"):
        SparsitySpec("unstructured", ratio=1.5)


def test_wanda_matches_the_papers_rule():
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    x = correlated_inputs(200, 16)
    stat = InputNorms(16, torch.device("cpu"))
    stat.add(x[:120])
    stat.add(x[120:])
    keep = wanda_prune(w, stat.norms(), SparsitySpec("2:4"))
    # Direct: S_ij = |W_ij| * ||X_j||_2; in each row, each group of 4 inputs drops its 2 lowest.
    norms = torch.linalg.vector_norm(x, dim=0)
    for i in range(6):
        for g in range(4):
            cols = list(range(4 * g, 4 * g + 4))
            scores = [abs(w[i, j].item()) * norms[j].item() for j in cols]
            pruned = sorted(range(4), key=lambda k: scores[k])[:2]
            assert [not keep[i, cols[k]].item() for k in range(4)] == [k in pruned for k in range(4)]
    keep_u = wanda_prune(w, stat.norms(), SparsitySpec("unstructured", 0.25))
    assert (keep_u.sum(dim=1) == 12).all()  # per-row comparison group


def direct_sparsegpt(w: torch.Tensor, h: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    """The paper's rule with explicit inverses, column by column: for remaining columns F = {j..},
    saliency w_j^2 / [H_F^-1]_jj picks the mask (at each N:M group start, or once up front for
    unstructured), and removing w_j updates W_F -= w_j / [H_F^-1]_jj * [H_F^-1]_j,: (OBS)."""
    w = w.double().clone()
    h = h.double()
    cols = w.shape[1]
    keep = torch.ones_like(w, dtype=torch.bool)

    def hinv(j: int) -> torch.Tensor:
        return torch.linalg.inv(h[j:, j:])

    if not spec.semi_structured:
        d = torch.tensor([hinv(j)[0, 0].item() for j in range(cols)], dtype=torch.float64)
        sal = (w.pow(2) / d).flatten()
        k = int(sal.numel() * spec.ratio)
        keep.view(-1)[torch.sort(sal, stable=True).indices[:k]] = False
    n, m = spec.nm if spec.semi_structured else (0, 1)
    for j in range(cols):
        if spec.semi_structured and j % m == 0:
            d = torch.tensor([hinv(j + k)[0, 0].item() for k in range(m)], dtype=torch.float64)
            sal = w[:, j:j + m].pow(2) / d
            keep[:, j:j + m] = nm_keep_mask(sal, n, m)
        hi = hinv(j)
        removed = torch.where(keep[:, j], torch.zeros_like(w[:, j]), w[:, j])
        w[:, j:] -= (removed / hi[0, 0]).unsqueeze(1) * hi[0].unsqueeze(0)
    return (w * keep).float()


def damped_hessian(x: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    h = 2 * x.t() @ x / x.shape[0]
    return h + damp * torch.diag(h).mean() * torch.eye(h.shape[0])


@pytest.mark.parametrize("structure,block", [("2:4", 8), ("2:4", 128), ("unstructured", 128)])
def test_sparsegpt_matches_direct_obs(structure, block):
    torch.manual_seed(1)
    d = 24
    w = torch.randn(5, d)
    x = correlated_inputs(400, d, seed=2)
    stat = Hessian(d, torch.device("cpu"))
    stat.add(x)
    spec = SparsitySpec(structure, 0.5)
    ours, keep = sparsegpt_prune(w, stat.matrix(), spec, damp=0.01, block_size=block)
    ref = direct_sparsegpt(w, damped_hessian(x.double()).float(), spec)
    assert torch.equal(ours == 0, ref == 0)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-3)
    if spec.semi_structured:
        assert is_nm_sparse(ours)


def test_sparsegpt_beats_wanda_beats_magnitude_on_reconstruction():
    torch.manual_seed(3)
    d = 64
    w = torch.randn(32, d)
    x = correlated_inputs(2000, d, seed=4)
    ref = x @ w.t()
    h = Hessian(d, torch.device("cpu"))
    h.add(x)
    norms = InputNorms(d, torch.device("cpu"))
    norms.add(x)
    spec = SparsitySpec("2:4")
    err = {
        "magnitude": (x @ (w * magnitude_prune(w, spec)).t() - ref).pow(2).mean(),
        "wanda": (x @ (w * wanda_prune(w, norms.norms(), spec)).t() - ref).pow(2).mean(),
        "sparsegpt": (x @ sparsegpt_prune(w, h.matrix(), spec)[0].t() - ref).pow(2).mean(),
    }
    assert err["sparsegpt"] < err["wanda"] < err["magnitude"]

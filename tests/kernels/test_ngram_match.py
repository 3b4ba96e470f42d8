"""kernels/ngram_match.py: the device n-gram lookup (the torch reference and the Triton kernel, interpreted on
the CPU) equals engine/spec_decode/ngram.py's ngram_proposal (the spec) row by row, on random contexts of small
alphabets (many matches, overlaps with the suffix, contexts shorter than the n-grams), garbage past each row's
length, several (min_n, max_n, k), widths across the kernel's blocks; filler past each row's count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.spec_decode.ngram import ngram_proposal
from kernels.ngram_match import ngram_match, ngram_match_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("fn", [ngram_match_ref, ngram_match], ids=["ref", "triton"])
@pytest.mark.parametrize("min_n,max_n,k,width", [(1, 1, 3, 40), (1, 4, 4, 40), (2, 4, 2, 1100), (3, 5, 6, 40),
                                                 (2, 2, 1, 700)])
@pytest.mark.parametrize("alphabet", [2, 3, 7])
def test_device_lookup_equals_the_reference(fn, min_n, max_n, k, width, alphabet):
    g = torch.Generator().manual_seed(min_n * 100 + max_n * 10 + k + alphabet + width)
    b = 24
    hist = torch.randint(0, alphabet, (b, width), generator=g)
    lens = torch.randint(1, width + 1, (b,), generator=g)
    lens[:3] = torch.tensor([1, 2, min_n])  # shorter than any proposal needs
    garbage = torch.randint(100, 200, (b, width), generator=g)
    past = torch.arange(width)[None, :] >= lens[:, None]
    hist = torch.where(past, garbage, hist)  # what lies past a row's length must not matter
    drafts, count = (t.cpu() for t in fn(hist.to(DEVICE), lens.to(DEVICE), min_n, max_n, k))
    assert drafts.shape == (b, k) and count.shape == (b,)
    proposed = 0
    for i in range(b):
        context = hist[i, : lens[i]].numpy()
        ref = ngram_proposal(context, min_n, max_n, k).tolist()
        assert count[i].item() == len(ref), (i, context.tolist())
        assert drafts[i, : len(ref)].tolist() == ref
        assert drafts[i, len(ref):].tolist() == [context[-1]] * (k - len(ref))  # filler: the last token
        proposed += len(ref) > 0
    assert 0 < proposed < b  # both kinds of rows were checked


@pytest.mark.parametrize("fn", [ngram_match_ref, ngram_match], ids=["ref", "triton"])
def test_lengths_beyond_the_width_are_clamped(fn):
    hist = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]])
    drafts, count = (t.cpu() for t in fn(hist.to(DEVICE), torch.tensor([99], device=DEVICE), 1, 3, 3))
    ref = ngram_proposal(np.array([1, 2, 3, 1, 2, 3, 1, 2]), 1, 3, 3).tolist()
    assert count.item() == len(ref) and drafts[0, : len(ref)].tolist() == ref


SM90_COMPILE = """
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from experiments.gemv_sass_count import resources
from kernels import ngram_match as M

sig = {"hist_ptr": "*i64", "lens_ptr": "*i64", "drafts_ptr": "*i64", "count_ptr": "*i64", "width": "i32",
       "stride": "i32"}
constexprs = dict(MIN_N=2, MAX_N=4, K=4, BLOCK_K=4, BLOCK=512)
sig.update({name: "constexpr" for name in constexprs})
kernel = triton.compile(ASTSource(M._ngram_match_kernel, sig, constexprs=constexprs),
                        target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(kernel.asm["cubin"])
    f.flush()
    regs, spill = resources(f.name)
print(regs, spill)
"""


def test_ngram_match_compiles_for_sm90():
    """The kernel compiles for the H200 (sm_90) without spills: the interpreter runs what ptxas may refuse."""
    from test_quant_gemv_fast import _compile_sm90

    regs, spills = map(int, _compile_sm90(SM90_COMPILE).split()[-2:])
    assert 0 < regs <= 255 and spills == 0


@pytest.mark.gpu
def test_kernel_on_the_gpu_equals_the_reference_and_replays_in_a_graph():
    """At the rounds' sizes (16 rows, 2k positions + k + 1) the kernel equals the torch reference, and a CUDA
    graph holding it (as a round's does) replays the same answer for new contents of its input buffers."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(5)
    b, width, k = 16, 2048 + 5, 4
    hist = torch.randint(0, 4, (b, width), generator=g).cuda()
    lens = torch.randint(1, width - k, (b,), generator=g).cuda()
    ref = ngram_match_ref(hist, lens, 2, 4, k)
    got = ngram_match(hist, lens, 2, 4, k)
    assert all(torch.equal(x, y) for x, y in zip(got, ref))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ngram_match(hist, lens, 2, 4, k)
    hist.copy_(torch.randint(0, 3, (b, width), generator=g).cuda())
    lens.copy_(torch.randint(1, width - k, (b,), generator=g).cuda())
    graph.replay()
    ref = ngram_match_ref(hist, lens, 2, 4, k)
    assert all(torch.equal(x, y) for x, y in zip(out, ref))

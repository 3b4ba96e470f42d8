"""What prompt logprobs cost the host: a prompt-logprob request runs in the steps a plain prefill of
the same prompt takes, and its entries reach the host in one transfer per step of a few numbers per
prompt token, never a vocabulary-wide row. (On an H200 a copy and a sync per request and a host
pass over the vocabulary per prompt token made CommonsenseQA's 2,500 scoring requests take 40-330 s
where their prefill takes seconds.) Counted, not timed."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, prompts

from engine import LLM, SamplingParams

ARCH = "llama_gqa_untied"
TOP_N = 2
NUM_REQUESTS = 40


class HostReads:
    """Every read of tensor data into Python or a CPU copy: its element count."""

    METHODS = ("tolist", "item", "cpu", "numpy", "__float__", "__int__", "__bool__")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        self.on = False
        for name in self.METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(getattr(torch.Tensor, name)))

    def _counted(self, method):
        def read(t: torch.Tensor, *args, **kwargs):
            if self.on:
                self.sizes.append(t.numel())
            return method(t, *args, **kwargs)

        return read

    def during(self, run):
        self.sizes, self.on = [], True
        try:
            result = run()
        finally:
            self.on = False
        return result, list(self.sizes)


def test_prompt_logprob_requests_cost_the_steps_and_host_reads_of_a_plain_prefill(model_dir, monkeypatch):
    llm = LLM(model_dir(ARCH, with_tokenizer=True), device="cpu", max_model_len=128, max_num_seqs=64,
              block_size=4)
    engine = llm.engine
    batch = prompts(NUM_REQUESTS, seed=7, lo=8, hi=40)
    tokens = sum(len(p) for p in batch)
    reads = HostReads(monkeypatch)

    def run(params: SamplingParams):
        engine.block_manager.reset_prefix_cache()
        steps = engine.num_steps
        outs, sizes = reads.during(lambda: llm.generate(batch, params))
        return outs, sizes, engine.num_steps - steps

    _, plain, plain_steps = run(SamplingParams(temperature=0.0, max_tokens=1))
    outs, scored, scored_steps = run(SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=TOP_N))

    assert all(len(o.prompt_logprobs) == len(p) for o, p in zip(outs, batch))  # every prompt token scored
    assert scored_steps == plain_steps <= 2  # admitted together, not one prompt-logprob request a step
    assert len(scored) - len(plain) <= scored_steps  # one transfer a step, not one a request or token
    per_token = 2 + 2 * TOP_N  # logprob and rank of the prompt token, the top-n values and ids
    assert per_token < VOCAB
    assert sum(scored) - sum(plain) <= tokens * per_token  # no vocabulary-wide row reaches the host

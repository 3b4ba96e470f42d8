"""The decode graphs' host side (engine/cuda_graphs.py, engine/model_runner.py) checked on the CPU:
each graph is replaced by an eager replay of what it captured (the forward over its bucket's rows
of the staging buffer; with multi-step, also the greedy advance). Buckets larger than the batch
(padding rows), batches shrinking as sequences finish, and multi-step replays must give the tokens
of the plain eager engine."""

from __future__ import annotations

import torch
from tiny_models import prompts

from engine import LLM, SamplingParams
from engine.context import reset_context, set_context
from engine.cuda_graphs import DecodeGraphs


class EagerReplay:
    def __init__(self, graphs: DecodeGraphs, bs: int, step: bool) -> None:
        self.graphs, self.bs, self.step = graphs, bs, step

    def replay(self) -> None:
        g, bs = self.graphs, self.bs
        ids, pos, ctx = g.inputs.views(bs)
        set_context(ctx)
        with torch.inference_mode():
            logits = g.model.compute_logits(g.model(ids, pos))
            if self.step:
                g.inputs.advance(logits, bs, g.inputs.step_tokens(g.num_steps, bs))
            else:
                g.logits[bs] = logits.float()
        reset_context()


def test_graph_replays_give_the_eager_tokens(model_dir):
    path = model_dir("llama_gqa_untied")
    ps = prompts(7, seed=12, lo=2, hi=12)
    params = [SamplingParams(temperature=0.0, max_tokens=5 + 4 * i, ignore_eos=True) for i in range(len(ps))]
    kw = dict(device="cpu", max_model_len=128, block_size=4, max_num_seqs=8, enable_prefix_caching=False)
    for steps in (1, 4):
        want = LLM(path, **kw, num_decode_steps=steps).generate(ps, params)
        llm = LLM(path, **kw, num_decode_steps=steps)
        runner = llm.engine.runner
        graphs = DecodeGraphs(runner.model, runner.decode_inputs, 8, steps)
        for bs in graphs.buckets:
            graphs.graphs[bs] = EagerReplay(graphs, bs, step=False)
            if steps > 1:
                graphs.step_graphs[bs] = EagerReplay(graphs, bs, step=True)
        runner.graphs = graphs
        replayed = []
        inner = graphs.forward if steps == 1 else graphs.step

        def counting(n_or_rows):
            replayed.append(n_or_rows)
            return inner(n_or_rows)

        if steps == 1:
            graphs.forward = counting
        else:
            graphs.step = counting
        got = llm.generate(ps, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert replayed and len(set(replayed)) > 1  # the batch shrank into other buckets
        if steps > 1:
            assert llm.engine.num_multi_steps > 0 and 8 in replayed  # 7 sequences ran in the bucket of 8

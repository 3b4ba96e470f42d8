"""The offline API: LLM(path, **EngineConfig).generate(prompts, params)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Sequence as Seq

import numpy as np
import torch

from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine, Prompt
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams, is_integer


def _is_one_prompt(prompts: Any) -> bool:
    """Text, a dict, or a flat sequence of token ids is one prompt; anything else a list of them."""
    if isinstance(prompts, (str, Mapping)):
        return True
    if isinstance(prompts, np.ndarray):
        return prompts.ndim == 1
    return isinstance(prompts, (list, tuple)) and len(prompts) > 0 and is_integer(prompts[0])


def _per_prompt_params(sampling_params: Any, n: int) -> list[Any]:
    if sampling_params is None:
        return [SamplingParams()] * n
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * n
    if not isinstance(sampling_params, (list, tuple)):
        hint = "; write SamplingParams(**params)" if isinstance(sampling_params, Mapping) else ""
        raise InvalidRequestError(
            "sampling_params",
            f"expected SamplingParams or a list of them (one per prompt), got {type(sampling_params).__name__}{hint}",
        )
    if len(sampling_params) != n:
        raise InvalidRequestError("sampling_params", f"{n} prompts but {len(sampling_params)} sampling params")
    return list(sampling_params)


class LLM:
    def __init__(self, model: str, **kwargs: Any) -> None:
        self.engine = LLMEngine(model, **kwargs)

    def close(self) -> None:
        """Stop the engine's tensor-parallel workers, if any."""
        self.engine.close()

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the model's weights in place by a live Hugging Face model's (``named_parameters()``
        of the same architecture), verified as a checkpoint is (every parameter exactly once, shapes
        checked: one error naming every problem, before any copy). Cached prefixes are forgotten
        (their K/V came from the old weights). Not while requests are running."""
        engine = self.engine
        if engine.has_unfinished_requests():
            raise RuntimeError("update_weights: requests are still running")
        engine.runner.model.update_weights(named_tensors)
        engine.block_manager.reset_prefix_cache()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run all prompts together under continuous batching; outputs come back in input order.

        A prompt is text, token ids (any integer type), ``{"prompt": text}`` or
        ``{"prompt_token_ids": ids}``; one prompt or a list. ``sampling_params`` is one
        SamplingParams for all or a list of them, one per prompt (a dict is refused: write
        ``SamplingParams(**params)``).

        Every request is validated before any is added. A bad request fails alone: its
        RequestOutput has ``error`` set (the message names the field; an unexpected exception
        while reading it is reported the same way) and ``finish_reason == "error"``; the others
        run normally. So does a request that fails inside a step (see ``LLMEngine.step``); a
        failure of the engine itself aborts every request of the call and raises.
        """
        if _is_one_prompt(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        params_list = _per_prompt_params(sampling_params, len(prompts))
        engine = self.engine
        results: list[RequestOutput | None] = [None] * len(prompts)
        accepted: list[tuple[int, list[int], SamplingParams]] = []
        for i, (prompt, params) in enumerate(zip(prompts, params_list)):
            try:
                accepted.append((i, *engine.prepare(prompt, params)))
            except Exception as e:
                error = str(e) if isinstance(e, InvalidRequestError) else f"invalid request: {type(e).__name__}: {e}"
                results[i] = RequestOutput(f"gen-{id(results)}-{i}", [], finished=True, finish_reason="error", error=error)
        ids: dict[str, int] = {}
        try:
            for i, token_ids, params in accepted:
                ids[engine.add_prepared(token_ids, params, f"gen-{id(results)}-{i}")] = i
            while engine.has_unfinished_requests():
                for seq in engine.step():
                    if seq.is_finished and seq.request_id in ids:
                        results[ids[seq.request_id]] = engine.output(seq)
                        engine.pop_finished(seq.request_id)
        except BaseException:
            for request_id in ids:
                engine.abort_request(request_id)
            raise
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

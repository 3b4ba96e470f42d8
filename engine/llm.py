"""The offline API: LLM(path, **EngineConfig).generate(prompts, params)."""

from __future__ import annotations

from typing import Any, Sequence as Seq

from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, **kwargs: Any) -> None:
        self.engine = LLMEngine(model, **kwargs)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | Seq[str | list[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run all prompts together under continuous batching; outputs come back in input order.

        A bad request fails alone: its RequestOutput has ``error`` set (the InvalidRequestError
        message, naming the field) and ``finish_reason == "error"``; the others run normally.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt (text or token ids)
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling_params)} sampling params")
        engine = self.engine
        results: list[RequestOutput | None] = [None] * len(prompts)
        ids: dict[str, int] = {}
        for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            request_id = f"gen-{id(results)}-{i}"
            try:
                engine.add_request(prompt, params, request_id)
                ids[request_id] = i
            except InvalidRequestError as e:
                token_ids = list(prompt) if isinstance(prompt, list) else []
                results[i] = RequestOutput(request_id, token_ids, finished=True, finish_reason="error", error=str(e))
        try:
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

"""shrink's inference engine: paged KV cache, continuous batching, Triton attention, CUDA graphs.

    from engine import LLM, SamplingParams
    llm = LLM("path/to/hf_dir", max_model_len=2048)            # any EngineConfig field as a keyword
    outs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(temperature=0, max_tokens=32))

A prompt is text, token ids (any integer type, numpy's included), ``{"prompt": text}`` or
``{"prompt_token_ids": ids}``, as in vLLM; ``generate`` takes one prompt or a list, and one
SamplingParams or a list (one per prompt). A dict is refused as sampling params, with an error
that names its type and says ``SamplingParams(**params)``: one explicit conversion, where a typo
in a key is a TypeError at the caller's line.

``generate`` returns one RequestOutput per prompt, in order. A bad request (empty prompt, prompt of
max_model_len tokens or more, max_tokens < 1, top_p outside (0, 1], negative temperature, ...) does
not raise: its output has ``error`` (the message names the field) and ``finish_reason == "error"``,
and the other requests run normally; so does a request that fails inside a step. ``LLMEngine.add_request`` and ``AsyncLLM.generate`` raise
InvalidRequestError (``.field``) for that request alone.

``AsyncLLM(path).generate(prompt, params)`` is an async iterator of RequestDelta (new tokens and
text); leaving it early aborts the request and frees its KV blocks.
"""

from engine.async_llm import AsyncLLM
from engine.config import EngineConfig
from engine.errors import InvalidRequestError, RequestFailedError
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.outputs import RequestDelta, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = [
    "LLM", "LLMEngine", "AsyncLLM", "EngineConfig", "SamplingParams", "RequestOutput", "RequestDelta",
    "InvalidRequestError", "RequestFailedError",
]

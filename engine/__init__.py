"""shrink's inference engine: paged KV cache, continuous batching, Triton attention, CUDA graphs."""

from engine.async_llm import AsyncLLM
from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.outputs import RequestDelta, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = [
    "LLM", "LLMEngine", "AsyncLLM", "EngineConfig", "SamplingParams", "RequestOutput", "RequestDelta",
    "InvalidRequestError",
]

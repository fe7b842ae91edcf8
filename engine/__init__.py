"""A GPT-2 inference engine on a paged KV cache: plain Python + PyTorch, no Ray inside.

Start reading at ``llm_engine.LLMEngine.step``: schedule, execute, update.
"""

from engine.async_llm import AsyncLLM
from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = [
    "AsyncLLM", "CompletionOutput", "EngineConfig", "InvalidRequestError", "LLM", "LLMEngine", "RequestOutput",
    "SamplingParams",
]

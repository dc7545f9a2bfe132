"""asyncllm: an asyncio-native LLM inference engine."""
from asyncllm.config import EngineConfig
from asyncllm.engine.async_engine import AsyncEngine, StreamChunk, Usage
from asyncllm.errors import (
    EngineDeadError,
    EngineShutdownError,
    InvalidRequestError,
    ModelNotFoundError,
    OutOfMemoryError,
)
from asyncllm.llm import LLM
from asyncllm.outputs import GenerateOutput
from asyncllm.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "AsyncEngine",
    "EngineDeadError",
    "EngineShutdownError",
    "StreamChunk",
    "Usage",
    "EngineConfig",
    "GenerateOutput",
    "InvalidRequestError",
    "ModelNotFoundError",
    "OutOfMemoryError",
    "SamplingParams",
]

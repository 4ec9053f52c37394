"""The llama.cpp continuous-batching engine."""

from llamaserve.engine.engine import Engine, EngineOverloaded, EngineStats, InvalidPrompt, RequestHandle
from llamaserve.engine.llama import ContextConfig, LlamaError, LlamaModel
from llamaserve.engine.sampling import SamplingParams
from llamaserve.engine.sequence import Output

__all__ = [
    "ContextConfig",
    "Engine",
    "EngineOverloaded",
    "EngineStats",
    "LlamaError",
    "LlamaModel",
    "Output",
    "InvalidPrompt",
    "RequestHandle",
    "SamplingParams",
]

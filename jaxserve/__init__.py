"""jaxserve: iteration-level, preemptive, preemption-tolerant LLM serving in JAX."""
from jaxserve.engine.engine import Engine, EngineConfig
from jaxserve.engine.outputs import CompletionOutput, RequestOutput
from jaxserve.llm import LLM
from jaxserve.sampling_params import SamplingParams

__all__ = ["CompletionOutput", "Engine", "EngineConfig", "LLM", "RequestOutput", "SamplingParams"]

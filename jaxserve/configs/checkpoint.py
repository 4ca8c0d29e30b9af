"""The default config serving a checkpoint given by path: `--config=.../checkpoint.py:PATH`.

PATH is a GGUF file, a Hugging Face directory (config.json) or a jaxserve checkpoint (model.json),
local or a bucket URL; the format follows from what is there (jaxserve.configs.checkpoint_format).
"""
from jaxserve.config import default_config


def get_config(path: str = ""):
    from jaxserve.configs import checkpoint_format

    if not path:
        raise ValueError("checkpoint.py needs a path: --config=.../checkpoint.py:PATH")
    c = default_config()
    c.checkpoint.format = checkpoint_format(path)
    c.checkpoint.path = path
    return c

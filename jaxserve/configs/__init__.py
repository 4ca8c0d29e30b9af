"""The packaged configs, and what a MODEL argument names: a config file, a checkpoint, or one of these.

`jaxserve serve MODEL` and `LLM(model=MODEL)` accept
- a config file (`.py`, local or a URL): its `get_config()`;
- a packaged config by name (`tiny`, or `pkg:tiny`): `jaxserve/configs/tiny.py`;
- a GGUF file, a Hugging Face directory (`config.json` and safetensors) or a jaxserve
  checkpoint directory: the default config with `checkpoint` pointed at it (`checkpoint.py`).
"""
from __future__ import annotations

import os
import re
from typing import List, Optional, Tuple

FOLDER = os.path.dirname(os.path.abspath(__file__))
DEFAULT = "smollm2_135m"


def names() -> List[str]:
    """The packaged configs' names."""
    return sorted(f[:-3] for f in os.listdir(FOLDER) if f.endswith(".py") and not f.startswith("_")
                  and f != "checkpoint.py")


def config_spec(model: str) -> str:
    """The `--config=` value (`file.py` or `file.py:arg`) that loads MODEL, or a ValueError
    naming it and what it may be."""
    from jaxserve import paths

    name = model[len("pkg:"):] if model.startswith("pkg:") else model
    if name in names():
        return os.path.join(FOLDER, f"{name}.py")
    if model.endswith(".py"):
        return model
    if model.endswith(".gguf") or paths.as_path(model).is_dir():
        checkpoint_format(model)
        return f"{os.path.join(FOLDER, 'checkpoint.py')}:{model}"
    raise ValueError(f"model {model!r}: not a config file (.py), a GGUF file, a checkpoint directory or a "
                     f"packaged config (one of {', '.join(names())})")


def split_spec(spec: str) -> Tuple[str, Optional[str]]:
    """(config file, its `get_config` argument or None) of a `--config=` value, split at its
    first colon as ml_collections splits it (a URL's own `://` is not one)."""
    scheme = re.match(r"[a-z][a-z0-9+.-]*://", spec)
    start = scheme.end() if scheme else 0
    colon = spec.find(":", start)
    return (spec, None) if colon < 0 else (spec[:colon], spec[colon + 1:])


def served_name(spec: str) -> str:
    """The model id a server of this `--config=` value answers to: the config's or checkpoint's name."""
    path, arg = split_spec(spec)
    if os.path.abspath(path) == os.path.join(FOLDER, "checkpoint.py") and arg:
        path = arg.rstrip("/")
    return os.path.splitext(os.path.basename(path))[0]


def checkpoint_format(path: str) -> str:
    """`checkpoint.format` of what is at path (gguf, hf or orbax), or a ValueError naming it."""
    from jaxserve import paths
    from jaxserve.checkpoint import store

    where = paths.as_path(path)
    if path.endswith(".gguf"):
        if not where.exists():
            raise ValueError(f"model {path!r}: no such GGUF file")
        return "gguf"
    if store.is_checkpoint(path):
        return "orbax"
    if (where / "config.json").exists():
        return "hf"
    raise ValueError(f"model {path!r}: a directory with neither a Hugging Face config.json nor a jaxserve "
                     f"{store.MODEL_FILE}")

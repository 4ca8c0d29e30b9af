"""`jaxserve convert MODEL --output=DIR`: a GGUF file or a Hugging Face directory as a jaxserve
orbax/tensorstore checkpoint.

    jaxserve convert smollm2_135m --output=/tmp/smollm2
    python launch/convert.py --config=configs/smollm2_135m.py --output=/tmp/smollm2   # from a checkout
    python launch/convert.py --config=configs/smollm2_135m.py --config.checkpoint.format=hf \
        --config.checkpoint.path=/path/to/hf_dir --output=/tmp/ckpt

The checkpoint holds params in --config.model.dtype; serve it with
--config.checkpoint.format=orbax --config.checkpoint.path=<output>.
"""
import time

from absl import flags
from ml_collections import config_flags

from jaxserve import configs
from jaxserve.config import validate

_CONFIG = config_flags.DEFINE_config_file("config", configs.config_spec(configs.DEFAULT),
                                          "Source model config (`jaxserve convert MODEL` sets it from MODEL).")
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write the checkpoint to.", required=True)


def main(argv):
    del argv
    config = _CONFIG.value
    validate(config)
    from jaxserve.checkpoint import store
    from jaxserve.checkpoint.load import load_host
    if config.checkpoint.format == "orbax":
        raise ValueError("checkpoint.format=orbax is already a jaxserve checkpoint")
    start = time.perf_counter()
    cfg, params, tokenizer = load_host(config.checkpoint, config.model)
    store.save(_OUTPUT.value, cfg, params, tokenizer)
    print(f"wrote {_OUTPUT.value} ({cfg.arch}, {cfg.num_layers} layers, {cfg.dtype}) "
          f"in {time.perf_counter() - start:.1f}s")


"""Generate a streamed answer to one prompt.

    python launch/generate.py --config=configs/smollm2_135m.py --prompt="What is the capital of France?"

Config overrides: --config.model.dtype=bfloat16 --config.sampling.temperature=0.7 ...
"""
import sys

from absl import flags
from ml_collections import config_flags

from jaxserve.cli import run
from jaxserve.config import validate

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smollm2_135m.py", "Model/serving config file.")
_PROMPT = flags.DEFINE_string("prompt", "What is the capital of France?", "The prompt.")
_CHAT = flags.DEFINE_bool("chat", True, "Wrap the prompt in the model's chat template.")


def main(argv):
    del argv
    config = _CONFIG.value
    validate(config)
    from jaxserve.checkpoint.load import load
    from jaxserve.dense_generate import generate_stream
    from jaxserve.parallel.sharding import make_mesh
    from jaxserve.tokenizer import IncrementalDecoder

    mesh = make_mesh(config.mesh.data, config.mesh.model)
    cfg, params, tokenizer = load(config.checkpoint, config.model, mesh)
    if tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer; set --config.checkpoint.tokenizer")
    text = _PROMPT.value
    if _CHAT.value and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
    ids = tokenizer.encode(text)
    s = config.sampling
    decoder = IncrementalDecoder(tokenizer)
    stop = set(tokenizer.eos_token_ids) | set(cfg.eos_token_ids)
    for step_tokens in generate_stream(params, cfg, mesh, [ids], s.max_tokens, temperature=s.temperature,
                                       top_k=s.top_k, top_p=s.top_p, seed=s.seed, stop_token_ids=stop):
        token = int(step_tokens[0])
        if token < 0 or token in stop:
            break
        sys.stdout.write(decoder.push([token]))
        sys.stdout.flush()
    sys.stdout.write("\n")


if __name__ == "__main__":
    run(main)

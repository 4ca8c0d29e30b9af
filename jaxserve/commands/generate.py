"""`jaxserve generate MODEL`: a streamed answer to one prompt.

    jaxserve generate smollm2_135m --prompt="What is the capital of France?"
    python launch/generate.py --config=configs/smollm2_135m.py --prompt=...   # the same, from a checkout

MODEL: a packaged config (`jaxserve --help` lists them), a config file, a GGUF file or a
checkpoint directory (see jaxserve.configs).

Config overrides: --config.model.dtype=bfloat16 --config.sampling.temperature=0.7 ...
"""
import sys

from absl import flags
from ml_collections import config_flags

from jaxserve import configs

_CONFIG = config_flags.DEFINE_config_file("config", configs.config_spec(configs.DEFAULT),
                                          "Model/serving config file (`jaxserve generate MODEL` sets it from MODEL).")
_PROMPT = flags.DEFINE_string("prompt", "What is the capital of France?", "The prompt.")
_CHAT = flags.DEFINE_bool("chat", True, "Wrap the prompt in the model's chat template.")


def main(argv):
    del argv
    config = _CONFIG.value
    from jaxserve import SamplingParams
    from jaxserve.llm import engine_from_config

    engine = engine_from_config(config)
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer; set --config.checkpoint.tokenizer")
    text = _PROMPT.value
    if _CHAT.value and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
    s = config.sampling
    engine.add_request("prompt", text, SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature,
                                                      top_k=s.top_k, top_p=s.top_p, seed=s.seed))
    printed = 0
    while engine.has_unfinished():
        for out in engine.step():
            sys.stdout.write(out.text[printed:])
            sys.stdout.flush()
            printed = len(out.text)
    sys.stdout.write("\n")


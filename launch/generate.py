"""Generate a streamed answer to one prompt.

    python launch/generate.py --config=configs/smollm2_135m.py --prompt="What is the capital of France?"

Config overrides: --config.model.dtype=bfloat16 --config.sampling.temperature=0.7 ...
"""
import sys

from absl import flags
from ml_collections import config_flags

from jaxserve.cli import run

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smollm2_135m.py", "Model/serving config file.")
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


if __name__ == "__main__":
    run(main)

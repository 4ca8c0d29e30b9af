"""Serve a model over an OpenAI-compatible HTTP API (FastAPI + uvicorn).

    python launch/serve.py --config=configs/smollm2_135m.py --port=8000
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}'

Config overrides as in generate.py: --config.scheduler.policy=mlfq --config.engine.num_pages=1024 ...
Endpoints: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, /openapi.json.
"""
import os
import sys
import time

from absl import flags
from ml_collections import config_flags

from jaxserve.cli import run

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smollm2_135m.py", "Model/serving config file.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0 for every interface).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_MODEL_NAME = flags.DEFINE_string("served_model_name", "", "Model id clients send; default: the config "
                                  "file's name (e.g. smollm2_135m).")
_MAX_WAITING = flags.DEFINE_integer("max_waiting_requests", 1024, "Requests that may wait for their first "
                                    "token; beyond it new requests get 429.", lower_bound=0)
_MAX_BODY = flags.DEFINE_integer("max_body_bytes", 4 << 20, "Largest request body; beyond it 413.", lower_bound=1)
_ACCESS_LOG = flags.DEFINE_bool("access_log", False, "Log every HTTP request.")
_PRECOMPILE = flags.DEFINE_bool("precompile", False, "Compile every step shape before listening, so that no "
                                "request waits on XLA (minutes on CPU for a real model; worth it on accelerators).")


def main(argv):
    del argv
    config = _CONFIG.value
    import uvicorn

    from jaxserve.llm import engine_from_config
    from jaxserve.server import create_app

    name = _MODEL_NAME.value or os.path.splitext(os.path.basename(
        config_flags.get_config_filename(flags.FLAGS["config"])))[0]
    engine = engine_from_config(config)
    if _PRECOMPILE.value:
        t = time.perf_counter()
        sys.stderr.write(f"compiled {engine.precompile()} step shapes in {time.perf_counter() - t:.0f} s\n")
    app = create_app(engine, name, max_waiting=_MAX_WAITING.value, max_body_bytes=_MAX_BODY.value)
    sys.stderr.write(f"serving {name!r} at http://{_HOST.value}:{_PORT.value}/v1\n")
    uvicorn.run(app, host=_HOST.value, port=_PORT.value, access_log=_ACCESS_LOG.value, log_level="info")


if __name__ == "__main__":
    run(main)

"""`jaxserve serve MODEL`: a model over an OpenAI-compatible HTTP API (FastAPI + uvicorn).

    jaxserve serve smollm2_135m --port=8000
    python launch/serve.py --config=configs/smollm2_135m.py --port=8000   # the same, from a checkout
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' -d '{"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}'

Config overrides as in generate.py: --config.scheduler.policy=mlfq --config.engine.num_pages=1024 ...
Endpoints: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, /openapi.json.
"""
import os
import signal
import sys
import time

from absl import flags
from ml_collections import config_flags

from jaxserve import configs
from jaxserve.server.app import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_TOKENS, DEFAULT_MAX_WAITING

_CONFIG = config_flags.DEFINE_config_file("config", configs.config_spec(configs.DEFAULT),
                                          "Model/serving config file (`jaxserve serve MODEL` sets it from MODEL).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0 for every interface).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_MODEL_NAME = flags.DEFINE_string("served_model_name", "", "Model id clients send; default: the config "
                                  "file's name (e.g. smollm2_135m).")
_MAX_WAITING = flags.DEFINE_integer("max_waiting_requests", DEFAULT_MAX_WAITING, "Requests that may wait for "
                                    "their first token; beyond it new requests get 429.", lower_bound=0)
_MAX_BODY = flags.DEFINE_integer("max_body_bytes", DEFAULT_MAX_BODY_BYTES, "Largest request body; beyond it 413.",
                                 lower_bound=1)
_ACCESS_LOG = flags.DEFINE_bool("access_log", False, "Log every HTTP request.")
_JOURNAL = flags.DEFINE_string("journal", "", "File (or gs:// folder, where the VM's disk does not outlive it) "
                               "recording every request's progress; on start, unfinished requests in it are "
                               "resumed (their clients reconnect at /v1/requests/ID/stream).")
_FSYNC_EVERY = flags.DEFINE_integer("journal_fsync_every", 16, "fsync the journal every N token records (0: leave "
                                    "it to the OS).", lower_bound=0)
_GRACE = flags.DEFINE_float("shutdown_grace_s", 25.0, "On SIGTERM/SIGINT (a spot VM's notice: 30 s), stop "
                            "admitting and let in-flight requests run this long; the rest stay in the journal.",
                            lower_bound=0)
_COORDINATOR = flags.DEFINE_string("coordinator", "", "Serve over several processes (hosts): host:port of process "
                                   "0, for jax.distributed. Process 0 serves HTTP; the others follow its steps.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index in a multi-process run.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Initialize jax.distributed from the environment "
                                 "(Cloud TPU pods, SLURM) instead of --coordinator.")
_PEER = flags.DEFINE_string("peer", "", "URL of another jaxserve server to hand unfinished requests to on "
                            "SIGTERM (their clients reconnect there at /v1/requests/ID/stream).")
_API_KEY = flags.DEFINE_string("api_key", os.environ.get("JAXSERVE_API_KEY", ""), "Required on every /v1 route as "
                               "'Authorization: Bearer <key>' (default: $JAXSERVE_API_KEY; empty: open). /health "
                               "and /metrics stay open.")
_PEER_SECRET = flags.DEFINE_string("peer_secret", os.environ.get("JAXSERVE_PEER_SECRET", ""), "Secret shared with "
                                   "peer servers: sent when handing requests over (--peer) and required to take "
                                   "them (default: $JAXSERVE_PEER_SECRET; empty: this server takes none).")
_DEFAULT_MAX_TOKENS = flags.DEFINE_integer("default_max_tokens", DEFAULT_MAX_TOKENS, "Limit of a chat request that "
                                          "sets no max_tokens (cut to what the context leaves).", lower_bound=1)
_PRECOMPILE = flags.DEFINE_bool("precompile", False, "Compile every step shape before listening, so that no "
                                "request waits on XLA (minutes on CPU for a real model; worth it on accelerators).")


def main(argv):
    del argv
    config = _CONFIG.value
    import uvicorn

    if _COORDINATOR.value or _DISTRIBUTED.value:  # before anything starts JAX's backend
        from jaxserve.parallel import multihost
        multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    import jax

    from jaxserve.llm import engine_from_config
    from jaxserve.server import create_app

    name = _MODEL_NAME.value or configs.served_name(config_flags.get_config_filename(flags.FLAGS["config"]))
    engine = engine_from_config(config)
    if jax.process_index() != 0:  # a follower: run process 0's steps until it stops serving
        # A spot VM's notice reaches every process. A follower that stopped now would leave process
        # 0 inside a collective; it keeps stepping while process 0 drains, which then releases it.
        def keep_following(sig, frame):
            sys.stderr.write(f"process {jax.process_index()}: signal {sig}; draining with process 0\n")
        signal.signal(signal.SIGTERM, keep_following)
        signal.signal(signal.SIGINT, keep_following)
        sys.stderr.write(f"process {jax.process_index()} followed {engine.runner.follow()} steps\n")
        return
    if _JOURNAL.value:
        from jaxserve.engine.journal import TokenJournal
        engine.journal = TokenJournal(_JOURNAL.value, _FSYNC_EVERY.value)  # reads it once, seals and compacts it
        pending = engine.journal.unfinished_requests()
        if pending:
            rejected = engine.resume_valid(pending)
            for request_id, why in rejected:
                sys.stderr.write(f"not resumed: {request_id} ({why})\n")
            sys.stderr.write(f"resumed {len(pending) - len(rejected)} unfinished requests from {_JOURNAL.value}\n")
    if _PRECOMPILE.value:
        t = time.perf_counter()
        sys.stderr.write(f"compiled {engine.precompile(progress=True)} step shapes in {time.perf_counter() - t:.0f} s\n")
    app = create_app(engine, name, max_waiting=_MAX_WAITING.value, max_body_bytes=_MAX_BODY.value,
                     peer_url=_PEER.value, api_key=_API_KEY.value or None, peer_secret=_PEER_SECRET.value or None,
                     default_max_tokens=_DEFAULT_MAX_TOKENS.value)
    sys.stderr.write(f"serving {name!r} at http://{_HOST.value}:{_PORT.value}/v1\n")
    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # a spot VM's notice: stop admitting; requests cut off at the end of the grace stay
            # in the journal (which the app syncs as it shuts down) instead of being aborted
            app.state.server.engine_loop.drain()
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None):
            await super().shutdown(sockets)  # the app's shutdown released the followers
            if jax.process_count() > 1:  # before uvicorn re-raises SIGTERM: they wait in JAX's exit barrier
                jax.distributed.shutdown()

    # uvicorn re-raises SIGTERM once shut down (the exit status says what ended it); Ctrl-C exits 0
    server = DrainingServer(uvicorn.Config(app, host=_HOST.value, port=_PORT.value, access_log=_ACCESS_LOG.value,
                                           log_level="info", timeout_graceful_shutdown=_GRACE.value))
    try:
        server.run()
    except KeyboardInterrupt:
        pass


"""One process of a two-process serving run on CPU (used by test_multihost.py).

    python tests/multihost_worker.py PROCESS_ID PORT OUT_JSON

Each process has 2 CPU devices; the mesh (1, 4) spans both. Process 0 runs the engine on the
requests of test_multihost.REQUESTS and writes their outputs; process 1 follows its steps.
"""
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
from conftest import load_tiny_config  # noqa: E402  (it sets 8 devices: overridden next)

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"   # before JAX starts its backend
os.environ["JAX_PLATFORMS"] = "cpu"


def main(process_id: int, port: int, out: str) -> None:
    from jaxserve.parallel import multihost
    multihost.initialize(f"127.0.0.1:{port}", 2, process_id)
    import jax

    from jaxserve.checkpoint.load import load_host
    from jaxserve.engine.engine import Engine, EngineConfig
    from jaxserve.model.sharding import make_mesh, shard_params
    from test_multihost import ENGINE, requests, serve_all
    config = load_tiny_config()
    cfg, params, tokenizer = load_host(config.checkpoint, config.model)
    mesh = make_mesh(1, 4)
    engine = Engine(cfg, shard_params(params, cfg, mesh), mesh, tokenizer, EngineConfig(**ENGINE))
    if jax.process_index() == 0:
        done = serve_all(engine, requests())
        engine.runner.mirror.stop()
        result = {"outputs": done, "devices": len(jax.devices()), "local": len(jax.local_devices())}
    else:
        result = {"steps_followed": engine.runner.follow()}
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

"""Serving over two processes (JAX's multi-controller runtime, gloo on CPU) equals one process."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from jaxserve.engine.engine import Engine, EngineConfig
from jaxserve.model.sharding import make_mesh, shard_params
from jaxserve.sampling_params import SamplingParams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE = dict(token_budget=32, max_chunk=16, max_batch=4, num_pages=64)


def requests():
    rng = np.random.default_rng(11)
    return [(f"r{i}", rng.integers(3, 1000, size=int(rng.integers(3, 30))).tolist(),
             SamplingParams(max_tokens=12, temperature=0.0 if i % 2 else 0.7, seed=i)) for i in range(6)]


def serve_all(engine, reqs) -> dict:
    """Adds reqs, steps until all finish; request id -> token ids."""
    for rid, prompt, params in reqs:
        engine.add_request(rid, prompt, params)
    done = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.token_ids
    return done


def test_two_processes_serve_like_one(tiny_host, tmp_path):
    from test_server import free_port
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "multihost_worker.py"), str(i), str(port),
                               str(tmp_path / f"out{i}.json")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    leader, follower = (json.load(open(tmp_path / f"out{i}.json")) for i in range(2))
    assert (leader["devices"], leader["local"]) == (4, 2)  # one mesh over both processes' devices
    assert follower["steps_followed"] > 0
    cfg, params, tokenizer = tiny_host
    mesh = make_mesh(1, 1)
    engine = Engine(cfg, shard_params(params, cfg, mesh), mesh, tokenizer, EngineConfig(**ENGINE))
    assert leader["outputs"] == serve_all(engine, requests())


def test_serve_py_over_two_processes_answers_like_one_engine(tiny_host, tmp_path):
    """launch/serve.py with --coordinator: process 0 serves HTTP, process 1 follows its steps."""
    import httpx
    from test_server import free_port, wait_healthy
    port, coord = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = []
    for i in (1, 0):
        with open(tmp_path / f"serve{i}.log", "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "launch/serve.py", "--config=configs/tiny.py", "--config.mesh.model=4",
                 f"--port={port}", f"--coordinator=127.0.0.1:{coord}", "--num_processes=2", f"--process_id={i}",
                 f"--journal={tmp_path}/journal.jsonl", "--shutdown_grace_s=1"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    follower, leader = procs
    try:
        wait_healthy(f"http://127.0.0.1:{port}", leader)
        body = {"model": "tiny", "prompt": "Hello there", "max_tokens": 8, "temperature": 0}
        text = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        # a spot VM's notice reaches every process, the follower first: it keeps stepping while
        # process 0 drains, syncs its journal and then releases it
        follower.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert follower.poll() is None
        again = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == text  # the follower still steps
        leader.send_signal(signal.SIGTERM)
        assert leader.wait(60) in (0, -signal.SIGTERM) and follower.wait(60) == 0
        assert "followed" in (tmp_path / "serve1.log").read_text()
        assert "journal synced" in (tmp_path / "serve0.log").read_text()
    finally:
        for p in procs:
            p.kill()
    cfg, params, tokenizer = tiny_host
    mesh = make_mesh(1, 1)
    engine = Engine(cfg, shard_params(params, cfg, mesh), mesh, tokenizer, EngineConfig())
    engine.add_request("a", "Hello there", SamplingParams(max_tokens=8, temperature=0))
    while engine.has_unfinished():
        for o in engine.step():
            final = o
    assert text == final.text

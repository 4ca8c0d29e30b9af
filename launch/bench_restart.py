"""Restart to first token: `launch/serve.py --precompile` started with an empty, then a warm,
JAX persistent compilation cache (`engine.compile_cache_dir`, a local folder or a gs:// one).

Each run starts a server process, waits until it answers /health (it precompiles every step
shape first), then streams one completion and stops at its first token. Printed per run:
seconds from process start to healthy and to the first token, and the server's own
"compiled N step shapes in S s" line.

  python launch/bench_restart.py --config=configs/smollm2_135m.py
  python launch/bench_restart.py --gcs_emulator --cache_dir=gs://bench/jcc   # cache in a bucket
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

_CONFIG = flags.DEFINE_string("config", "configs/smollm2_135m.py", "Server config file.")
_CACHE = flags.DEFINE_string("cache_dir", "", "Compilation cache folder (default: a new temporary one).")
_RUNS = flags.DEFINE_list("runs", ["cold", "warm"], "cold empties the cache first; warm reuses it.")
_EMULATOR = flags.DEFINE_bool("gcs_emulator", False, "Serve gs:// from a GCS emulator on loopback "
                              "(launch/gcs_emulator.py), e.g. for --cache_dir=gs://bench/jcc.")
_OVERRIDES = flags.DEFINE_list("override", [], "Extra --config.X=Y flags for the server, without the dashes.")
_OUT = flags.DEFINE_string("out", "", "Also write the results here as JSON.")


def one_run(cache_dir: str, log_path: str) -> dict:
    import httpx
    from gcs_emulator import free_port  # launch/ is this script's folder
    from jaxserve.server.health import wait_healthy
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = REPO
    cmd = [sys.executable, "launch/serve.py", f"--config={_CONFIG.value}", f"--port={port}", "--precompile",
           "--served_model_name=m", f"--config.engine.compile_cache_dir={cache_dir}",
           *(f"--{o}" for o in _OVERRIDES.value)]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_healthy(url, proc, timeout=3600)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; see {log_path}") from None
        healthy = time.perf_counter() - start
        body = {"model": "m", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break
        first = time.perf_counter() - start
    finally:
        proc.kill()
        proc.wait()
    text = open(log_path).read()
    compiled = re.findall(r"compiled (\d+) step shapes in (\d+) s", text)
    return {"start_to_healthy_s": healthy, "start_to_first_token_s": first,
            "precompile": {"shapes": int(compiled[-1][0]), "s": float(compiled[-1][1])} if compiled else None}


def main(argv):
    del argv
    from jaxserve import paths
    if _EMULATOR.value:
        import gcs_emulator  # launch/ is this script's folder
        gcs_emulator.start_for(_CACHE.value)
    cache_dir = _CACHE.value or os.path.join(tempfile.mkdtemp(), "jcc")
    work = tempfile.mkdtemp()
    results = {"config": _CONFIG.value, "cache_dir": cache_dir, "overrides": _OVERRIDES.value, "runs": {}}
    for run in _RUNS.value:
        if run == "cold":
            p = paths.as_path(cache_dir)
            if p.exists():
                p.rmtree()
        r = one_run(cache_dir, os.path.join(work, f"{run}.log"))
        results["runs"][run] = r
        pre = r["precompile"] or {}
        print(f"{run:5s} cache: healthy after {r['start_to_healthy_s']:.1f} s, first token after "
              f"{r['start_to_first_token_s']:.1f} s (precompile: {pre.get('shapes')} shapes in {pre.get('s')} s)",
              flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)

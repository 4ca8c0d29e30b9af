"""launch/bench_throughput.py, run as a user runs it on the tiny config."""
import json
import os
import subprocess
import sys

from conftest import REPO


def test_bench_throughput_reports_throughput_and_floor(tmp_path):
    out = tmp_path / "tp.json"
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    proc = subprocess.run([sys.executable, "launch/bench_throughput.py", "--config=configs/tiny.py",
                           "--num_requests=6", "--warmup_requests=2", "--max_prompt=64", "--max_output=16",
                           "--config.engine.max_batch=4", "--noprecompile", f"--output={out}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res == json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["requests"] == 6 and res["warmup_requests"] == 2
    assert res["output_tokens"] == res["expected_output_tokens"] > 0
    assert res["output_tok_s"] > 0 and res["total_tok_s"] > res["output_tok_s"]
    assert res["steps"] > 0 and res["wall_s"] > 0
    assert res["measured"]["bandwidth_bytes_per_s"] > 0 and res["measured"]["matmul_flops_per_s"] > 0
    assert res["floor"]["prefill"]["s"] > 0 and res["floor"]["decode"]["s"] > 0
    assert 0 < res["floor_fraction"]  # above 1 only if the floor model were wrong
    assert set(res["compile_s"]) >= {"startup", "timed"}


def test_device_busy_time_is_the_union_of_overlapping_kernels():
    sys.path.insert(0, os.path.join(REPO, "launch"))
    from bench_throughput import gap_histogram, union_and_gaps
    assert union_and_gaps([(20, 30), (0, 10), (5, 15), (12, 13)]) == (25, [5])
    assert union_and_gaps([(0, 10), (2, 3)]) == (10, [])
    assert union_and_gaps([]) == (0, [])
    hist = gap_histogram([1_000, 3_000, 4_000, 2_000_000])
    assert hist["0-2us"] == (1, 0.0) and hist["2-5us"][0] == 2 and hist[">=1000us"] == (1, 0.002)


def test_idle_gap_sites_name_the_events_around_each_gap():
    sys.path.insert(0, os.path.join(REPO, "launch"))
    from bench_throughput import gap_sites
    us = 1000
    events = [(0, 5 * us, "fusion_1(x)"), (40 * us, 50 * us, "MemcpyH2D"), (52 * us, 60 * us, "MemcpyH2D"),
              (100 * us, 110 * us, "MemcpyH2D"), (110 * us, 120 * us, "gemm"), (115 * us, 200 * us, "overlap"),
              (230 * us, 231 * us, "fusion_1")]
    # 35 us fusion_1 -> copy; 2 us between copies is below the cut; 40 us copy -> copy; 30 us after "overlap"
    # (the event that ended last, not the one that started last)
    assert gap_sites(events) == [("MemcpyH2D", "MemcpyH2D", 1, 4e-05), ("fusion_1", "MemcpyH2D", 1, 3.5e-05),
                                 ("overlap", "fusion_1", 1, 3e-05)]

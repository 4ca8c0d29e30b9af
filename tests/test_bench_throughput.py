"""`jaxserve bench throughput`, run as a user runs it on the tiny config (outside any checkout)."""
import json

from jaxserve.bench.throughput import gap_histogram, gap_sites, union_and_gaps
from test_cli import jaxserve


def test_bench_throughput_reports_throughput_and_floor(tmp_path):
    out = tmp_path / "tp.json"
    proc = jaxserve("bench", "throughput", "tiny", "--num_requests=6", "--warmup_requests=2", "--max_prompt=64",
                    "--max_output=16", "--config.engine.max_batch=4", "--noprecompile", f"--output={out}",
                    cwd=tmp_path)  # the packaged config and trace sample: nothing from a checkout
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
    assert union_and_gaps([(20, 30), (0, 10), (5, 15), (12, 13)]) == (25, [5])
    assert union_and_gaps([(0, 10), (2, 3)]) == (10, [])
    assert union_and_gaps([]) == (0, [])
    hist = gap_histogram([1_000, 3_000, 4_000, 2_000_000])
    assert hist["0-2us"] == (1, 0.0) and hist["2-5us"][0] == 2 and hist[">=1000us"] == (1, 0.002)


def test_idle_gap_sites_name_the_events_around_each_gap():
    us = 1000
    events = [(0, 5 * us, "fusion_1(x)"), (40 * us, 50 * us, "MemcpyH2D"), (52 * us, 60 * us, "MemcpyH2D"),
              (100 * us, 110 * us, "MemcpyH2D"), (110 * us, 120 * us, "gemm"), (115 * us, 200 * us, "overlap"),
              (230 * us, 231 * us, "fusion_1")]
    # 35 us fusion_1 -> copy; 2 us between copies is below the cut; 40 us copy -> copy; 30 us after "overlap"
    # (the event that ended last, not the one that started last)
    assert gap_sites(events) == [("MemcpyH2D", "MemcpyH2D", 1, 4e-05), ("fusion_1", "MemcpyH2D", 1, 3.5e-05),
                                 ("overlap", "fusion_1", 1, 3e-05)]

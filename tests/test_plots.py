"""The benchmarks' plots (jaxserve.bench.plots) draw what their JSON holds, from a run's own output."""
import json
import os
import subprocess
import sys

import pytest

from jaxserve.bench import plots

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_JSON = os.path.join(REPO, "docs", "bench_device.json")  # a real bench device run (H100)


def _lines(ax):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_throughput_vs_batch_draws_every_decode_row_and_its_roofline(tmp_path):
    results = json.load(open(DEVICE_JSON))
    fig = plots.throughput_vs_batch(results, str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = _lines(fig.axes[0])
    for ctx in {d["ctx"] for d in results["decode"]}:
        rows = sorted((d["batch"], d) for d in results["decode"] if d["ctx"] == ctx and d["impl"] == "pallas")
        assert lines[f"jaxserve, context {ctx}"] == ([b for b, _ in rows], [d["tok_s"] for _, d in rows])
        roof = lines[f"roofline, context {ctx}"][1]
        assert roof == pytest.approx([b / d["roofline_ms"] * 1e3 for b, d in rows])
        # the measured kernel never beats the bandwidth bound it is measured against
        assert all(t <= r * 1.05 for t, r in zip(lines[f"jaxserve, context {ctx}"][1], roof))
    hf = [k for k in lines if k.startswith("transformers")]
    assert len(hf) == 1 and lines[hf[0]][1] == [d["tok_s"] for d in sorted(results["hf_decode"], key=lambda d: d["batch"])]


def test_a_plot_without_its_data_says_so():
    with pytest.raises(ValueError, match="no pallas decode rows"):
        plots.throughput_vs_batch({"decode": []}, "unused.png")
    with pytest.raises(ValueError, match="no sim or engine results"):
        plots.spot_timeline({"availability": [[0, 1]]}, "unused.png")


def test_plots_redraws_a_saved_result_from_the_command_line(tmp_path):
    out = tmp_path / "sub" / "tvb.png"
    proc = subprocess.run([sys.executable, "-m", "jaxserve.bench.plots", "device", DEVICE_JSON, str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:4] == b"\x89PNG" and f"plot: {out}" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "jaxserve.bench.plots", "timeline", DEVICE_JSON, str(out)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "schedule|device|spot" in bad.stderr

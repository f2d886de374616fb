"""benchmark/analysis/gpu_trace.py: busy time, idle gaps and kernel totals from a Chrome trace's device events."""

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmark" / "analysis"))

from gpu_trace import device_events, load, per_step_difference, short_name, summarize  # noqa: E402


def test_summary_counts_overlaps_once_and_only_long_gaps(tmp_path):
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "gemm<float, 128>", "ts": 0, "dur": 10},
        {"ph": "X", "cat": "kernel", "name": "attn", "ts": 5, "dur": 10},  # overlaps the gemm by 5 us
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 25, "dur": 5},  # after a 10 us gap (short)
        {"ph": "X", "cat": "kernel", "name": "attn", "ts": 100, "dur": 20},  # after a 70 us gap (counted)
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500},  # host op: not a device event
    ]}
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(trace, f)
    out = summarize(device_events(load(path)), steps=2)
    assert out["events"] == 4
    assert out["window_ms"] == 0.12 and out["busy_ms"] == 0.04
    assert out["idle_in_gaps_over_20us_ms"] == 0.07
    assert out["kernels"][0] == {"name": "attn", "count": 2, "total_ms": 0.03, "mean_us": 15.0}
    assert out["kernels"][1]["name"] == "gemm"
    assert out["per_step_ms"]["window"] == 0.06


def test_short_name_strips_nested_templates():
    assert short_name("void f<a<b>, c>(int)") == "void f(int)"


def test_empty_trace():
    assert summarize([]) == {"events": 0}


def test_per_step_difference_ranks_kernels_by_extra_time():
    ours = [(0, 10, "gemm"), (10, 4, "fill"), (20, 10, "gemm"), (30, 4, "fill")]
    base = [(0, 9, "gemm"), (20, 9, "gemm")]
    rows = per_step_difference(ours, base, steps=2)
    assert rows[0] == {"name": "fill", "us_per_step": 4.0, "count_per_step": [1.0, 0.0]}
    assert rows[1] == {"name": "gemm", "us_per_step": 1.0, "count_per_step": [1.0, 1.0]}

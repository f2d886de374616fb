"""benchmark/tiny/cpu_profile.py: own time per step by source area and the top functions, from a pstats file."""

from __future__ import annotations

import cProfile
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmark" / "tiny" / "cpu_profile.py"


@pytest.fixture
def cpu_profile(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    spec = importlib.util.spec_from_file_location("cpu_profile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_area_of(cpu_profile):
    assert cpu_profile.area_of("/work/main/sglang_dspark/worker.py") == "sglang_dspark"
    assert cpu_profile.area_of("/tmp/site/sglang/srt/speculative/dflash_info_v2.py") == "sglang speculative"
    assert cpu_profile.area_of("/tmp/site/sglang/srt/managers/scheduler.py") == "sglang managers (scheduler)"
    assert cpu_profile.area_of("/tmp/site/sglang/srt/utils/common.py") == "sglang other"
    assert cpu_profile.area_of("/x/torch/cuda/__init__.py") == "torch"
    assert cpu_profile.area_of("~") == "builtins and C calls"
    assert cpu_profile.area_of("/usr/lib/python3.12/contextlib.py") == "other"


def busy(n: int) -> int:
    return sum(i * i for i in range(n))


def test_summarise_per_step(cpu_profile, tmp_path):
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(4):
        busy(20000)
    profiler.disable()
    path = tmp_path / "p.pstats"
    profiler.dump_stats(str(path))
    summary = cpu_profile.summarise(path, steps=4)
    top = {row["function"].split("(")[-1].rstrip(")"): row for row in summary["top_by_cumulative"]}
    assert top["busy"]["calls_per_step"] == 1.0
    assert 0 < top["busy"]["own_ms_per_step"] <= top["busy"]["cumulative_ms_per_step"]
    areas = summary["own_ms_per_step_by_area"]
    assert list(areas.values()) == sorted(areas.values(), reverse=True)
    assert sum(areas.values()) >= top["busy"]["cumulative_ms_per_step"] * 0.9

"""``sglang_dspark.timing``: the environment knobs and the CPU-profile window (no GPU needed)."""

from __future__ import annotations

import pstats

import pytest

from sglang_dspark.timing import CpuProfile, NoTimer, StepTimer


def test_step_timing_env():
    assert isinstance(StepTimer.from_env({}), NoTimer) and not isinstance(StepTimer.from_env({}), StepTimer)
    assert StepTimer.from_env({"SGLANG_DSPARK_STEP_TIMING": "50"}).every == 50
    for bad in ("x", "-3"):
        with pytest.raises(ValueError, match="SGLANG_DSPARK_STEP_TIMING"):
            StepTimer.from_env({"SGLANG_DSPARK_STEP_TIMING": bad})


def test_cpu_profile_env():
    assert CpuProfile.from_env({}) is None
    for bad in ("/tmp/p", "/tmp/p,3", "/tmp/p,a,3", ",1,2", "/tmp/p,0,5", "/tmp/p,2,0"):
        with pytest.raises(ValueError, match="SGLANG_DSPARK_CPU_PROFILE"):
            CpuProfile.from_env({"SGLANG_DSPARK_CPU_PROFILE": bad})


def _busy_in_window():
    return sum(i * i for i in range(2000))


def test_cpu_profile_covers_exactly_its_window(tmp_path):
    profile = CpuProfile.from_env({"SGLANG_DSPARK_CPU_PROFILE": f"{tmp_path},3,4"})
    calls = 0
    for step in range(1, 10):
        profile.step()
        if 3 <= step < 7:  # the profiled steps: 3, 4, 5, 6
            _busy_in_window()
            calls += 1
        else:
            sum(range(10))
    files = list(tmp_path.glob("dspark-cpu-*.pstats"))
    assert len(files) == 1
    stats = pstats.Stats(str(files[0])).stats
    counts = {func[2]: value[1] for func, value in stats.items()}  # function name -> number of calls
    assert counts["_busy_in_window"] == calls == 4

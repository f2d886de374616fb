"""``DSparkWorker._decode`` on CPU: the worker-step checks of ``tests/gpu/unit.py`` (draft window, draft
batch, greedy and mixed acceptance, commit layout, publish, draft K/V commit, simulated acceptance through
the sampler-graph interface) run here with SGLang's kernels and forwards replaced by torch stand-ins."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.sglang

GPU_TESTS = Path(__file__).resolve().parents[2] / "gpu"


def test_worker_step(dspark_plugin, tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.syspath_prepend(str(GPU_TESTS))
    for name in ("harness", "unit"):
        sys.modules.pop(name, None)  # harness reads OUT at import
    import unit
    from harness import Report

    report = Report("worker-step")
    report.run("worker step", lambda: unit.check_worker_step(report))
    failed = [c for c in report.data["checks"] if not c["ok"]]
    assert report.data["checks"] and not failed, failed

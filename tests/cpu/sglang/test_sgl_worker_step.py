"""``DSparkWorker._decode`` on CPU: the worker-step checks of ``tests/gpu/unit.py`` (draft window, draft
batch, greedy and mixed acceptance, commit layout, publish, draft K/V commit, simulated acceptance through
the sampler-graph interface, planning from the reserved bounds without host lengths) run here with SGLang's
kernels and forwards replaced by torch stand-ins."""

from __future__ import annotations

import pytest

from sglang_fixtures import run_worker_step_checks

pytestmark = pytest.mark.sglang


def test_worker_step(dspark_plugin, tmp_path, monkeypatch):
    checks = run_worker_step_checks("worker-step", tmp_path, monkeypatch)
    failed = [c for c in checks if not c["ok"]]
    assert checks and not failed, failed

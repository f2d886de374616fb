"""``benchmark/perf.py``'s settings: the same DSPARK settings for both engines, the experimental no-sync copies."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _perf(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "gpu"))
    monkeypatch.syspath_prepend(str(ROOT / "benchmark"))
    for name in ("harness", "perf"):
        sys.modules.pop(name, None)  # harness reads OUT at import
    import perf

    return perf


def test_settings(monkeypatch, tmp_path):
    perf = _perf(monkeypatch, tmp_path)
    names = [n for n, _ in perf.settings("ours", breakdown=True)]
    assert names == ["baseline", "acc1", "acc3", "acc2", "card", "breakdown"]
    ours, theirs = dict(perf.settings("ours", False)), dict(perf.settings("sglang-0.5.17", False))
    assert ours["acc2"] == theirs["acc2"] == {"SGLANG_SIMULATE_ACC_LEN": "2"}
    assert theirs["card"] == {"SGLANG_SIMULATE_ACC_LEN": "2.324"}  # 0.5.17 has no profile knob: the mean
    rows = dict(perf.settings("ours", False, nosync=True))
    assert sorted(n for n in rows if n.endswith("-nosync")) == ["acc1-nosync", "acc2-nosync", "acc3-nosync", "card-nosync"]
    assert rows["acc3-nosync"] == {"SGLANG_SIMULATE_ACC_LEN": "3", "SGLANG_DSPARK_NO_SEQ_LENS_SYNC": "1"}
    assert "SGLANG_DSPARK_NO_SEQ_LENS_SYNC" not in rows["acc3"]

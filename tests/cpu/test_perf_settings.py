"""``benchmark/perf.py``'s settings: the same DSPARK settings for both engines (ours verifying every draft, as
0.5.17 does), the scheduled-verification and host-length (``-sync``) copies."""

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
    names = [n for n, *_ in perf.settings("ours", breakdown=True)]
    assert names == ["baseline", "acc1", "acc3", "acc2", "card", "dummy", "breakdown"]
    ours = {n: (env, flags) for n, env, flags in perf.settings("ours", False)}
    theirs = {n: (env, flags) for n, env, flags in perf.settings("sglang-0.5.17", False)}
    assert ours["acc2"] == ({"SGLANG_SIMULATE_ACC_LEN": "2"}, perf.FULL)
    assert theirs["acc2"] == ({"SGLANG_SIMULATE_ACC_LEN": "2"}, [])  # 0.5.17 verifies every draft anyway
    assert ours["baseline"] == ({}, [])
    assert theirs["card"][0] == {"SGLANG_SIMULATE_ACC_LEN": "2.324"}  # 0.5.17 has no profile knob: the mean
    rows = {n: (env, flags) for n, env, flags in perf.settings("ours", False, sync=True, scheduled=True)}
    assert sorted(n for n in rows if n.endswith("-sync") and "-sched" not in n) == [
        "acc1-sync", "acc2-sync", "acc3-sync", "card-sync", "dummy-sync"]
    assert rows["acc2-sched-sync"] == ({"SGLANG_SIMULATE_ACC_LEN": "2", "SGLANG_DSPARK_NO_SEQ_LENS_SYNC": "0"}, [])
    assert [perf.runs_scheduled(n, rows[n][1]) for n in ("acc2-sched-sync", "acc2-sync", "baseline")] == [True, False, False]
    assert rows["acc3-sync"] == ({"SGLANG_SIMULATE_ACC_LEN": "3", "SGLANG_DSPARK_NO_SEQ_LENS_SYNC": "0"}, perf.FULL)
    assert "SGLANG_DSPARK_NO_SEQ_LENS_SYNC" not in rows["acc3"][0]
    assert sorted(n for n in rows if n.endswith("-sched")) == [
        "acc1-sched", "acc2-sched", "acc3-sched", "card-sched", "dummy-sched"]
    assert rows["dummy-sched"] == ({}, []) and ours["dummy"] == ({}, perf.FULL)  # no simulation: drafts verified
    assert rows["acc1-sched"] == ({"SGLANG_SIMULATE_ACC_LEN": "1"}, [])  # the default: scheduled verification
    assert not any(n.endswith("-sched") for n, *_ in perf.settings("sglang-0.5.17", False, scheduled=True))
    ragged = {n: (env, flags) for n, env, flags in perf.settings("ours", False, ragged=True) if n.endswith("-ragged")}
    assert ragged["card-ragged"] == ({**ours["card"][0], "SGLANG_DSPARK_PER_REQUEST_LENGTHS": "1"}, [])
    assert [perf.runs_scheduled(n, ragged[n][1]) for n in ragged] == [True] * 5

"""``ISSUE4_TP`` in ``tests/gpu/issue4.py``: the tiny servers' ``--tp-size``, the result names and part 3, read
at import (the GPU script is imported, not run)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

GPU_TESTS = Path(__file__).resolve().parents[1] / "gpu"


@pytest.fixture
def load_issue4(monkeypatch, tmp_path):
    """``load_issue4(**env)`` -> the ``issue4`` module imported afresh under those environment variables."""
    monkeypatch.syspath_prepend(str(GPU_TESTS))
    monkeypatch.setenv("OUT", str(tmp_path))

    def load(**env: str):
        for name in ("ISSUE4_TP", "ISSUE4_SKIP_PART3", "ISSUE4_DETERMINISTIC"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        for name in ("harness", "issue4"):
            sys.modules.pop(name, None)  # both read the environment at import
        return importlib.import_module("issue4")

    yield load
    for name in ("harness", "issue4"):
        sys.modules.pop(name, None)


def test_default_is_tp1_with_part3(load_issue4):
    issue4 = load_issue4()
    assert issue4.TP == 1 and issue4.SUFFIX == "" and issue4.RUN_PART3
    assert "--tp-size" not in issue4.TINY_ARGS
    assert not load_issue4(ISSUE4_SKIP_PART3="1").RUN_PART3


def test_tp2_serves_every_tiny_server_with_tp_size_and_suffixes_the_results(load_issue4):
    issue4 = load_issue4(ISSUE4_TP="2", ISSUE4_DETERMINISTIC="1")
    assert issue4.TP == 2 and issue4.SUFFIX == "-tp2" and not issue4.RUN_PART3
    args = issue4.TINY_ARGS
    assert args[args.index("--tp-size") + 1] == "2" and args.count("--tp-size") == 1
    assert "--enable-deterministic-inference" in args and "--mem-fraction-static" in args


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_bad_tp_values_are_refused(load_issue4, value):
    with pytest.raises(ValueError, match=f"ISSUE4_TP: expected a positive integer .*found '{value}'"):
        load_issue4(ISSUE4_TP=value)

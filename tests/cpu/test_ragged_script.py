"""``tests/gpu/ragged.py``'s pure part: reading per-request lengths' use out of a calibration log."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def test_uneven_steps_counts_steps_whose_requests_verified_differently(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "tests" / "gpu"))
    for name in ("harness", "issue6", "serving", "ragged"):
        sys.modules.pop(name, None)  # harness reads OUT at import
    import ragged

    log = tmp_path / "calibration.jsonl"
    rows = [(0, 7, 3), (0, 7, 7), (1, 2, 2), (1, 6, 0), (2, 4, 5)]  # (step, verified, accepted)
    log.write_text("".join(json.dumps({"step": s, "verified": v, "accepted": a, "rid": "r", "confidence": []}) + "\n"
                           for s, v, a in rows))
    assert ragged.uneven_steps(log) == {"uneven_steps": 1, "steps": 3, "accepted_over": 1}

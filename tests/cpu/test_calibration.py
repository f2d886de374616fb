"""``benchmark/analysis/calibration.py``: step records, reliability metrics, the records CLI, reference records."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def calibration():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmark" / "analysis" / "calibration.py"
    spec = importlib.util.spec_from_file_location("dspark_calibration", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_calibration_step_views(calibration):
    steps = [
        {"confidence": [0.9, 0.5, 0.2], "accepted": 1},  # drafts 1 accepted, 2 rejected, 3 never reached
        {"confidence_logits": [0.0, 0.0, 0.0], "accepted": 3},
        {"confidence": [0.8, 0.8, 0.8], "accepted": 0, "verified": 2},
    ]
    views = calibration.step_views(steps)
    pos, pred, acc = views["conditional"]
    assert pos.tolist() == [1, 2, 1, 2, 3, 1]
    assert pred.tolist() == pytest.approx([0.9, 0.5, 0.5, 0.5, 0.5, 0.8])
    assert acc.tolist() == [True, False, True, True, True, False]
    pos, pred, acc = views["survival"]
    assert pos.tolist() == [1, 2, 3, 1, 2, 3, 1, 2]
    assert pred.tolist() == pytest.approx([0.9, 0.45, 0.09, 0.5, 0.25, 0.125, 0.8, 0.64])
    assert acc.tolist() == [True, False, False, True, True, True, False, False]
    summary = calibration.committed_summary(steps)
    assert summary["measured_mean_committed"] == pytest.approx((2 + 4 + 1) / 3)
    assert summary["predicted_mean_committed"] == pytest.approx(1 + (1.44 + 0.875 + 1.44) / 3)
    with pytest.raises(ValueError, match="step record 0"):
        calibration.step_views([{"confidence": [0.5], "accepted": 2}])


def test_calibration_metrics(calibration):
    import numpy as np

    rng = np.random.default_rng(0)
    predicted = rng.uniform(0, 1, 200_000)
    calibrated = rng.uniform(0, 1, predicted.size) < predicted
    good = calibration.reliability(predicted, calibrated, 10)
    assert good["ece"] < 0.01 and good["count"] == predicted.size and len(good["bins"]) == 10
    assert good["auc"] == pytest.approx(5 / 6, abs=0.01)  # E over pairs for p ~ U(0,1), label ~ Bernoulli(p)
    overconfident = calibration.reliability(np.minimum(predicted + 0.1, 1.0), calibrated, 10)
    assert overconfident["ece"] == pytest.approx(0.095, abs=0.01)
    tiny = calibration.reliability(np.array([0.15, 0.15, 0.95]), np.array([True, False, True]), 10)
    assert tiny["ece"] == pytest.approx((2 * 0.35 + 0.05) / 3)
    assert tiny["brier"] == pytest.approx((0.85**2 + 0.15**2 + 0.05**2) / 3)
    assert calibration.auc(np.array([0.1, 0.2, 0.9]), np.array([False, False, True])) == 1.0
    assert calibration.auc(np.array([0.5, 0.5]), np.array([False, True])) == 0.5
    assert calibration.auc(np.array([0.5, 0.7]), np.array([True, True])) is None


def test_calibration_records_cli(calibration, tmp_path):
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"position": k % 3 + 1, "predicted": 0.7, "accepted": k % 10 < 7}) + "\n"
                               for k in range(60)))
    out = tmp_path / "out"
    assert calibration.main(["records", str(records), "--out-dir", str(out)]) == 0
    report = json.loads((out / "calibration.json").read_text())
    assert report["records"]["pooled"]["ece"] == pytest.approx(0.0, abs=1e-9)
    assert sorted(report["records"]["per_position"]) == ["1", "2", "3"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (out / "reliability.png").exists()
    else:
        assert (out / "reliability.png").stat().st_size > 1000
    records.write_text(json.dumps({"position": 1, "predicted": 0.5, "accepted": True}) + "\n"
                       + json.dumps({"confidence": [0.5], "accepted": 0}) + "\n")
    with pytest.raises(SystemExit):
        calibration.main(["records", str(records), "--out-dir", str(out)])


def test_calibration_reference_records(calibration):
    """The tiny pair in the reference loop yields one step record per verify step, consistent with it."""
    steps, meta = calibration.collect_reference(1, 24, 0.0, 4, 0, "humaneval")
    assert meta["gamma"] == 4 and len(steps) >= 1
    assert all(len(s["confidence_logits"]) == 4 and 0 <= s["accepted"] <= 4 for s in steps)
    assert sum(s["accepted"] + 1 for s in steps) >= meta["generated_tokens"] - 1  # + the prefill's bonus token

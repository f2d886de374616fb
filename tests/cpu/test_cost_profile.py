"""``sglang_dspark.cost_profile``: the cost profile file, its curves, the builtin estimate and the profiler core."""

from __future__ import annotations

import json

import pytest

from sglang_dspark.cost_profile import (
    CostProfile,
    CostProfileError,
    WallTimer,
    builtin_profile,
    main as cost_profile_main,
    measure_points,
)


def profile(points, draft_points=()) -> CostProfile:
    return CostProfile(points=tuple(points), draft_points=tuple(draft_points))


def test_interpolation_flat_below_last_slope_past():
    prof = profile([(2, 1.0), (10, 1.0), (20, 3.0), (30, 2.0)])  # flat, rising, falling (noise) segments
    assert [prof.verify_ms(x) for x in (0, 6, 15, 25, 40)] == pytest.approx([1.0, 1.0, 2.0, 2.5, 2.0])
    assert profile([(1, 5.0), (100, 5.0), (200, 10.0)]).verify_ms(400) == pytest.approx(20.0)


def test_profile_round_trip(tmp_path):
    prof = CostProfile(
        points=((1, 6.0), (64, 6.5), (256, 14.0)), draft_points=((1, 1.0), (32, 1.5)),
        device="NVIDIA H200", model="Qwen/Qwen3-8B", dtype="bfloat16", date="2026-01-01T00:00:00Z",
        meta={"repeats": 20},
    )
    path = tmp_path / "cost.json"
    prof.save(path)
    loaded = CostProfile.load(path)
    assert loaded == prof
    assert loaded.verify_ms(160) == pytest.approx(10.25)
    assert loaded.draft_ms(16) == pytest.approx(1.0 + 0.5 * 15 / 31)
    assert "NVIDIA H200" in loaded.table() and "256" in loaded.table()


def test_profile_without_draft_points_costs_zero_draft():
    prof = profile([(1, 1.0), (8, 2.0)])
    assert prof.draft_ms(4) == 0.0


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda d: d.pop("points"), "'points'"),
        (lambda d: d.update(points=[[1, 1.0]]), "'points'"),
        (lambda d: d.update(points=[[4, 1.0], [2, 2.0]]), "'points'"),
        (lambda d: d.update(points=[[1, 1.0], [2, -2.0]]), "points[1][1]"),
        (lambda d: d.update(points=[[1, 1.0], [2.5, 2.0]]), "points[1][0]"),
        (lambda d: d.update(points=[[1, 1.0], "x"]), "points[1]"),
        (lambda d: d.update(draft_points={"1": 2}), "'draft_points'"),
        (lambda d: d.update(format="other"), "'format'"),
        (lambda d: d.update(version=2), "'version'"),
        (lambda d: d.update(device=3), "'device'"),
    ],
)
def test_profile_load_errors_name_file_and_key(tmp_path, edit, key):
    data = profile([(1, 1.0), (8, 2.0)]).to_dict()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CostProfileError) as info:
        CostProfile.load(path)
    assert str(path) in str(info.value) and key in str(info.value)


def test_profile_load_missing_and_invalid_json(tmp_path):
    with pytest.raises(CostProfileError, match="not found"):
        CostProfile.load(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(CostProfileError, match="not valid JSON"):
        CostProfile.load(tmp_path / "x.json")


def test_builtin_profile_is_flat_to_knee_then_linear():
    prof = builtin_profile(8e9, draft_params=1e9, gamma=7)  # defaults: knee at 2 * 600e12 / (2 * 4000e9) = 150
    read_ms = 8e9 * 2 / 4000e9 * 1e3 + 0.5
    assert prof.verify_ms(1) == pytest.approx(read_ms)
    assert prof.verify_ms(150) == pytest.approx(read_ms)
    per_token = 2 * 8e9 / 600e12 * 1e3
    assert prof.verify_ms(600) - prof.verify_ms(300) == pytest.approx(300 * per_token, rel=1e-6)
    assert prof.source == "builtin" and prof.draft_points
    assert prof.draft_ms(1) == pytest.approx(1e9 * 2 / 4000e9 * 1e3)
    assert prof.draft_ms(200) > 2 * prof.draft_ms(1)  # compute-bound past the draft knee (bs * gamma tokens)
    assert builtin_profile(8e9).draft_points == ()
    with pytest.raises(CostProfileError, match="target_params"):
        builtin_profile(0)


def test_measure_points_median_and_warmup():
    calls = []
    now = [0.0]

    def forward(n: int) -> None:  # costs n ms, plus 100 ms on its 3rd timed call at each n (an outlier)
        calls.append(n)
        now[0] += n * 1e-3 + (0.1 if calls.count(n) == 5 else 0.0)

    points = measure_points(forward, [8, 2, 8, 4], WallTimer(clock=lambda: now[0]), warmup=2, repeats=5)
    assert [n for n, _ in points] == [2, 4, 8]
    assert [ms for _, ms in points] == pytest.approx([2.0, 4.0, 8.0])
    assert calls.count(8) == 2 + 5
    with pytest.raises(CostProfileError):
        measure_points(forward, [1], WallTimer(), repeats=0)


def test_cli_measure_show_builtin(tmp_path, capsys):
    out = tmp_path / "cost.json"
    args = ["measure", "--forward", "synthetic", "--device", "cpu", "--tokens", "1,4,16", "--warmup", "1",
            "--repeats", "2", "--model", "synthetic-16", "--dtype", "float32", "--out", str(out)]
    for flag in ("--forward-arg", "--draft-forward-arg"):
        args += [flag, "hidden=16", flag, "layers=1", flag, "device=cpu", flag, "dtype=float32"]
    args += ["--draft-forward", "synthetic", "--batch-sizes", "1,2"]
    assert cost_profile_main(args) == 0
    prof = CostProfile.load(out)
    assert [n for n, _ in prof.points] == [1, 4, 16] and [n for n, _ in prof.draft_points] == [1, 2]
    assert prof.model == "synthetic-16" and prof.source == "measured" and prof.meta["repeats"] == 2
    assert "measure --forward synthetic" in prof.meta["command"]
    capsys.readouterr()
    assert cost_profile_main(["show", str(out)]) == 0
    assert "synthetic-16" in capsys.readouterr().out
    assert cost_profile_main(["builtin", "--target-params", "8e9", "--out", str(tmp_path / "b.json")]) == 0
    assert CostProfile.load(tmp_path / "b.json").source == "builtin"
    with pytest.raises(SystemExit) as info:
        cost_profile_main(["measure", "--forward", "no_colon", "--out", str(out), "--device", "cpu"])
    assert info.value.code == 1

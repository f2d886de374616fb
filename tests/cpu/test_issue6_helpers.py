"""The pure parts of ``tests/gpu/issue6.py`` (goodput points, tables, ratio checks, calibration-log summary, budget
estimates, environment knobs) and its checks on made-up measurements: they pass on good numbers and fail on bad
ones. The GPU script is imported, not run."""

from __future__ import annotations

import importlib
import time
import sys
from pathlib import Path

import pytest

GPU_TESTS = Path(__file__).resolve().parents[1] / "gpu"
KNOBS = ("ISSUE6_WEAK_CONF_SHIFT", "ISSUE6_WEAK_NOISE", "ISSUE6_ROUNDS", "ISSUE6_ROUNDS_A", "ISSUE6_SKIP_IDENTITY",
         "ISSUE6_BUDGET_S")


@pytest.fixture
def load_issue6(monkeypatch, tmp_path):
    """``load_issue6(**env)`` -> the ``issue6`` module imported afresh under those environment variables."""
    monkeypatch.syspath_prepend(str(GPU_TESTS))
    monkeypatch.setenv("OUT", str(tmp_path))

    def load(**env: str):
        for name in KNOBS:
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        for name in ("harness", "issue6"):
            sys.modules.pop(name, None)  # both read the environment at import
        module = importlib.import_module("issue6")
        # Report() records the machine (torch, sglang, git); the checks under test need none of it.
        monkeypatch.setattr(sys.modules["harness"], "environment", lambda: {"command": "test"})
        return module

    yield load
    for name in ("harness", "issue6"):
        sys.modules.pop(name, None)


@pytest.fixture
def issue6(load_issue6):
    return load_issue6()


def meta(tokens: int, verify: int | None) -> dict:
    return {"completion_tokens": tokens, "spec_verify_ct": verify}


def point(issue6, c: int, tok_s: float, accept: float | None = None) -> dict:
    """A goodput point of one request, 1 s wall time, ``tok_s`` output tok/s (``accept`` tokens per verify step)."""
    tokens = int(tok_s)
    return issue6.point_stats([meta(tokens, round(tokens / accept) if accept else None)], 1.0, c, tokens)


def test_knobs(load_issue6):
    mod = load_issue6()
    assert mod.WEAK_CONF_SHIFT == -3.0 and mod.WEAK_NOISE == 2.0 and not mod.SKIP_IDENTITY
    assert (mod.ROUNDS, mod.ROUNDS_A, mod.TOGETHER_ROUNDS) == (2, 2, 5)
    mod = load_issue6(ISSUE6_WEAK_CONF_SHIFT="none", ISSUE6_WEAK_NOISE="4", ISSUE6_SKIP_IDENTITY="1")
    assert mod.WEAK_CONF_SHIFT is None and mod.WEAK_NOISE == 4.0 and mod.SKIP_IDENTITY
    assert mod.CONCURRENCIES == (1, 8, 32, 64)
    assert "--max-running-requests" in mod.TINY_ARGS and "--cuda-graph-max-bs-decode" in mod.TINY_ARGS
    args = mod.dspark_args(Path("/d"), "full")
    assert args[args.index("--speculative-dspark-verify") + 1] == "full"


def test_point_stats_and_requests(issue6):
    assert [issue6.requests_for(c) for c in (1, 8, 32, 64)] == [12, 32, 128, 256]
    p = issue6.point_stats([meta(256, 64), meta(256, 64)], 2.0, 8, 256)
    assert p["output_tok_s"] == 256.0 and p["accept_length"] == 4.0 and p["verify_ct"] == 128 and p["complete"]
    p = issue6.point_stats([meta(256, None), meta(200, None)], 4.0, 1, 256)
    assert p["accept_length"] is None and not p["complete"] and p["output_tok_s"] == 114.0


def test_goodput_table_takes_the_best_round(issue6):
    points = {"full": {1: [{"output_tok_s": 100.0}, {"output_tok_s": 110.0}], 8: [{"output_tok_s": None}]},
              "nospec": {1: [{"output_tok_s": 90.0}]}}
    assert issue6.goodput_table(points) == {"full": {1: 110.0}, "nospec": {1: 90.0}}


def test_ratio_rows_pass_fail_and_missing(issue6):
    table = {"scheduled": {1: 100.0, 8: 97.0, 32: 96.9}, "full": {1: 90.0, 8: 100.0, 32: 100.0, 64: 50.0}}
    rows = issue6.ratio_rows(table, "scheduled", "full", (1, 8, 32, 64), 0.97)
    assert [r["ok"] for r in rows] == [True, True, False, False]
    assert rows[0]["ratio"] == pytest.approx(1.1111, abs=1e-4) and rows[2]["ratio"] == 0.969
    assert rows[3]["ratio"] is None and rows[3]["scheduled"] is None and rows[3]["full"] == 50.0


def test_format_table_shows_ratios_to_the_base(issue6):
    text = issue6.format_table({"nospec": {1: 100.0, 8: 200.0}, "scheduled": {1: 150.0}}, (1, 8), "nospec")
    lines = text.splitlines()
    assert lines[0].split() == ["tok/s", "c1", "c8"]
    assert lines[1].split() == ["nospec", "100.0", "200.0"]
    assert lines[2].split() == ["scheduled", "150.0", "(1.50x)", "-"]


def test_records_summary(issue6):
    rows = [{"confidence": [0.9] * 7, "accepted": 2, "verified": 3}, {"confidence": [0.5] * 7, "accepted": 0,
                                                                      "verified": 0},
            {"confidence_logits": [1.0] * 7, "accepted": 7}]
    s = issue6.records_summary(rows)
    assert s["steps"] == 3 and s["gamma"] == 7 and s["verified_histogram"] == [1, 0, 0, 1, 0, 0, 0, 1]
    assert s["mean_verified"] == pytest.approx(10 / 3, abs=1e-4) and s["mean_accepted"] == 3.0
    assert issue6.records_summary([]) == {"steps": 0}


def test_estimates(issue6):
    assert issue6.point_estimate([], 1) == issue6.DEFAULT_POINT_S[1]
    assert issue6.point_estimate([{"wall_s": 2.0}, {"wall_s": 4.0}], 8) == pytest.approx(5.2)
    points = {1: [{"wall_s": 10.0}], 8: [{"wall_s": 1.0}]}
    assert issue6.round_estimate(points, (1, 8, 32)) == pytest.approx(13.0 + 1.3 + issue6.DEFAULT_POINT_S[32])
    state = {"a": {"points": points, "up": True}, "b": {"points": {}, "up": False}, "c": {"points": {}}}
    assert issue6.rounds_need(state, ("a", "b", "c", "missing")) == pytest.approx(
        issue6.round_estimate(points, issue6.CONCURRENCIES) + issue6.round_estimate({}, issue6.CONCURRENCIES), abs=0.1)


def fake_state(issue6, goodput: dict[str, dict[int, float]], accept: dict[str, float],
               together: dict[str, dict[int, float]] | None = None) -> dict:
    """One round of points per setting and concurrency (and of side-by-side points, ``together``)."""
    state = {name: {"points": {c: [{**point(issue6, c, v, accept.get(name)), "round": 1}] for c, v in by_c.items()}}
             for name, by_c in goodput.items()}
    for name, by_c in (together or {}).items():
        state[name]["together"] = {c: [{"output_tok_s": v, "window_s": 5.0, "round": 1}] for c, v in by_c.items()}
    return state


def test_paired_rows_take_the_median_of_same_round_ratios(issue6):
    def runs(*rates):
        return [{"round": k, "output_tok_s": v} for k, v in rates]

    points = {"scheduled": {1: runs((1, 90.0), (2, 150.0), (3, 100.0)), 8: runs((1, 95.0)), 32: runs((2, 10.0))},
              "full": {1: runs((1, 100.0), (2, 100.0), (3, 200.0)), 8: runs((1, 100.0), (2, 50.0)), 32: runs((1, 9.0))}}
    rows = issue6.paired_rows(points, "scheduled", "full", (1, 8, 32, 64), 0.97)
    # c1: 0.9, 1.5, 0.5 -> 0.9 (the best-of-rounds ratio would be 150 / 200 = 0.75); c8: only round 1 pairs
    assert [r["ratios"] for r in rows] == [[0.9, 1.5, 0.5], [0.95], [], []]
    assert [r["ratio"] for r in rows] == [0.9, 0.95, None, None] and not any(r["ok"] for r in rows)
    assert issue6.paired_rows(points, "full", "scheduled", (8,), 1.0)[0]["ratio"] == pytest.approx(1.0526, abs=1e-4)


def test_part_a_checks_pass_and_fail(issue6):
    base = {1: 400.0, 8: 3000.0, 32: 9000.0, 64: 14000.0}
    good = {"nospec": base, "full": {c: v * 1.2 for c, v in base.items()},
            "scheduled": {c: v * 1.25 for c, v in base.items()}}
    side = {"nospec": {c: v * 0.8 for c, v in base.items()},  # side by side all run slower
            "full": {c: v * 0.8 for c, v in good["full"].items()},
            "scheduled": {c: v * 0.8 * (1.1 if c == 64 else 1.0) for c, v in good["full"].items()}}
    report = issue6.Report("issue6-test")
    issue6.part_a_checks(report, fake_state(issue6, good, {"full": 4.5, "scheduled": 4.2}, side))
    assert report.ok, report.data["checks"]
    part = report.data["results"]["part_a"]
    assert part["gain_scheduled_over_full_c64"] == pytest.approx(0.1, abs=1e-3)  # side by side
    assert part["gain_scheduled_over_full_c64_one_after_the_other"] == pytest.approx(1.25 / 1.2 - 1, abs=1e-3)
    assert part["side_by_side"]["scheduled_over_nospec"][0]["ratio"] == pytest.approx(1.2)
    assert part["accept_length"]["full"] == pytest.approx(4.5, abs=0.01)

    # One after the other 5 % below full or nospec at 64: recorded, not a failure; side by side 5 % below: the check
    # fails.
    bad = {**good, "scheduled": {**good["scheduled"], 64: good["nospec"][64] * 0.95}}
    report = issue6.Report("issue6-test")
    issue6.part_a_checks(report, fake_state(issue6, bad, {}, side))
    assert report.ok, report.data["checks"]
    for den in ("full", "nospec"):  # (full below nospec at 64 for the second, so that only one check fails)
        full_64 = side["full"][64] if den == "full" else side["nospec"][64] * 0.9
        bad_side = {**side, "full": {**side["full"], 64: full_64}}
        bad_side["scheduled"] = {**side["scheduled"], 64: side[den][64] * 0.95}
        report = issue6.Report("issue6-test")
        issue6.part_a_checks(report, fake_state(issue6, good, {}, bad_side))
        failed = [c["name"] for c in report.data["checks"] if not c["ok"]]
        assert failed == [f"part a: scheduled goodput >= {den} x 0.97 at concurrency 1, 8, 32, 64, served side by "
                          "side (median over rounds)"]

    missing = {**good, "scheduled": {c: v for c, v in good["scheduled"].items() if c != 32}}
    report = issue6.Report("issue6-test")
    issue6.part_a_checks(report, fake_state(issue6, missing, {}))  # and no side-by-side points at all
    assert not report.ok and len([c for c in report.data["checks"] if not c["ok"]]) == 3


def test_part_b_checks_pass_and_fail(issue6):
    base = {1: 400.0, 8: 3000.0, 32: 9000.0, 64: 14000.0}
    weak = {"nospec": base, "weak-full": {c: v * 0.5 for c, v in base.items()},
            "weak-sched": {c: v * 0.95 for c, v in base.items()}}
    report = issue6.Report("issue6-test")
    issue6.part_b_checks(report, fake_state(issue6, weak, {"weak-full": 1.05, "weak-sched": 1.02}), {"weak": {}})
    assert report.ok, report.data["checks"]
    assert report.data["results"]["part_b"]["weak_full_over_nospec"][3]["ratio"] == 0.5

    slow = {**weak, "weak-sched": {**weak["weak-sched"], 32: base[32] * 0.85}}
    report = issue6.Report("issue6-test")
    issue6.part_b_checks(report, fake_state(issue6, slow, {"weak-full": 2.0}), {"weak": {}})
    failed = [c["name"] for c in report.data["checks"] if not c["ok"]]
    assert len(failed) == 2 and failed[0].startswith("part b premise") and "x 0.90 at concurrency 32, 64" in failed[1]


def test_run_sh_wires_issue6():
    text = (GPU_TESTS / "run.sh").read_text()
    assert "issue6) export ISSUE6_T0=${ISSUE6_T0:-$ISSUE4_T0}; run issue6 python3 tests/gpu/issue6.py ;;" in text
    assert "(SERVING|ISSUE4|ISSUE6|RAGGED)_[A-Z0-9_]+=" in text


class FakeServer:
    """A server answering every request at once with 256 tokens in 64 verify steps; ``calls`` logs (name, n, c)."""

    def __init__(self, name: str, calls: list, fail_at: int | None = None, delay: float = 0.0) -> None:
        self.name, self.calls, self.fail_at, self.delay = name, calls, fail_at, delay
        self.log_path = Path(f"/tmp/{name}.log")

    def generate_many(self, prompts, params, concurrency):
        if concurrency == self.fail_at:
            raise RuntimeError("server gone")
        self.calls.append((self.name, len(prompts), concurrency))
        return [{"meta_info": {"completion_tokens": p["max_new_tokens"], "spec_verify_ct": 64}} for p in params]

    def generate(self, prompt, params):  # one request of a side-by-side load, taking ``delay`` seconds
        time.sleep(self.delay)
        return {"meta_info": {"completion_tokens": params["max_new_tokens"]}}

    def avg_spec_accept_length(self):
        return 4.0

    def log_tail(self, lines: int = 30) -> str:
        return ""


def test_common_window_counts_only_while_every_load_runs(issue6):
    """Two loads started at 0: a finishes at 10 s, b at 12 s. b's request running from 9 s to 11 s counts half its
    tokens (1 of its 2 s is in the window); the one from 11 s to 12 s ran alone and is left out; so each goodput is
    over the same 10 s."""
    requests = {"a": [(0.0, 4.0, 256), (4.0, 10.0, 256)],
                "b": [(0.0, 5.0, 256), (5.0, 9.0, 256), (9.0, 11.0, 256), (11.0, 12.0, 256)]}
    got = issue6.common_window(requests, 0.0)
    assert got == {"a": {"window_s": 10.0, "requests_in_window": 2, "output_tok_s": 51.2},
                   "b": {"window_s": 10.0, "requests_in_window": 2, "output_tok_s": 64.0}}


def test_common_window_does_not_penalise_the_load_that_finishes_second(issue6):
    """Two loads at the same steady rate (c1: one request at a time, 1 s each), b started 0.1 s later: counting
    finished requests only, b would show 23 / 24 of a's goodput; pro rata it shows a's."""
    requests = {"a": [(float(i), i + 1.0, 256) for i in range(24)],
                "b": [(i + 0.1, i + 1.1, 256) for i in range(24)]}
    got = issue6.common_window(requests, 0.0)
    assert got["b"]["requests_in_window"] == 23
    assert got["b"]["output_tok_s"] == pytest.approx(got["a"]["output_tok_s"], rel=0.01)


def test_side_by_side_rounds_measure_the_three_servers_at_once(issue6, monkeypatch):
    """nospec and full take 4 ms a request, scheduled 2 ms, served at the same time: over the shared window
    scheduled's goodput is about twice the others'; every concurrency, every round; a round that does not fit is
    skipped."""
    monkeypatch.setattr(issue6, "TOGETHER_REQUESTS", {1: 20, 8: 40, 32: 64, 64: 128})
    monkeypatch.setattr(issue6, "TOGETHER_ROUNDS", 2)
    state = {name: {"server": FakeServer(name, [], delay=d), "points": {}}
             for name, d in (("nospec", 0.004), ("full", 0.004), ("scheduled", 0.002))}
    skipped: list = []
    issue6.together_rounds(state, [[1, 2, 3]] * 10, issue6.Clock("UNSET_T0", 1000.0), 0.0, skipped)
    assert skipped == [] and all(sorted(state[n]["together"]) == [1, 8, 32, 64] for n in issue6.PART_A)
    for c in (1, 8, 32, 64):
        full, sched = state["full"]["together"][c], state["scheduled"]["together"][c]
        assert [p["round"] for p in full] == [1, 2] and full[0]["window_s"] == sched[0]["window_s"]
    for den in ("full", "nospec"):
        c1 = [s["output_tok_s"] / f["output_tok_s"] for f, s in zip(state[den]["together"][1],
                                                                    state["scheduled"]["together"][1])]
        assert all(1.3 < r < 3.0 for r in c1), c1
    issue6.together_rounds(state, [[1, 2, 3]] * 10, issue6.Clock("UNSET_T0", 10.0), 0.0, skipped)
    assert skipped and "side by side round 1" in skipped[0]


def test_side_by_side_loads_stop_sending_once_one_has_finished(issue6, monkeypatch):
    """scheduled (2 ms a request) finishes its 40 requests first; nospec (20 ms) then sends no more: it has sent
    its first one or two waves of 8, the requests running at that moment finished, all counted pro rata."""
    monkeypatch.setattr(issue6, "TOGETHER_REQUESTS", {8: 40})
    servers = {"nospec": FakeServer("nospec", [], delay=0.02), "scheduled": FakeServer("scheduled", [], delay=0.002)}
    points = issue6.measure_together(servers, [[1, 2, 3]] * 10, 8)
    assert points["scheduled"]["requests"] == 40 and 8 <= points["nospec"]["requests"] < 24, points
    assert points["nospec"]["wall_s"] == points["scheduled"]["wall_s"]


def test_goodput_round_measures_each_concurrency_back_to_back(issue6):
    """At each concurrency every server in turn (after its warm-ups), so compared points are seconds apart; a
    server that fails is left out for the rest of the round, the others go on."""
    calls: list = []
    state = {name: {"server": FakeServer(name, calls, fail_at=8 if name == "full" else None), "points": {},
                    "up": True} for name in ("nospec", "full", "scheduled")}
    clock = issue6.Clock("UNSET_T0", 1000.0)
    skipped: list = []
    issue6.goodput_round(state, ("nospec", "full", "scheduled"), [[1, 2, 3]] * 300, clock, 1, skipped)
    measured = [(name, c) for name, n, c in calls if n == issue6.requests_for(c)]
    assert measured == [("nospec", 1), ("full", 1), ("scheduled", 1), ("nospec", 8), ("scheduled", 8),
                        ("nospec", 32), ("scheduled", 32), ("nospec", 64), ("scheduled", 64)]
    assert sorted(state["scheduled"]["points"]) == [1, 8, 32, 64] and list(state["full"]["points"]) == [1, 8]
    assert state["full"]["points"][8] == [] and "server gone" in state["full"]["error"]
    assert all(p[0]["round"] == 1 for p in state["scheduled"]["points"].values())
    assert state["scheduled"]["avg_spec_accept_length"] == 4.0 and "avg_spec_accept_length" not in state["full"]
    assert skipped == []

"""``sglang_dspark.verify_width.WidthPlanner``: the per-step verify width of scheduled verification, from lagged
and calibrated confidences and the cost profile (CPU: the published gains land at once)."""

from __future__ import annotations

import json

import numpy as np

import pytest
import torch

from sglang_dspark.cost_profile import CostProfile
from sglang_dspark.verify_width import CalibrationLog, WidthPlanner, measure_profile

GAMMA = 7
# A memory-bound target up to 64 tokens (flat 10 ms), then compute-bound (+0.05 ms per token); draft 2 ms.
COST = CostProfile(points=((1, 10.0), (64, 10.0), (1024, 58.0)), draft_points=((1, 2.0), (64, 2.0)))


def observe(planner: WidthPlanner, confidence: float, accepted: list[int], verified: int = GAMMA) -> None:
    bs = len(accepted)
    logits = torch.full((bs, GAMMA), torch.logit(torch.tensor(confidence)).item())
    planner.observe(logits, torch.tensor(accepted), verified)


def test_full_width_until_something_is_measured():
    planner = WidthPlanner(GAMMA, COST)
    assert planner.gains is None and planner.width(1) == GAMMA + 1 and planner.width(64) == GAMMA + 1


def test_good_drafts_full_width():
    planner = WidthPlanner(GAMMA, COST)
    for _ in range(50):  # the head says 0.9 per position and every draft is accepted: calibration lifts it to 1
        observe(planner, 0.9, [GAMMA] * 8)
    assert planner.gains[GAMMA + 1] == pytest.approx(GAMMA, rel=0.02)
    assert planner.width(1) == GAMMA + 1 and planner.width(64) == GAMMA + 1


def test_width_falls_with_load():
    """Drafts surviving with probability 0.7 each: worth all 7 at batch 1 (memory-bound), only 2 at batch 64
    (theta = 6.4, 7.16, 7.62, 7.51, ... for W = 1, 2, 3, 4, ...)."""
    planner = WidthPlanner(GAMMA, COST)
    planner.gains = [0.0, 0.0] + [sum(0.7**k for k in range(1, w)) for w in range(2, GAMMA + 2)]
    assert planner.width(1) == GAMMA + 1 and planner.width(64) == 3


def test_calibration_corrects_an_overconfident_head():
    """The head predicts 0.9 everywhere but only the first draft is ever accepted."""
    planner = WidthPlanner(GAMMA, COST)
    for _ in range(100):
        observe(planner, 0.9, [1] * 16)
    ratio = planner.calibration()
    assert ratio[0] == pytest.approx(1 / 0.9, rel=0.05) and ratio[1] < 0.05  # position 2 never accepted
    assert planner.gains[2] == pytest.approx(1.0, abs=0.02) and planner.gains[GAMMA + 1] < 1.1
    assert planner.width(1) == 2  # one draft is worth it, more are not (each costs the same at batch 1: ties)


def test_bad_drafts_plain_decode_with_probes():
    """Nothing is ever accepted: plain decode steps (width 1), one probe (width 2) after 4, then 8, 16, 32 ..."""
    planner = WidthPlanner(GAMMA, COST, probe=(4, 16))
    for _ in range(30):
        observe(planner, 0.6, [0] * 32, verified=1)
    widths = [planner.width(32) for _ in range(4 + 8 + 16 + 16)]
    probes = [i for i, w in enumerate(widths) if w == 2]
    assert set(widths) == {1, 2} and probes == [3, 11, 27, 43]
    observe(planner, 0.6, [1] * 32, verified=1)  # a probe finds the drafts good again: back to drafting
    observe(planner, 0.6, [1] * 32, verified=1)
    assert planner.width(32) > 1


def test_one_full_width_step_in_observe_every_is_observed():
    """Once gains are measured, ``observe`` takes one full-width step in ``OBSERVE_EVERY`` (the host copies and
    the fold cost about 0.1 ms a step), every narrower step and probe, and every step with per-request lengths."""
    every = WidthPlanner.OBSERVE_EVERY
    for ragged in (False, True):
        planner = WidthPlanner(GAMMA, COST, ragged=ragged)
        observe(planner, 0.9, [GAMMA] * 4)  # before any plan: observed
        folded = []
        for _ in range(3 * every):
            planner.plan(4)
            before = planner.gains
            observe(planner, 0.9, [GAMMA] * 4)
            folded.append(planner.gains is not before)  # a fold computes new gains
        assert sum(folded) == (3 * every if ragged else 3) and (ragged or folded[every - 1])
    planner = WidthPlanner(GAMMA, COST)
    for _ in range(100):
        observe(planner, 0.9, [1] * 16)  # only the first draft accepted: width 2 at batch 1, every step observed
    for _ in range(5):
        assert planner.width(1) == 2
        before = planner.gains
        observe(planner, 0.9, [1] * 16)
        assert planner.gains is not before
    planner = WidthPlanner(GAMMA, COST, probe=(4, 16))
    observe(planner, 0.6, [0] * 32, verified=1)  # nothing accepted: plain decode steps, then a probe
    assert [planner.width(32) for _ in range(4)] == [1, 1, 1, 2]
    before = planner.accepted.copy()
    observe(planner, 0.6, [1] * 32, verified=1)
    assert planner.accepted[0] > before[0]  # the probe was observed


def test_observe_only_counts_reached_positions():
    """Position k is evidence only for requests whose drafts 1..k-1 were all accepted."""
    planner = WidthPlanner(GAMMA, COST, decay=1.0)
    observe(planner, 0.5, [0, 3], verified=4)
    # reached: position 1 by both, 2..4 by the second only; accepted: positions 1..3 by the second
    assert planner.predicted.tolist()[:5] == pytest.approx([1 + 1.0, 1 + 0.5, 1 + 0.5, 1 + 0.5, 1])
    assert planner.accepted.tolist()[:5] == pytest.approx([1 + 1, 1 + 1, 1 + 1, 1 + 0, 1])


def test_calibration_log(tmp_path):
    path = tmp_path / "calibration.jsonl"
    log = CalibrationLog.from_env({"SGLANG_DSPARK_CALIBRATION_LOG": str(path)})
    assert CalibrationLog.from_env({}) is None
    log.write(torch.zeros((2, 3)), torch.tensor([0, 2]), 3, ["a", "b"])
    log.write(torch.zeros((1, 3)), torch.tensor([1]), 2, ["b"])
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # readable before any close
    assert rows == [{"confidence": [0.5] * 3, "accepted": 0, "verified": 3, "rid": "a", "step": 0},
                    {"confidence": [0.5] * 3, "accepted": 2, "verified": 3, "rid": "b", "step": 0},
                    {"confidence": [0.5] * 3, "accepted": 1, "verified": 2, "rid": "b", "step": 1}]


def test_measure_profile_medians_per_total():
    """(bs, W) pairs with the same total bs * W give one point (their median); the draft curve is per bs."""
    class Runner:  # a DecodeCudaGraphRunner's capture_prepare / execute
        def __init__(self, width):
            self.width, self.capture_bs = width, [1, 2, 4]

        def capture_prepare(self, bs):
            return bs, None, None

        def execute(self, forward_batch):
            return forward_batch * self.width  # the "time" of the run, read back by the fake timer below

    def timer(forward, n):  # the "time" of a run is what it returns
        return float(forward(n))

    profile = measure_profile({1: Runner(1), 2: Runner(2)}, lambda bs: (lambda: 0.5 * bs) if bs < 4 else None,
                              [1, 2, 4, 8], device="cpu", model="m", dtype="float32", timer=timer)
    assert profile.points == ((1, 1.0), (2, 2.0), (4, 4.0), (8, 8.0))
    assert profile.draft_points == ((1, 0.5), (2, 1.0)) and profile.source == "measured"
    assert measure_profile({}, lambda bs: None, [1], device="cpu", model="m", dtype="f", timer=timer) is None


def test_measured_profile_never_falls():
    """A dip in the measured times (another process on the GPU while this one timed its graphs) is noise: the
    curves are made non-decreasing, so wider verification never looks cheaper than narrower."""
    from sglang_dspark.verify_width import running_max

    assert list(running_max([(1, 9.9), (8, 8.5), (64, 8.4), (512, 13.7)])) == [(1, 9.9), (8, 9.9), (64, 9.9), (512, 13.7)]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_step_overhead_from_the_host_clock():
    """Steps arriving 4 ms later than the profile's GPU time (10 ms for a plain step at batch 1, 22 ms for a probe)
    leave 4 ms per step the profile does not see; an idle gap is not a step."""
    clock = Clock()
    planner = WidthPlanner(GAMMA, COST, clock=clock)
    planner.gains = [0.0] * (GAMMA + 2)  # nothing is ever accepted: plain steps (and probes)
    for _ in range(200):
        width = planner.width(1)
        clock.now += (planner.step_ms(1, width) - planner.overhead_ms + 4.0) / 1000.0
    assert planner.overhead_ms == pytest.approx(4.0, rel=0.01)
    clock.now += 5.0  # idle for 5 s: not a step
    planner.width(1)
    assert planner.overhead_ms == pytest.approx(4.0, rel=0.01)


def test_overhead_widens_the_verify_at_high_load():
    """With the per-step overhead of a CPU-bound server, verifying more drafts costs relatively less: the width
    that was best without it (3, test_width_falls_with_load) gives way to a wider one."""
    planner = WidthPlanner(GAMMA, COST)
    planner.gains = [0.0, 0.0] + [sum(0.7**k for k in range(1, w)) for w in range(2, GAMMA + 2)]
    planner.overhead_ms = 40.0
    best = max(range(1, GAMMA + 2), key=lambda w: 64 * (1 + planner.gains[w]) / planner.step_ms(64, w))
    assert best > 3 and planner._choose(64, None) == (best, None)


def test_summary_in_the_log(caplog):
    clock = Clock()
    planner = WidthPlanner(GAMMA, COST, clock=clock)
    with caplog.at_level("INFO", logger="sglang_dspark"):
        planner.width(4)
        clock.now += WidthPlanner.LOG_EVERY_S
        planner.width(4)
    assert "verify widths over 2 steps {8: 100%}" in caplog.text and "at full width n/a" in caplog.text
    assert not planner.widths  # counted afresh after each summary


def test_step_ms_is_the_profile_plus_overhead():
    """The per-batch-size cache of the profile's step costs gives what the profile says: draft (when drafting)
    plus verify over bs * W tokens, plus the measured overhead."""
    planner = WidthPlanner(GAMMA, COST)
    planner.overhead_ms = 1.5
    for bs in (1, 8, 64):
        for width in range(1, GAMMA + 2):
            draft = COST.draft_ms(bs) if width > 1 else 0.0
            assert planner.step_ms(bs, width) == pytest.approx(1.5 + draft + COST.verify_ms(bs * width))
    planner.overhead_ms = 0.0
    assert planner.step_ms(64, 8) == pytest.approx(2.0 + COST.verify_ms(512))


def test_ragged_lengths_follow_each_requests_history():
    """32 requests, half accepting every draft and half none, the head saying 0.5 for all: one width for the
    batch cannot tell them apart; per-request lengths give the good half all 7 drafts. Width 5 (160 rows:
    the good half's 128 and one draft more for the others) beats every other (expected committed tokens per ms
    8.57 against 8.42 at width 4 and 6.67 at 8)."""
    planner = WidthPlanner(GAMMA, COST, ragged=True)
    rids = [f"r{i}" for i in range(32)]
    for _ in range(20):
        observe(planner, 0.5, [GAMMA] * 16 + [0] * 16)  # without rids: the calibration only
        planner.observe(torch.full((32, GAMMA), 0.0), torch.tensor([GAMMA] * 16 + [0] * 16), GAMMA, rids)
    width, lengths = planner.plan(32, rids)
    assert width == 5 and lengths[:16] == [GAMMA + 1] * 16 and sum(lengths) == 32 * 5
    assert "per-request lengths in 100% of steps" in planner.summary()
    assert WidthPlanner(GAMMA, COST).plan(32, rids)[1] is None  # not ragged: one width
    assert planner.plan(16, rids[:16])[1] is None  # below RAGGED_MIN_BS: one width


def test_ragged_history_of_unverified_positions_drifts_to_the_batch_mean():
    """A request verified one draft at a time learns nothing about later positions: they drift toward the
    batch's mean survival instead of staying where they were, so the request gets longer lengths again."""
    planner = WidthPlanner(GAMMA, COST, ragged=True)
    planner.observe(torch.zeros((2, GAMMA)), torch.tensor([0, GAMMA]), GAMMA, ["a", "b"])
    low = planner._history["a"].copy()
    assert low.max() < 0.5  # first step: 0.7 x the batch mean + 0.3 x nothing accepted
    for _ in range(10):
        planner.observe(torch.zeros((2, GAMMA)), torch.tensor([1, GAMMA]), [1, GAMMA], ["a", "b"])
    mean = planner._mean_survival
    assert planner._history["a"][0] > 0.9  # its one verified draft always accepted
    later = planner._history["a"][1:]
    assert (later > low[1:] + 0.3).all() and (abs(later - mean[1:]) < 0.1).all()  # the mean moves as it learns
    planner.observe(torch.zeros((1, GAMMA)), torch.tensor([1]), 1, ["b"])
    assert set(planner._history) == {"b"}  # "a" finished: its history is dropped


def test_observe_per_request_verified_counts():
    """Per-request verified counts: a request that verified 2 drafts is no evidence at position 3."""
    planner = WidthPlanner(GAMMA, COST, decay=1.0)
    planner.observe(torch.zeros((2, GAMMA)), torch.tensor([2, 2]), [2, GAMMA])
    # position 1, 2: both reached (sigmoid(0) = 0.5 each); position 3: only the second (verified 7, accepted 2)
    assert planner.predicted.tolist()[:4] == pytest.approx([2.0, 2.0, 1.5, 1.0])
    assert planner.accepted.tolist()[:4] == pytest.approx([3.0, 3.0, 1.0, 1.0])

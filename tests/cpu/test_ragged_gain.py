"""benchmark/analysis/ragged_gain.py: per-request verify lengths against one width per step, on logged steps."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmark" / "analysis"))

from ragged_gain import calibrated_survival, compare, load_records, oracle, per_request, per_step  # noqa: E402

from sglang_dspark.cost_profile import CostProfile, builtin_profile  # noqa: E402
from sglang_dspark.verify_width import WidthPlanner  # noqa: E402

# Verification costs 1 ms per 10 tokens on top of 1 ms; a draft pass 1 ms.
COST = CostProfile(points=((1, 1.1), (1001, 101.1)), draft_points=((1, 1.0), (64, 1.0)))


def test_per_request_lengths_split_a_mixed_batch():
    """One request whose drafts all survive, one whose drafts never do: one width for both verifies either
    nothing or the bad request's drafts too; per-request lengths verify only the good request's."""
    survival = torch.tensor([[1.0] * 4, [0.0] * 4], dtype=torch.float64)
    accepted = torch.tensor([4, 0])
    tokens_step, ms_step = per_step(survival, accepted, COST, 0.0)
    tokens_req, ms_req = per_request(survival, accepted, COST, 0.0)
    assert (tokens_step, round(ms_step, 6)) == (6.0, 3.0)  # width 5 for both: draft + 10 tokens, 6 committed
    assert (tokens_req, round(ms_req, 6)) == (6.0, 2.6)  # 4 drafts of the good request only: draft + 6 tokens
    assert tokens_req / ms_req > tokens_step / ms_step


def test_calibration_rescales_an_overconfident_head():
    confidence = torch.full((4, 2), 0.8, dtype=torch.float64)
    accepted = torch.tensor([0, 0, 1, 2])  # position 1: 2 of 4 accepted; position 2: 1 of 2 reaching it
    survival = calibrated_survival(confidence, accepted)
    assert torch.allclose(survival[0], torch.tensor([0.5, 0.25], dtype=torch.float64))


def test_compare_reports_every_batch_size_and_the_ratio():
    torch.manual_seed(0)
    confidence = torch.rand((64, 7), dtype=torch.float64)
    accepted = torch.randint(0, 8, (64,))
    out = compare(confidence, accepted, COST, 0.5, [1, 8, 32])
    assert sorted(out) == [1, 8, 32]
    for rates in out.values():
        assert abs(rates["per_request_over_per_step"] - rates["per_request"] / rates["per_step"]) < 1e-3
        assert rates["oracle"] >= rates["per_request"]  # foresight: every verified draft commits


def test_bucketed_lengths_verify_a_multiple_of_the_batch_size():
    """Two requests, survivals 1 and 0: unbucketed the best is the good request's 4 drafts alone; bucketed the
    total must be 0, 2, 4, ... drafts, and 4 it is (all of the good request's)."""
    survival = torch.tensor([[1.0] * 4, [0.0] * 4], dtype=torch.float64)
    accepted = torch.tensor([4, 0])
    assert per_request(survival, accepted, COST, 0.0, bucketed=True) == per_request(survival, accepted, COST, 0.0)
    survival = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0] * 4], dtype=torch.float64)
    accepted = torch.tensor([3, 0])
    tokens, ms = per_request(survival, accepted, COST, 0.0)
    tokens_b, ms_b = per_request(survival, accepted, COST, 0.0, bucketed=True)
    assert (tokens, round(ms, 6)) == (5.0, 2.5) and (tokens_b, round(ms_b, 6)) == (5.0, 2.6)  # 3 drafts vs 4


def test_oracle_verifies_exactly_the_accepted_drafts():
    tokens, ms = oracle(torch.tensor([3, 0, 1]), COST, 0.5)
    assert (tokens, round(ms, 6)) == (7.0, round(0.5 + 1.0 + 1.1 + 0.6, 6))  # 3 + 4 drafts: 7 tokens verified
    # a draft pass not worth one token
    assert oracle(torch.tensor([1, 0, 0]), COST, 0.5) == (3.0, pytest.approx(0.5 + 1.1 + 0.2))


def test_lagged_records_pair_each_request_with_its_previous_drafted_step(tmp_path):
    path = tmp_path / "records.jsonl"
    rows = [{"confidence": [0.1, 0.2], "accepted": 1, "verified": 2, "rid": "a", "step": 0},
            {"confidence": [0.3, 0.4], "accepted": 0, "verified": 1, "rid": "b", "step": 0},  # history only
            {"confidence": [0.7, 0.8], "accepted": 2, "verified": 2, "rid": "a", "step": 2},
            {"confidence": [0.5, 0.6], "accepted": 2, "verified": 2, "rid": "a", "step": 1},  # logged out of order
            {"confidence": [0.9, 0.9], "accepted": 0, "verified": 2, "rid": "b", "step": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    confidence, accepted, previous, history = load_records(path, lagged=True)
    assert confidence.tolist() == [[0.5, 0.6], [0.9, 0.9], [0.7, 0.8]] and accepted.tolist() == [2, 0, 2]
    assert previous.tolist() == [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]
    # The history is the server's: a planner observing the steps in order, read before each step.
    planner = WidthPlanner(2, builtin_profile(1e9), ragged=True)
    want = []
    for step, batch in ((0, [rows[0], rows[1]]), (1, [rows[3], rows[4]]), (2, [rows[2]])):
        if step == 1:
            want += [planner.request_survival(["a", "b"])]
        if step == 2:
            want += [planner.request_survival(["a"])]
        logits = torch.logit(torch.tensor([r["confidence"] for r in batch], dtype=torch.float64)).float()
        planner.observe(logits, torch.tensor([r["accepted"] for r in batch]), [r["verified"] for r in batch],
                        [r["rid"] for r in batch])
    assert torch.allclose(history, torch.tensor(np.concatenate(want), dtype=torch.float64))
    # b verified one draft and missed it: position 1 moved toward 0, position 2 (not verified) toward the batch mean
    assert history[1, 0] < history[0, 0] and history[1, 1] > 0
    records = load_records(path)  # every fully verified record, no pairing
    assert len(records.accepted) == 4 and records.previous is None and records.history is None


def test_lagged_policies_equal_the_current_ones_on_unchanged_heads():
    torch.manual_seed(1)
    confidence = torch.rand((64, 7), dtype=torch.float64)
    accepted = torch.randint(0, 8, (64,))
    out = compare(confidence, accepted, COST, 0.5, [8, 32], previous=confidence.clone())
    for rates in out.values():
        assert rates["per_step_lagged"] == rates["per_step"] and rates["per_request_lagged"] == rates["per_request"]
    # Acceptance that follows the head (drafts accepted while their confidence is above 0.3): another
    # request's confidences are worse information than the request's own.
    accepted = (confidence > 0.3).long().cumprod(-1).sum(-1)
    stale = compare(confidence, accepted, COST, 0.5, [32], previous=confidence.flip(0))[32]
    assert stale["per_request_lagged"] < stale["per_request"]
    assert stale["per_request_lagged_over_per_step_lagged"] == pytest.approx(
        stale["per_request_lagged"] / stale["per_step_lagged"], abs=1e-3)

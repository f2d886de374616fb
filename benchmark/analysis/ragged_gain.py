"""What per-request verify lengths would gain over one verify width per step, from logged drafted steps.

    python benchmark/analysis/ragged_gain.py RECORDS.jsonl COST_PROFILE.json [--overhead-ms 1.5]
        [--batch-sizes 1,8,32,64] [--seed 0] [--lagged]

RECORDS are ``SGLANG_DSPARK_CALIBRATION_LOG`` lines (``{"confidence": [sigmoid(c_1)..], "accepted": a,
"verified": L}``); only fully verified ones (``L = gamma``) are used, so ``min(a, l)`` is what verifying ``l``
drafts would have accepted. They are shuffled and cut into batches of each size. Per batch both policies see
the same calibrated survivals ``s_{b,k}`` (the planner's: conditional confidences rescaled per position by
measured / predicted acceptance over all records, capped at 1, cumulative products) and the cost profile's step
time ``overhead + draft_ms(bs) [any draft] + verify_ms(tokens)``:

* per-step width: the ``W`` maximising expected committed tokens per ms (``bs * W`` tokens verified);
* per-request lengths: the ``n`` drafts maximising it, taken as the ``n`` largest survivals of the batch (each
  request's survivals fall with ``k``, so this keeps every request's verified drafts a prefix): the server's
  ``verify_width.share_rows``.

Reported per batch size: committed tokens per ms that the logged acceptances give each policy (and full
verification, no drafts, and an ``oracle`` that verifies exactly each request's accepted drafts, or none where
drafting does not pay: what per-request lengths could give with perfect foresight), and the per-request /
per-step and oracle / per-step ratios. Both choose from the current step's confidences; the server's per-step
width uses earlier steps' (it cannot wait for these), so this is the gain of per-request lengths at equal
information, an upper bound of what a lagged per-request choice could add.

``--lagged`` (records with ``rid`` and ``step``, logged since the calibration log wrote them) measures that
lagged choice: only fully verified records whose request has an earlier drafted record are kept, and both
policies choose from the survivals of that earlier record (the previous drafted step's head, the only
information a sync-free server has when it plans), scored with the current record's acceptance
(``per_step_lagged``, ``per_request_lagged``, their ratio). It also scores per-request lengths from each request's
own acceptance history instead of its head (``per_request_history``: the server's own estimate, the records fed
step by step to a ``WidthPlanner`` and read with ``request_survival`` before each step), and both per-request choices
``_bucketed``: the total of verified tokens a multiple of the batch size, what a server replaying its per-width
CUDA graphs as buckets of total tokens could run.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmark.tiny.data import read_jsonl  # noqa: E402
from sglang_dspark.cost_profile import CostProfile, builtin_profile  # noqa: E402
from sglang_dspark.verify_width import WidthPlanner, share_rows  # noqa: E402


class Records(NamedTuple):
    confidence: torch.Tensor  # float64 [n, gamma]
    accepted: torch.Tensor  # int64 [n]
    previous: Optional[torch.Tensor]  # float64 [n, gamma]: the request's confidences one drafted step earlier
    history: Optional[torch.Tensor]  # float64 [n, gamma]: the server's survival estimate from earlier steps


def load_records(path: Path, lagged: bool = False) -> Records:
    """Fully verified records; with ``lagged`` only those whose request has an earlier drafted record, with
    that record's confidences and the request's survival estimate from its acceptance history as the server keeps
    it before this step (the steps fed in order to a ``WidthPlanner``: its running calibration, its
    ``next_history``, the batch mean for a new request), else both None."""
    rows = read_jsonl(path)
    gamma = max(len(r["confidence"]) for r in rows)
    if not lagged:
        rows = [r for r in rows if r["verified"] == gamma]
        return Records(torch.tensor([r["confidence"] for r in rows], dtype=torch.float64),
                       torch.tensor([r["accepted"] for r in rows], dtype=torch.int64), None, None)
    planner = WidthPlanner(gamma, builtin_profile(1e9), ragged=True)  # the cost profile is not used here
    steps: dict[int, list[dict]] = {}
    for r in rows:
        steps.setdefault(r["step"], []).append(r)
    previous: dict[str, list[float]] = {}
    kept, earlier, past = [], [], []
    for step in sorted(steps):
        batch = steps[step]
        for r in batch:
            if r["verified"] == gamma and r["rid"] in previous:
                kept.append(r)
                earlier.append(previous[r["rid"]])
                past.append(planner.request_survival([r["rid"]])[0])
        for r in batch:
            previous[r["rid"]] = r["confidence"]
        confidence = torch.tensor([r["confidence"] for r in batch], dtype=torch.float64).clamp(1e-7, 1 - 1e-7)
        planner.observe(torch.logit(confidence).float(), torch.tensor([r["accepted"] for r in batch]),
                        [r["verified"] for r in batch], [r["rid"] for r in batch])
    return Records(torch.tensor([r["confidence"] for r in kept], dtype=torch.float64),
                   torch.tensor([r["accepted"] for r in kept], dtype=torch.int64),
                   torch.tensor(earlier, dtype=torch.float64),
                   torch.tensor(np.stack(past), dtype=torch.float64) if past else None)


def calibrated_survival(confidence: torch.Tensor, accepted: torch.Tensor,
                        heads: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Survivals ``[n, gamma]`` of ``heads`` (default: ``confidence``): conditionals rescaled per position by
    measured / predicted acceptance of ``confidence`` and ``accepted``, capped at 1."""
    positions = torch.arange(confidence.shape[1])
    reached = positions[None, :] <= accepted[:, None]  # drafts before k accepted
    hits = positions[None, :] < accepted[:, None]
    ratio = hits.sum(0).double() / (confidence * reached).sum(0).clamp(min=1e-9)
    heads = confidence if heads is None else heads
    return (heads * ratio).clamp(max=1.0).cumprod(dim=-1)


def step_ms(cost: CostProfile, overhead_ms: float, bs: int, drafts: int) -> float:
    return overhead_ms + (cost.draft_ms(bs) if drafts > 0 else 0.0) + cost.verify_ms(bs + drafts)


def per_step(
    survival: torch.Tensor, accepted: torch.Tensor, cost: CostProfile, overhead_ms: float
) -> tuple[float, float]:
    """(committed tokens, ms) of the best single width for the batch."""
    bs, gamma = survival.shape
    expected = [bs + float(survival[:, :w].sum()) for w in range(gamma + 1)]  # w drafts per request
    w = max(range(gamma + 1), key=lambda w: expected[w] / step_ms(cost, overhead_ms, bs, bs * w))
    return fixed(accepted, cost, overhead_ms, w)


def per_request(survival: torch.Tensor, accepted: torch.Tensor, cost: CostProfile, overhead_ms: float,
                bucketed: bool = False) -> tuple[float, float]:
    """(committed tokens, ms) of the best per-request lengths: the n largest survivals of the batch (``bucketed``:
    n a multiple of the batch size)."""
    bs, gamma = survival.shape
    sizes = range(0, bs * gamma + 1, bs if bucketed else 1)
    n, drafts = share_rows(survival.numpy(), sizes, lambda n: step_ms(cost, overhead_ms, bs, n))
    return float(bs + torch.minimum(accepted, torch.from_numpy(drafts)).sum()), step_ms(cost, overhead_ms, bs, n)


def oracle(accepted: torch.Tensor, cost: CostProfile, overhead_ms: float) -> tuple[float, float]:
    """(committed tokens, ms) with foresight: verifying exactly the drafts each request accepts (every verified
    draft commits), or not drafting at all where that is faster."""
    bs, drafts = accepted.shape[0], int(accepted.sum())
    exact = float(bs + drafts), step_ms(cost, overhead_ms, bs, drafts)
    plain = float(bs), step_ms(cost, overhead_ms, bs, 0)
    return max(exact, plain, key=lambda p: p[0] / p[1])


def fixed(accepted: torch.Tensor, cost: CostProfile, overhead_ms: float, drafts: int) -> tuple[float, float]:
    bs = accepted.shape[0]
    return float(bs + accepted.clamp(max=drafts).sum()), step_ms(cost, overhead_ms, bs, bs * drafts)


def compare(confidence: torch.Tensor, accepted: torch.Tensor, cost: CostProfile, overhead_ms: float,
            batch_sizes: list[int], seed: int = 0, previous: Optional[torch.Tensor] = None,
            history: Optional[torch.Tensor] = None) -> dict[int, dict[str, float]]:
    """Committed tokens per ms per policy and batch size, over the records cut into batches; with ``previous``
    (each record's request's confidences one drafted step earlier) also both policies choosing from those, and
    with ``history`` (survivals from each request's earlier acceptances) per-request lengths from that."""
    survival = calibrated_survival(confidence, accepted)
    lagged = None if previous is None else calibrated_survival(confidence, accepted, previous)
    gamma = confidence.shape[1]
    index = list(range(len(accepted)))
    random.Random(seed).shuffle(index)
    out = {}
    for bs in batch_sizes:
        totals: dict[str, list[float]] = {}
        for start in range(0, len(index) - bs + 1, bs):
            rows = torch.tensor(index[start:start + bs])
            s, a = survival[rows], accepted[rows]
            policies = {"per_step": per_step(s, a, cost, overhead_ms),
                        "per_request": per_request(s, a, cost, overhead_ms),
                        "full": fixed(a, cost, overhead_ms, gamma), "none": fixed(a, cost, overhead_ms, 0),
                        "oracle": oracle(a, cost, overhead_ms)}
            if lagged is not None:
                policies["per_step_lagged"] = per_step(lagged[rows], a, cost, overhead_ms)
                policies["per_request_lagged"] = per_request(lagged[rows], a, cost, overhead_ms)
                policies["per_request_lagged_bucketed"] = per_request(lagged[rows], a, cost, overhead_ms, True)
            if history is not None:
                policies["per_request_history"] = per_request(history[rows], a, cost, overhead_ms)
                policies["per_request_history_bucketed"] = per_request(history[rows], a, cost, overhead_ms, True)
            for name, (tokens, ms) in policies.items():
                total = totals.setdefault(name, [0.0, 0.0])
                total[0] += tokens
                total[1] += ms
        rates = {name: tokens / ms for name, (tokens, ms) in totals.items() if ms > 0}
        if rates:
            rates["per_request_over_per_step"] = rates["per_request"] / rates["per_step"]
            rates["oracle_over_per_step"] = rates["oracle"] / rates["per_step"]
            for name in ("per_request_lagged", "per_request_lagged_bucketed", "per_request_history",
                         "per_request_history_bucketed"):
                if name in rates:  # against the per-step width at the same (lagged) information
                    rates[f"{name}_over_per_step_lagged"] = rates[name] / rates["per_step_lagged"]
            out[bs] = {k: round(v, 4) for k, v in rates.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", type=Path)
    parser.add_argument("cost_profile", type=Path)
    parser.add_argument("--overhead-ms", type=float, default=1.5)
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lagged", action="store_true",
                        help="also choose from each request's previous drafted step (records with rid and step)")
    args = parser.parse_args()
    records = load_records(args.records, args.lagged)
    accepted = records.accepted
    result = compare(records.confidence, accepted, CostProfile.load(str(args.cost_profile)), args.overhead_ms,
                     [int(b) for b in args.batch_sizes.split(",")], args.seed, records.previous, records.history)
    print(json.dumps({"records": len(accepted), "mean_accepted": round(float(accepted.double().mean()), 3),
                      "overhead_ms": args.overhead_ms, "committed_tokens_per_ms": result}, indent=1))


if __name__ == "__main__":
    main()

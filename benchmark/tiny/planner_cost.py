"""Host cost of scheduled verification's per-step planner work (``WidthPlanner.plan`` and ``observe``) on this
machine's CPU, with the step's tensors on the GPU as in serving.

    python benchmark/tiny/planner_cost.py [OUT.json]     (on the GPU machine, after tests/gpu/run.sh setup)

For each batch size and regime, ``STEPS`` steps after ``WARMUP``: ``plan(bs)`` (which folds in the copies that
have landed), a small kernel standing in for the step's GPU work, ``observe`` of float32 ``[bs, gamma]``
confidence logits and int64 ``[bs]`` accepted counts. Regimes: ``full`` (every draft accepted: full width, where
one step in ``OBSERVE_EVERY`` is observed) and ``narrow`` (only the first draft accepted: width 2, every step
observed). Prints and writes mean microseconds per step of each call and the widths chosen. On the tiny pair a
step takes about 2.7 ms of host time at concurrency 1, so 100 us is about 4% of it.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter

import torch

from sglang_dspark.cost_profile import builtin_profile
from sglang_dspark.verify_width import WidthPlanner

GAMMA, WARMUP, STEPS = 7, 200, 2000
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


REGIMES = {"full": (3.0, GAMMA), "narrow": (0.0, 1)}  # (confidence logit, drafts accepted) of every request


def per_step_us(bs: int, regime: str) -> dict[str, object]:
    planner = WidthPlanner(GAMMA, builtin_profile(1e8, 3e7, gamma=GAMMA))
    logit, accepted_drafts = REGIMES[regime]
    confidence = torch.full((bs, GAMMA), logit, device=DEVICE)
    accepted = torch.full((bs,), accepted_drafts, device=DEVICE)
    spent = {"plan": 0.0, "observe": 0.0}
    widths: Counter[int] = Counter()
    for step in range(WARMUP + STEPS):
        t0 = time.perf_counter()
        width = planner.width(bs)
        t1 = time.perf_counter()
        confidence.mul_(1.0)  # the step's GPU work
        t2 = time.perf_counter()
        if width > 1:  # the worker observes drafted steps only
            planner.observe(confidence, accepted, width - 1)
        t3 = time.perf_counter()
        if step >= WARMUP:
            spent["plan"] += t1 - t0
            spent["observe"] += t3 - t2
            widths[width] += 1
    return {**{name: round(seconds * 1e6 / STEPS, 1) for name, seconds in spent.items()}, "widths": dict(widths)}


def main() -> None:
    rows = {regime: {bs: per_step_us(bs, regime) for bs in (1, 8, 32, 64)} for regime in REGIMES}
    for regime, by_bs in rows.items():
        for bs, row in by_bs.items():
            print(f"{regime} bs {bs}: plan {row['plan']} us, observe {row['observe']} us per step, "
                  f"widths {row['widths']}")
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
            json.dump({"device": device, "steps": STEPS, "us_per_step": rows}, f, indent=1)


if __name__ == "__main__":
    main()

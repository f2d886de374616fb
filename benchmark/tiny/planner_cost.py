"""Host cost of scheduled verification's per-step planner work (``WidthPlanner.plan`` and ``observe``) on this
machine's CPU, with the step's tensors on the GPU as in serving.

    python benchmark/tiny/planner_cost.py [OUT.json]     (on the GPU machine, after tests/gpu/run.sh setup)

For each batch size, ``STEPS`` steps after ``WARMUP``: ``plan(bs)`` (which folds in the copies that have
landed), a small kernel standing in for the step's GPU work, ``observe`` of float32 ``[bs, gamma]`` confidence
logits and int64 ``[bs]`` accepted counts. Prints and writes mean microseconds per step of each call. On the tiny
pair a step takes about 2.7 ms of host time at concurrency 1, so 100 us is about 4% of it.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from sglang_dspark.cost_profile import builtin_profile
from sglang_dspark.verify_width import WidthPlanner

GAMMA, WARMUP, STEPS = 7, 200, 2000


def per_step_us(bs: int) -> dict[str, float]:
    planner = WidthPlanner(GAMMA, builtin_profile(1e8, 3e7, gamma=GAMMA))
    confidence = torch.randn((bs, GAMMA), device="cuda")
    accepted = torch.randint(0, GAMMA + 1, (bs,), device="cuda")
    spent = {"plan": 0.0, "observe": 0.0}
    for step in range(WARMUP + STEPS):
        t0 = time.perf_counter()
        planner.plan(bs)
        t1 = time.perf_counter()
        confidence.mul_(1.0)  # the step's GPU work
        t2 = time.perf_counter()
        planner.observe(confidence, accepted, GAMMA)
        t3 = time.perf_counter()
        if step >= WARMUP:
            spent["plan"] += t1 - t0
            spent["observe"] += t3 - t2
    torch.cuda.synchronize()
    return {name: round(seconds * 1e6 / STEPS, 1) for name, seconds in spent.items()}


def main() -> None:
    rows = {bs: per_step_us(bs) for bs in (1, 8, 32, 64)}
    for bs, row in rows.items():
        print(f"bs {bs}: plan {row['plan']} us, observe {row['observe']} us per step")
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "steps": STEPS, "us_per_step": rows}, f, indent=1)


if __name__ == "__main__":
    main()

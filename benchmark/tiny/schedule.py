"""A step-count training schedule guarded by a wall-clock limit.

The learning rate is a function of ``step / total_steps`` only, so a run that finishes its planned
steps within the limit is a pure function of the seed. At every ``check`` the schedule projects the
finish time from the measured step rate; if the plan would overrun the limit it shrinks
``total_steps`` to what fits (the cosine still anneals before the phase ends) and records it. A hard
stop at the limit remains as the last guard. ``stopped_by`` says which case happened.
"""

from __future__ import annotations

import math
import time


class Schedule:
    def __init__(
        self,
        total_steps: int,
        time_limit_s: float,
        warmup_frac: float = 0.03,
        final_lr_frac: float = 0.1,
        log_every: int = 100,
    ) -> None:
        if total_steps < 1 or time_limit_s <= 0:
            raise ValueError(f"schedule.py: need total_steps >= 1 and time_limit_s > 0, found {total_steps}, {time_limit_s}")
        self.planned_steps = total_steps
        self.total_steps = total_steps
        self.time_limit_s = time_limit_s
        self.warmup_frac = warmup_frac
        self.final_lr_frac = final_lr_frac
        self.log_every = log_every
        self.start = time.monotonic()
        self._rate_origin: tuple[int, float] | None = None  # (step, time) after the first (warm-up) steps
        self.hit_time_limit = False

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def check(self, step: int) -> None:
        """Re-plan ``total_steps`` if the measured rate would overrun the time limit (call every few steps)."""
        now = time.monotonic()
        if self._rate_origin is None:
            self._rate_origin = (step, now)
            return
        s0, t0 = self._rate_origin
        if step <= s0 or now <= t0:
            return
        rate = (step - s0) / (now - t0)
        remaining = self.time_limit_s - (now - self.start)
        fits = step + int(0.97 * max(remaining, 0.0) * rate)
        if fits < self.total_steps:
            self.total_steps = max(fits, step + 1)

    def done(self, step: int) -> bool:
        if step >= self.total_steps:
            return True
        if self.elapsed() >= self.time_limit_s:
            self.hit_time_limit = True
            return True
        return False

    def stopped_by(self, step: int) -> str:
        if self.hit_time_limit:
            return "time limit (hard stop)"
        if self.total_steps < self.planned_steps:
            return f"steps, re-planned from {self.planned_steps} to fit the time limit"
        return "steps"

    def lr_scale(self, step: int) -> float:
        """Linear warmup over ``warmup_frac`` of the steps, then cosine down to ``final_lr_frac``."""
        p = min(step / self.total_steps, 1.0)
        if p < self.warmup_frac:
            return (step + 1) / (self.warmup_frac * self.total_steps + 1)
        t = (p - self.warmup_frac) / (1.0 - self.warmup_frac)
        return self.final_lr_frac + (1.0 - self.final_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * t))

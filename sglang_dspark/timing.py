"""Per-phase timing of DSPARK decode steps, for the performance breakdown (benchmarking only).

``SGLANG_DSPARK_STEP_TIMING=N`` makes the worker record a CUDA event at every phase boundary of its
decode step, synchronise at the end of the step (so the timed server is slower than an untimed one and
its steps do not overlap the scheduler's work), and log the mean per phase every ``N`` steps of one batch
size::

    DSPARK step timing bs=1 steps=200: prepare 0.071 draft 0.612 markov 0.301 verify 5.301 accept 0.052
    kv_inject 0.031 gpu 6.367 step 6.702 host_gap 0.335 ms

A phase's time runs from the previous boundary event to its own on the GPU timeline, so it includes any
wait for the host to launch the phase's work. ``step`` is the host wall time from one step's start to the
next's (the scheduler's work between steps included); ``host_gap = step - gpu``. ``draft`` is the
draft backbone (its CUDA graph), ``markov`` the Markov sampling and confidence head (their own graph).
"""

from __future__ import annotations

import cProfile
import io
import logging
import os
import pstats
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger("sglang_dspark")

STEP_TIMING_ENV = "SGLANG_DSPARK_STEP_TIMING"
CPU_PROFILE_ENV = "SGLANG_DSPARK_CPU_PROFILE"
PHASES = ("prepare", "draft", "markov", "verify", "accept", "kv_inject")


class NoTimer:
    """The timer when step timing is off: every call does nothing."""

    def start(self, bs: int) -> None:
        pass

    def mark(self, phase: str) -> None:
        pass

    def end(self, bs: int) -> None:
        pass


class StepTimer(NoTimer):
    """Accumulates phase times per batch size and logs their means every ``every`` steps of one size."""

    def __init__(self, every: int) -> None:
        self.every = every
        self._events: list[tuple[str, torch.cuda.Event]] = []
        self._sums: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._counts: dict[int, int] = defaultdict(int)
        self._last_start: float | None = None
        self._last_bs: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "StepTimer | NoTimer":
        """A ``StepTimer`` when ``SGLANG_DSPARK_STEP_TIMING`` is a positive step count, else a ``NoTimer``."""
        text = environ.get(STEP_TIMING_ENV, "").strip()
        if not text or text == "0":
            return NoTimer()
        try:
            every = int(text)
        except ValueError:
            raise ValueError(f"{STEP_TIMING_ENV}: expected a step count (log interval), found {text!r}") from None
        if every < 1:
            raise ValueError(f"{STEP_TIMING_ENV}: expected a positive step count, found {every}")
        logger.warning("DSPARK step timing is ON (%s=%d): every step synchronises; for benchmarking only.",
                       STEP_TIMING_ENV, every)
        return cls(every)

    def start(self, bs: int) -> None:
        now = time.perf_counter()
        if self._last_start is not None and self._last_bs == bs:  # else no wall time for this step
            self._sums[bs]["step"] += (now - self._last_start) * 1e3
            self._sums[bs]["step_n"] += 1
        self._last_start, self._last_bs = now, bs
        self._events = [("start", self._record())]
        torch.cuda.set_sync_debug_mode("warn")  # a synchronising op inside the step is logged with its line

    def mark(self, phase: str) -> None:
        self._events.append((phase, self._record()))

    def end(self, bs: int) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self._events[-1][1].synchronize()
        sums = self._sums[bs]
        for (_, before), (phase, after) in zip(self._events, self._events[1:]):
            ms = before.elapsed_time(after)
            sums[phase] += ms
            sums["gpu"] += ms
        self._counts[bs] += 1
        if self._counts[bs] % self.every == 0:
            self._log(bs)

    def _log(self, bs: int) -> None:
        n = self._counts[bs]
        sums = self._sums.pop(bs)
        self._counts[bs] = 0
        mean = {phase: sums[phase] / n for phase in (*PHASES, "gpu")}
        parts = [f"{phase} {mean[phase]:.3f}" for phase in PHASES]
        if sums["step_n"]:
            step = sums["step"] / sums["step_n"]
            parts.append(f"gpu {mean['gpu']:.3f} step {step:.3f} host_gap {step - mean['gpu']:.3f}")
        else:
            parts.append(f"gpu {mean['gpu']:.3f}")
        logger.info("DSPARK step timing bs=%d steps=%d: %s ms", bs, n, " ".join(parts))

    @staticmethod
    def _record() -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event


class CpuProfile:
    """``cProfile`` of the scheduler process's thread over a window of DSPARK decode steps (benchmarking only).

    ``SGLANG_DSPARK_CPU_PROFILE=DIR,START,COUNT``: profiling starts at the ``START``-th decode step and stops
    ``COUNT`` steps later, so it covers everything the thread does in between (the scheduler's result
    processing and batch preparation as well as the worker's launches). The stats go to
    ``DIR/dspark-cpu-<pid>.pstats``; the log gets the window's wall time per step and the top functions.
    No device synchronisation is added: where the host waits for the GPU, the waiting call shows.
    """

    TOP = 40

    def __init__(self, out_dir: Path, start: int, count: int) -> None:
        self.out_dir, self.start, self.count = out_dir, start, count
        self._steps = 0
        self._profiler = cProfile.Profile()
        self._t0 = 0.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Optional["CpuProfile"]:
        text = environ.get(CPU_PROFILE_ENV, "").strip()
        if not text:
            return None
        parts = text.split(",")
        try:
            out_dir, start, count = parts[0], int(parts[1]), int(parts[2])
        except (IndexError, ValueError):
            raise ValueError(f"{CPU_PROFILE_ENV}: expected DIR,START,COUNT (e.g. /tmp/prof,100,200), found {text!r}") from None
        if not out_dir or start < 1 or count < 1:
            raise ValueError(f"{CPU_PROFILE_ENV}: expected a directory and positive START and COUNT, found {text!r}")
        logger.warning("DSPARK CPU profile ON (%s=%s): decode steps %d..%d; for benchmarking only.",
                       CPU_PROFILE_ENV, text, start, start + count - 1)
        return cls(Path(out_dir), start, count)

    def step(self) -> None:
        """Called at the start of every decode step."""
        self._steps += 1
        if self._steps == self.start:
            self._t0 = time.perf_counter()
            self._profiler.enable()
        elif self._steps == self.start + self.count:
            self._profiler.disable()
            self._write((time.perf_counter() - self._t0) * 1e3 / self.count)

    def _write(self, ms_per_step: float) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"dspark-cpu-{os.getpid()}.pstats"
        self._profiler.dump_stats(str(path))
        text = io.StringIO()
        pstats.Stats(self._profiler, stream=text).sort_stats("cumulative").print_stats(self.TOP)
        logger.info("DSPARK CPU profile: %d steps, %.3f ms per step (wall, profiler overhead included), "
                    "stats in %s\n%s", self.count, ms_per_step, path, text.getvalue())

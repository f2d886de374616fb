"""Summary of a GPU kernel trace (SGLang's ``/start_profile`` with ``activities: ["GPU"]``, a Chrome trace).

    python benchmark/analysis/gpu_trace.py TRACE.trace.json.gz [--steps N] [--top 20]
    python benchmark/analysis/gpu_trace.py TRACE.trace.json.gz --against BASE.trace.json.gz --steps N

Reads the device events (kernels, memcpys, memsets) and reports, over the window from the first to the last
of them: the window length, the time at least one of them ran (``busy``) and its share, the idle time in gaps
longer than 20 us, and the kernels by total time (count, total ms, mean us). ``--steps`` (the profiled forward
steps) adds per-step times. It tells where a server's GPU time goes and whether the GPU waits for the host.
``--against`` lists instead the kernels whose time per step differs most from a second trace of as many steps
(e.g. a DSPARK server against the no-speculation one at the same load).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
GAP_US = 20.0


def device_events(trace: dict[str, Any]) -> list[tuple[float, float, str]]:
    """(start us, duration us, name) of every device event, by start."""
    events = [
        (float(e["ts"]), float(e.get("dur", 0.0)), str(e.get("name", "")))
        for e in trace.get("traceEvents", [])
        if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES
    ]
    return sorted(events)


def short_name(name: str, width: int = 90) -> str:
    """A kernel name without template arguments, clipped."""
    while True:
        stripped = re.sub(r"<[^<>]*>", "", name)
        if stripped == name:
            break
        name = stripped
    return name[:width]


def summarize(events: list[tuple[float, float, str]], steps: Optional[int] = None, top: int = 20) -> dict[str, Any]:
    """Window, busy and idle times (ms) and the top kernels of ``device_events`` output."""
    if not events:
        return {"events": 0}
    start = events[0][0]
    end = max(ts + dur for ts, dur, _ in events)
    busy = idle_gaps = 0.0
    cursor = start
    for ts, dur, _ in events:
        if ts > cursor:
            gap = ts - cursor
            if gap > GAP_US:
                idle_gaps += gap
            cursor = ts
        if ts + dur > cursor:
            busy += ts + dur - max(ts, cursor)
            cursor = ts + dur
    by_name: dict[str, list[float]] = defaultdict(list)
    for _, dur, name in events:
        by_name[short_name(name)].append(dur)
    ranked = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:top]
    window = end - start
    out: dict[str, Any] = {
        "events": len(events), "window_ms": round(window / 1e3, 3), "busy_ms": round(busy / 1e3, 3),
        "busy_share": round(busy / window, 4) if window else None,
        f"idle_in_gaps_over_{int(GAP_US)}us_ms": round(idle_gaps / 1e3, 3),
        "kernels": [
            {"name": name, "count": len(durs), "total_ms": round(sum(durs) / 1e3, 3),
             "mean_us": round(sum(durs) / len(durs), 2)}
            for name, durs in ranked
        ],
    }
    if steps:
        out["steps"] = steps
        out["per_step_ms"] = {"window": round(window / 1e3 / steps, 3), "busy": round(busy / 1e3 / steps, 3),
                              "events": round(len(events) / steps, 1)}
    return out


def per_step_difference(events: list[tuple[float, float, str]], base: list[tuple[float, float, str]], steps: int,
                        top: int = 20) -> list[dict[str, Any]]:
    """Kernels by the difference of their time per step, ``events`` minus ``base`` (both of ``steps`` steps)."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0, 0])
    for column, trace in ((0, events), (1, base)):
        for _, dur, name in trace:
            row = totals[short_name(name)]
            row[column] += dur
            row[column + 2] += 1
    ranked = sorted(totals.items(), key=lambda item: -abs(item[1][0] - item[1][1]))[:top]
    return [{"name": name, "us_per_step": round((t - b) / steps, 2), "count_per_step": [round(n / steps, 2),
             round(m / steps, 2)]} for name, (t, b, n, m) in ranked]


def load(path: Path) -> dict[str, Any]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--against", type=Path, default=None, help="a base trace of as many steps (needs --steps)")
    args = parser.parse_args()
    events = device_events(load(args.trace))
    if args.against is not None:
        if not args.steps:
            parser.error("--against needs --steps")
        out: Any = per_step_difference(events, device_events(load(args.against)), args.steps, args.top)
    else:
        out = summarize(events, args.steps, args.top)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

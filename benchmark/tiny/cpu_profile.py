"""Where the host time of DSPARK's plain steps goes on the tiny pair (issue 6's weak drafter), against no speculation.

    bash tests/gpu/run.sh setup && python benchmark/tiny/cpu_profile.py     (on the GPU machine)

Three tiny servers as in ``tests/gpu/issue6.py`` (same flags and weak drafter, noise ``ISSUE6_WEAK_NOISE``):
``nospec``, ``weak-sched`` and ``weak-prof`` (``weak-sched`` with ``SGLANG_DSPARK_CPU_PROFILE``: cProfile of the
scheduler thread over decode steps ``START..START+COUNT-1``, ``sglang_dspark.timing.CpuProfile``). Each serves
the same load (HumanEval prompts, greedy, 256 new tokens, ``PROFILE_CONCURRENCY`` (32) in flight, four waves)
after a warm-up; goodput and steps per second of nospec and weak-sched say what a step costs each, the profile
says where weak-prof's host time goes: the top functions and the own time per step by source area (ours,
SGLang's scheduler, its spec-v2 code, its model executor, torch, ...). The profiled server's own goodput carries
the profiler's cost and is recorded as such. Writes ``$OUT/cpu-profile-tiny-weak.json``.
"""

from __future__ import annotations

import json
import os
import pstats
import re
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "gpu"))

from harness import OUT, Report, Server  # noqa: E402
from issue6 import TINY_ARGS, TINY_TARGET, dspark_args, greedy, humaneval_prompts, make_weak, measure  # noqa: E402

CONCURRENCY = int(os.environ.get("PROFILE_CONCURRENCY", "32"))
START, COUNT = 200, 400
WORK = Path("/tmp/cpu-profile")
LOG_DIR = WORK / "logs"
WALL_RE = re.compile(r"DSPARK CPU profile: (\d+) steps, ([\d.]+) ms per step")
# Own time is summed by the first of these path fragments a function's file contains.
AREAS = (("sglang_dspark", "/sglang_dspark/"), ("sglang speculative", "/sglang/srt/speculative/"),
         ("sglang managers (scheduler)", "/sglang/srt/managers/"),
         ("sglang model_executor", "/sglang/srt/model_executor/"), ("sglang layers", "/sglang/srt/layers/"),
         ("sglang other", "/sglang/"), ("flashinfer", "/flashinfer/"), ("torch", "/torch/"),
         ("builtins and C calls", "~"))


def area_of(filename: str) -> str:
    return next((name for name, fragment in AREAS if fragment in filename or filename == fragment), "other")


def summarise(stats_path: Path, steps: int) -> dict[str, Any]:
    """Top functions (cumulative and own ms per step) and own ms per step by area, from a pstats file."""
    stats = pstats.Stats(str(stats_path))
    rows = [(f"{Path(file).name if file != '~' else '~'}:{line}({func})", file, calls, own, cum)
            for (file, line, func), (_, calls, own, cum, _) in stats.stats.items()]
    per_step = lambda seconds: round(seconds * 1e3 / steps, 3)  # noqa: E731

    def top(key: int, n: int = 30) -> list[dict[str, Any]]:
        ranked = sorted(rows, key=lambda r: r[key], reverse=True)[:n]
        return [{"function": name, "area": area_of(file), "calls_per_step": round(calls / steps, 2),
                 "own_ms_per_step": per_step(own), "cumulative_ms_per_step": per_step(cum)}
                for name, file, calls, own, cum in ranked]

    areas: dict[str, float] = {}
    for _, file, _, own, _ in rows:
        areas[area_of(file)] = areas.get(area_of(file), 0.0) + own
    return {"own_ms_per_step_by_area": {k: per_step(v) for k, v in sorted(areas.items(), key=lambda kv: -kv[1])},
            "top_by_cumulative": top(4), "top_by_own": top(3)}


def main() -> int:
    report = Report("cpu-profile-tiny-weak")
    weak_dir, weak_record = make_weak("weak", None)
    report.data["results"]["weak_drafter"] = weak_record
    prof_dir = WORK / "prof"
    servers = {
        "nospec": Server("prof-nospec", TINY_TARGET, TINY_ARGS, 31100, log_dir=LOG_DIR),
        "weak-sched": Server("prof-weak-sched", TINY_TARGET, [*TINY_ARGS, *dspark_args(weak_dir, "scheduled")], 31200,
                             log_dir=LOG_DIR),
        "weak-prof": Server("prof-weak-prof", TINY_TARGET, [*TINY_ARGS, *dspark_args(weak_dir, "scheduled")], 31300,
                            env={"SGLANG_DSPARK_CPU_PROFILE": f"{prof_dir},{START},{COUNT}"}, log_dir=LOG_DIR),
    }
    prompts = humaneval_prompts()
    try:
        for server in servers.values():
            server.start()
            time.sleep(2)
        for name, server in servers.items():
            server.wait_ready()
            server.generate_many(prompts[:64], [greedy(16)] * 64, 64)
            server.generate_many(prompts[:CONCURRENCY], [greedy(32)] * CONCURRENCY, CONCURRENCY)
            point = measure(server, prompts, CONCURRENCY)
            if name != "nospec":
                point["ms_per_verify_step"] = round(point["wall_s"] * 1e3 * CONCURRENCY / point["verify_ct"], 3)
            else:
                point["ms_per_decode_step"] = round(point["wall_s"] * 1e3 * CONCURRENCY / point["output_tokens"], 3)
            report.data["results"][name] = {**point, "server": server.describe()}
            print(f"[cpu-profile] {name}: {point}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    log_text = servers["weak-prof"].log_path.read_text(errors="replace")
    found = WALL_RE.search(log_text)
    stats = sorted(prof_dir.glob("dspark-cpu-*.pstats"))
    report.check("the profiled server wrote its profile window", bool(found and stats),
                 {"stats": [str(p) for p in stats]})
    if found and stats:
        steps = int(found.group(1))
        report.data["results"]["profile"] = {"steps": steps, "wall_ms_per_step_profiled": float(found.group(2)),
                                             **summarise(stats[0], steps)}
    report.check("nospec and weak-sched measured", all(n in report.data["results"] for n in ("nospec", "weak-sched")))
    report.write()
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Per-request verify lengths (experimental, ``SGLANG_DSPARK_PER_REQUEST_LENGTHS=1``) on the tiny pair.

    bash tests/gpu/run.sh ragged        (on the GPU machine, about 4 minutes)

Four tiny servers with ``tests/gpu/issue6.py``'s flags, started together: ``nospec``, ``scheduled`` (one width
per step, the default), ``ragged`` (scheduled with per-request lengths) and ``ragged-log`` (the same with
``SGLANG_DSPARK_CALIBRATION_LOG``, whose per-step host copy changes timing but not tokens). The three DSPARK
servers plan with the Qwen3-8B-shape cost profile (``PROFILE``): the tiny model's own is flat (every width costs
the same), so its planner would verify every draft and never share rows out unevenly. Checks:

* the ragged server's greedy outputs at concurrency 32 and 64 (HumanEval prompts, 256 new tokens) equal no
  speculation's, or differ first at a near-tie of the target (the serving suite's judge): per-request lengths
  only shorten what a request verifies;
* per-request lengths were used: in ``ragged-log``'s records, drafted steps whose requests verified different
  numbers of drafts, and no record accepting more drafts than it verified;
* every request answered with 256 tokens, servers alive at the end.

Recorded, not checked: goodput of nospec, scheduled and ragged at concurrency 32 and 64 over ``RAGGED_ROUNDS``
(4) rounds measured back to back, with the paired ratios' medians, and their tokens per verify step (the tiny
pair's points are host-bound and noisy, ``issue6.json``, and its planners optimise the 8B shape's costs).
Writes ``$OUT/ragged.json`` and ``$OUT/ragged-logs.tar.gz``.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import REPO, TINY_DRAFT, TINY_TARGET, Clock, Report, Server, info, pack_logs  # noqa: E402
from issue6 import (  # noqa: E402
    N_OUT, TINY_ARGS, dspark_args, greedy, humaneval_prompts, measure, paired_rows, start_wave,
)
from serving import Api, Judge  # noqa: E402

ROUNDS = int(os.environ.get("RAGGED_ROUNDS", "4"))
BUDGET_S = float(os.environ.get("RAGGED_BUDGET_S", "500"))
CHECKED = (32, 64)
LOG_DIR = Path("/tmp/ragged-logs")
CALIB_LOG = LOG_DIR / "calibration.jsonl"
PORTS = {"nospec": 31800, "scheduled": 31900, "ragged": 32000, "ragged-log": 32100}
RAGGED_ENV = {"SGLANG_DSPARK_PER_REQUEST_LENGTHS": "1"}
PROFILE = REPO / "benchmark" / "results" / "perf-ours-sched-nosync-cost-profile.json"


def uneven_steps(path: Path) -> dict[str, int]:
    """Drafted steps of a calibration log whose requests verified different numbers of drafts, all steps, and
    records accepting more than they verified."""
    steps: dict[int, set[int]] = defaultdict(set)
    over = 0
    for line in path.read_text().splitlines():
        record = json.loads(line)
        steps[record["step"]].add(record["verified"])
        over += record["accepted"] > record["verified"]
    return {"uneven_steps": sum(len(v) > 1 for v in steps.values()), "steps": len(steps), "accepted_over": over}


def main() -> int:
    clock = Clock("RAGGED_T0", BUDGET_S)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    CALIB_LOG.unlink(missing_ok=True)
    report = Report("ragged")
    sched = [*dspark_args(TINY_DRAFT, "scheduled"), "--speculative-dspark-cost-profile", str(PROFILE)]
    servers = {
        "nospec": Server("ragged-nospec", TINY_TARGET, TINY_ARGS, PORTS["nospec"], log_dir=LOG_DIR),
        "scheduled": Server("ragged-scheduled", TINY_TARGET, [*TINY_ARGS, *sched], PORTS["scheduled"], log_dir=LOG_DIR),
        "ragged": Server("ragged-ragged", TINY_TARGET, [*TINY_ARGS, *sched], PORTS["ragged"], env=RAGGED_ENV,
                         log_dir=LOG_DIR),
        "ragged-log": Server("ragged-log", TINY_TARGET, [*TINY_ARGS, *sched], PORTS["ragged-log"],
                             env={**RAGGED_ENV, "SGLANG_DSPARK_CALIBRATION_LOG": str(CALIB_LOG)}, log_dir=LOG_DIR),
    }
    prompts = humaneval_prompts()
    try:
        start_wave(servers, clock)
        for server in servers.values():
            server.wait_ready()
        judge = Judge(Api(servers["nospec"], clock), strict=False)
        for c in CHECKED:
            batch = prompts[: 2 * c]
            outs = {name: servers[name].generate_many(batch, [greedy(N_OUT)] * len(batch), c)
                    for name in ("nospec", "ragged", "ragged-log")}
            recs = [judge.compare(p, r["output_ids"], w["output_ids"])
                    for p, r, w in zip(batch, outs["ragged"], outs["nospec"])]
            complete = all(len(r["output_ids"]) == N_OUT for rs in outs.values() for r in rs)
            differ = [f"#{i}@{r['position']} gap {r.get('gap')}" for i, r in enumerate(recs) if not r["identical"]]
            report.check(f"ragged greedy outputs at concurrency {c} ({len(batch)} prompts x {N_OUT}) equal no "
                         "speculation's but at near-ties of the target, every request complete",
                         complete and all(r["ok"] for r in recs),
                         {"identical": f"{sum(r['identical'] for r in recs)}/{len(recs)}", "differences": differ,
                          "unexplained": [r for r in recs if not r["ok"]][:3] or None})
        usage = uneven_steps(CALIB_LOG)
        report.check("per-request lengths used (ragged-log: drafted steps with uneven verified counts), no record "
                     "accepting more drafts than it verified", usage["uneven_steps"] > 0 and not usage["accepted_over"],
                     usage)
        points: dict[str, dict[int, list[dict]]] = {name: {} for name in ("nospec", "scheduled", "ragged")}
        for round_no in range(1, ROUNDS + 1):
            if clock.left() < 60:
                info("goodput", f"round {round_no} skipped: {clock.left():.0f} s left")
                break
            for c in CHECKED:
                for name in points:
                    point = measure(servers[name], prompts, c)
                    point["round"] = round_no
                    points[name].setdefault(c, []).append(point)
                    print(f"[ragged] {name} c{c} round {round_no}: {point['output_tok_s']} tok/s, "
                          f"accept {point['accept_length']}", flush=True)
        report.data["results"]["goodput"] = points
        for num, den in (("ragged", "scheduled"), ("ragged", "nospec"), ("scheduled", "nospec")):
            rows = paired_rows(points, num, den, CHECKED, 0.0)
            report.data["results"][f"{num}_over_{den}"] = rows
            info(f"goodput {num} / {den} (median of paired rounds)", {f"c{r['concurrency']}": r["ratio"] for r in rows})
        report.check("servers alive at the end", all(s.proc is not None and s.proc.poll() is None
                                                       for s in servers.values()))
    except Exception as exc:  # noqa: BLE001 - recorded as a failed check with the servers' log tails
        report.check("ragged run", False, f"{exc!r}\n" + "\n".join(f"---- {n} ----\n{s.log_tail(20)}"
                                                                    for n, s in servers.items()))
    finally:
        report.data["results"]["servers"] = {n: s.describe() for n, s in servers.items()}
        for server in servers.values():
            server.stop()
        pack_logs(LOG_DIR, "ragged-logs")
        report.write()
    print(f"ragged: {'OK' if report.ok else 'FAILED'}", flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

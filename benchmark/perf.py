"""Throughput of DSPARK against no speculation at the Qwen3-8B shape (dummy weights, simulated acceptance).

    python benchmark/perf.py --engine ours           (on the GPU machine, through benchmark/perf.sh)
    python benchmark/perf.py --engine sglang-0.5.17

One run measures one engine: its own no-speculation server and its DSPARK at simulated accept lengths 1, 2 and
3 (``SGLANG_SIMULATE_ACC_LEN``) and at the Qwen3-8B-DSpark card's per-position profile
(``SGLANG_DSPARK_SIMULATE_ACC_PROFILE``; SGLang 0.5.17 has no profile knob, so it gets the profile's mean 2.33
as ``SGLANG_SIMULATE_ACC_LEN`` instead), and ``dummy``: no simulation, the dummy-weight drafter's drafts
verified for real (a drafter that is weak in fact: its accept length is measured, near 1). Servers:
``tests/gpu/qwen3_8b`` target and draft configs, ``--load-format dummy``, the same flags for every engine and
setting; three at a time on the one GPU (started together, measured one after the other once all three are
up). Load: random 512-id prompts, 512 new tokens, greedy, ``ignore_eos``, ``2 x concurrency`` requests (3 at
concurrency 1) after a warm-up; output tok/s = all completion tokens / wall time. ``--breakdown`` (ours) adds
a server with ``SGLANG_DSPARK_STEP_TIMING`` and records its per-phase step times per batch size
(``sglang_dspark.timing``; its throughput is not a result, every timed step synchronises). Our DSPARK settings
verify every draft (``--speculative-dspark-verify full``), as SGLang 0.5.17 does; ``--scheduled`` (ours) adds
them again with confidence-scheduled verification, the product's default (named ``acc1-sched`` etc.), and
``--sync`` (ours) with ``SGLANG_DSPARK_NO_SEQ_LENS_SYNC=0``, attention planned from the host lengths the
scheduler waits for (``acc1-sync`` etc.; with ``--scheduled`` also ``acc1-sched-sync`` etc.). Results files
from before the sync-free plan was the default name the sync-free settings ``-nosync`` instead. ``--ragged`` (ours)
adds the scheduled settings again with per-request verify lengths (``SGLANG_DSPARK_PER_REQUEST_LENGTHS=1``,
named ``acc1-ragged`` etc.; under simulated acceptance every request is alike, so these measure the mechanism's
cost, not what per-request lengths gain). Scheduled
settings load one cost profile, measured first on the idle GPU by the profiler command (``python -m
sglang_dspark.cost_profile server``), so that no server times its graphs while others start next to it.

Writes ``$OUT/perf-<engine>.json``: command, commit, date, device, server flags, and per setting and
concurrency the throughput, the speedup over this run's no-speculation server and the measured accept length
(completion tokens / verify steps). ``--trace C`` records a GPU kernel trace of ``TRACE_STEPS`` decode steps
in the middle of each setting's concurrency-``C`` load (SGLang's ``/start_profile``, GPU activity only) and
stores its summary (``benchmark/analysis/gpu_trace.py``: busy share, idle gaps, kernels by time) with the
point; that point's throughput then carries the profiler's cost. Concurrencies run in the order given
(``1,32,8,64``), each only when the budget (``--budget``, seconds from the start) leaves room for it; a
skipped point is recorded.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "gpu"))
sys.path.insert(0, str(REPO / "benchmark" / "analysis"))

from harness import Report, Server, pack_logs, random_prompts  # noqa: E402

QWEN3_8B = REPO / "tests" / "gpu" / "qwen3_8b"
CARD_PROFILE = (0.605, 0.341, 0.186, 0.099, 0.052, 0.027, 0.014)  # Qwen3-8B-DSpark card, mean accept 2.324
PROMPT_LEN, OUT_LEN, MAX_BS = 512, 512, 64
TRACE_STEPS = 40
LOG_DIR = Path(os.environ.get("PERF_LOG_DIR", "/tmp/perf-logs"))

# The same for every engine and setting (shared/device/README.md: flashinfer, no grammar backend).
SERVER_ARGS = [
    "--load-format", "dummy", "--skip-tokenizer-init", "--attention-backend", "flashinfer",
    "--grammar-backend", "none", "--sampling-backend", "pytorch", "--dtype", "bfloat16",
    "--context-length", "4096", "--mem-fraction-static", "0.88", "--max-total-tokens", "80000",
    "--cuda-graph-max-bs-decode", str(MAX_BS),
    "--max-running-requests", str(MAX_BS), "--disable-prefill-cuda-graph", "--random-seed", "0",
]
SPEC_ARGS = [
    "--speculative-algorithm", "DSPARK", "--speculative-draft-model-path", str(QWEN3_8B / "draft"),
    "--speculative-draft-load-format", "dummy",
]
TIMING_RE = re.compile(r"DSPARK step timing bs=(\d+) steps=(\d+): (.*) ms")


Setting = tuple[str, dict[str, str], list[str]]  # (name, server env, DSPARK flags beyond SPEC_ARGS)
FULL = ["--speculative-dspark-verify", "full"]


def with_host_lengths(rows: list[Setting]) -> list[Setting]:
    """The same settings planning attention from the host lengths the scheduler waits for (``-sync``)."""
    return [(f"{name}-sync", {**env, "SGLANG_DSPARK_NO_SEQ_LENS_SYNC": "0"}, extra) for name, env, extra in rows]


def settings(engine: str, breakdown: bool, sync: bool = False, scheduled: bool = False,
             ragged: bool = False) -> list[Setting]:
    """(name, server env, extra DSPARK flags) per setting; "baseline" is no speculation."""
    ours = engine == "ours"
    card = ({"SGLANG_DSPARK_SIMULATE_ACC_PROFILE": ",".join(map(str, CARD_PROFILE))} if ours
            else {"SGLANG_SIMULATE_ACC_LEN": f"{1 + sum(CARD_PROFILE):.3f}"})
    flags = FULL if ours else []
    rows = [("baseline", {}, []), ("acc1", {"SGLANG_SIMULATE_ACC_LEN": "1"}, flags),
            ("acc3", {"SGLANG_SIMULATE_ACC_LEN": "3"}, flags), ("acc2", {"SGLANG_SIMULATE_ACC_LEN": "2"}, flags),
            ("card", card, flags), ("dummy", {}, flags)]
    dspark = rows[1:6]
    if breakdown:
        rows.append(("breakdown", {**card, "SGLANG_DSPARK_STEP_TIMING": "100"}, flags))
    if sync:
        rows += with_host_lengths(dspark)
    if scheduled and ours:
        sched = [(f"{name}-sched", env, []) for name, env, _ in dspark]
        rows += sched + (with_host_lengths(sched) if sync else [])
    if ragged and ours:
        rows += [(f"{name}-ragged", {**env, "SGLANG_DSPARK_PER_REQUEST_LENGTHS": "1"}, []) for name, env, _ in dspark]
    return rows


def runs_scheduled(name: str, extra: list[str]) -> bool:
    """Our DSPARK setting running scheduled verification (the default: no ``--speculative-dspark-verify``), not
    the no-speculation baseline."""
    return name != "baseline" and "--speculative-dspark-verify" not in extra


def measure_cost_profile(out: Path, port: int) -> dict[str, Any]:
    """The profiler command's cost profile of the Qwen3-8B-shaped pair on this GPU, written to ``out``."""
    from sglang_dspark.cost_profile import profile_from_server

    args = ["--model-path", str(QWEN3_8B / "target"), *SERVER_ARGS, *SPEC_ARGS, "--port", str(port)]
    start = time.time()
    profile = profile_from_server(out, args, timeout_s=400.0)
    print(f"[perf] cost profile {out} in {time.time() - start:.0f} s", flush=True)
    return {"path": str(out), "seconds": round(time.time() - start, 1), "points": profile.points,
            "draft_points": profile.draft_points}


def prompts(n: int, seed: int) -> list[list[int]]:
    return random_prompts(n, PROMPT_LEN, 150000, seed, low=100)


def measure(server: Server, concurrency: int, seed: int, trace_dir: Path | None = None) -> dict[str, Any]:
    """One load point; with ``trace_dir`` a GPU trace of ``TRACE_STEPS`` steps is taken once the load runs."""
    n = 3 if concurrency == 1 else 2 * concurrency
    params = {"temperature": 0.0, "max_new_tokens": OUT_LEN, "ignore_eos": True}
    batch = prompts(n, seed)
    start = time.time()
    with ThreadPoolExecutor(max_workers=concurrency + 1) as pool:
        traced = pool.submit(trace_steps, server, trace_dir) if trace_dir is not None else None
        responses = list(pool.map(lambda ids: server.generate(ids, params), batch))
        trace = traced.result() if traced is not None else None
    wall = time.time() - start
    meta = [r["meta_info"] for r in responses]
    tokens = sum(m["completion_tokens"] for m in meta)
    steps = sum(m.get("spec_verify_ct") or 0 for m in meta)
    return {"concurrency": concurrency, "requests": n, "wall_s": round(wall, 3), "output_tokens": tokens,
            "output_tok_s": round(tokens / wall, 1),
            "accept_length": round(tokens / steps, 3) if steps else None,
            "mean_e2e_s": round(sum(m["e2e_latency"] for m in meta) / n, 3),
            **({"gpu_trace": trace} if trace is not None else {})}


def trace_steps(server: Server, out_dir: Path, delay_s: float = 2.0) -> dict[str, Any]:
    """After ``delay_s`` (prompts prefilled, decoding), a GPU-only trace of ``TRACE_STEPS`` forward steps through
    SGLang's ``/start_profile``, summarised by ``gpu_trace.summarize`` (the trace file stays in the logs)."""
    import requests
    from gpu_trace import device_events, load, summarize

    time.sleep(delay_s)
    out_dir.mkdir(parents=True, exist_ok=True)
    body = {"output_dir": str(out_dir), "num_steps": TRACE_STEPS, "activities": ["GPU"], "with_stack": False}
    requests.post(server.url + "/start_profile", json=body, timeout=60).raise_for_status()
    for _ in range(120):
        files = sorted(out_dir.glob("*.trace.json.gz"))
        if files:
            time.sleep(1.0)  # the export may still be writing
            try:
                return {"file": str(files[-1]), **summarize(device_events(load(files[-1])), TRACE_STEPS)}
            except (OSError, ValueError):
                continue
        time.sleep(0.5)
    return {"error": f"no trace written to {out_dir}"}


def timing_lines(log: Path) -> list[dict[str, Any]]:
    """The worker's step-timing log lines -> [{bs, steps, phase: ms, ...}]."""
    rows = []
    for bs, steps, body in TIMING_RE.findall(log.read_text(errors="replace")):
        words = body.split()
        rows.append({"bs": int(bs), "steps": int(steps), **{k: float(v) for k, v in zip(words[::2], words[1::2])}})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("ours", "sglang-0.5.17"), required=True)
    parser.add_argument("--concurrency", default="1,32,8,64", help="comma-separated, measured in this order")
    parser.add_argument("--only", default="", help="comma-separated setting names to run (default: all)")
    parser.add_argument("--breakdown", action="store_true", help="ours: add the step-timing server (per-phase times per batch size)")
    parser.add_argument("--sync", action="store_true",
                        help="ours: add acc1/acc3/acc2/card/dummy with SGLANG_DSPARK_NO_SEQ_LENS_SYNC=0 "
                             "(with --scheduled also scheduled)")
    parser.add_argument("--scheduled", action="store_true",
                        help="ours: add acc1/acc3/acc2/card/dummy with scheduled verification "
                             "(the default without FULL flags)")
    parser.add_argument("--ragged", action="store_true",
                        help="ours: add acc1/acc3/acc2/card/dummy with per-request verify lengths (experimental)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds from start for the whole run")
    parser.add_argument("--wave", type=int, default=3, help="servers started together")
    parser.add_argument("--trace", type=int, default=0, help="a concurrency whose points get a GPU kernel trace")
    parser.add_argument("--cost-profile", default="",
                        help="ours: a cost profile file for the scheduled settings instead of measuring one first")
    args = parser.parse_args()
    t0 = float(os.environ.get("PERF_T0", time.time()))
    deadline = t0 + args.budget
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    rows = settings(args.engine, args.breakdown, args.sync, args.scheduled, args.ragged)
    if args.only:
        keep = set(args.only.split(","))
        rows = [r for r in rows if r[0] in keep]

    report = Report(f"perf-{args.engine}")
    results = report.data["results"]
    results.update({"engine": args.engine, "server_args": SERVER_ARGS, "spec_args": SPEC_ARGS,
                    "prompt_len": PROMPT_LEN, "output_len": OUT_LEN, "settings": {}, "skipped": []})
    port = 29000  # below the ephemeral range, where each server's NCCL port is taken (tests/gpu/issue6.py)
    if args.engine == "ours" and any(runs_scheduled(name, extra) for name, _, extra in rows):
        try:
            results["cost_profile"] = (
                {"path": str(Path(args.cost_profile).resolve()), "given": True} if args.cost_profile
                else measure_cost_profile(LOG_DIR / "cost-profile.json", port)
            )
        except Exception as exc:  # noqa: BLE001 - the scheduled servers then time their own (auto)
            report.check("cost profile measured first (profiler command)", False,
                         f"{type(exc).__name__}: {exc}"[:4000])
        else:
            profile_flag = ["--speculative-dspark-cost-profile", results["cost_profile"]["path"]]
            rows = [(n, e, x + profile_flag if runs_scheduled(n, x) else x) for n, e, x in rows]
        port += 10
    for start in range(0, len(rows), args.wave):
        wave = []
        for name, env, extra in rows[start:start + args.wave]:
            spec = [] if name == "baseline" else SPEC_ARGS + extra
            server = Server(f"perf-{args.engine}-{name}", QWEN3_8B / "target", spec, port, env=env, log_dir=LOG_DIR,
                            common_args=SERVER_ARGS)
            wave.append((name, env, extra, server))
            port += 10
        for *_, server in wave:
            server.start()
        # Every server of the wave is up before any is measured: one still starting (capturing graphs, timing its
        # cost profile) would share the GPU with the one measured.
        failed: dict[str, Exception] = {}
        for name, _, _, server in wave:
            try:
                server.start_timeout = (time.time() - server.started_at) + max(30.0, deadline - time.time() - 30)
                server.wait_ready()
            except Exception as exc:  # noqa: BLE001 - recorded below with the setting
                failed[name] = exc
        for name, env, extra, server in wave:
            entry = results["settings"].setdefault(name, {"env": env, "flags": extra, "points": []})
            try:
                if name in failed:
                    raise failed[name]
                entry["server"] = server.describe()
                server.deadline = deadline - 15
                server.generate(prompts(1, 99)[0], {"temperature": 0.0, "max_new_tokens": 64, "ignore_eos": True})
                for c in concurrencies:
                    if time.time() + (40 if c <= 8 else 30) > deadline - 15:
                        results["skipped"].append(f"{name} c{c}: budget")
                        continue
                    point = measure(server, c, seed=c,
                                    trace_dir=LOG_DIR / f"trace-{name}-c{c}" if c == args.trace else None)
                    entry["points"].append(point)
                    print(f"[perf] {args.engine} {name} c{c}: {point}", flush=True)
                if name == "breakdown":
                    entry["step_timing"] = timing_lines(server.log_path)
            except Exception as exc:  # noqa: BLE001 - recorded as a failed check, the other settings go on
                report.check(f"{name}: server and load", False, f"{type(exc).__name__}: {exc}"[:4000])
            finally:
                server.stop()
    _speedups(results)
    for name, entry in results["settings"].items():
        if name not in ("baseline", "breakdown"):
            report.check(f"{name}: measured at every concurrency within the budget",
                         len(entry["points"]) == len(concurrencies), [p["concurrency"] for p in entry["points"]])
    report.write()
    pack_logs(LOG_DIR, f"perf-{args.engine}-logs")
    return 0 if report.ok else 1


def _speedups(results: dict[str, Any]) -> None:
    base = {p["concurrency"]: p["output_tok_s"] for p in results["settings"].get("baseline", {}).get("points", [])}
    for entry in results["settings"].values():
        for point in entry["points"]:
            if point["concurrency"] in base:
                point["speedup"] = round(point["output_tok_s"] / base[point["concurrency"]], 3)


if __name__ == "__main__":
    sys.exit(main())

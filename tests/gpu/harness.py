"""Shared pieces of the GPU test scripts: result recording and SGLang servers driven over HTTP.

Results go to ``$OUT/<name>.json`` (``OUT`` defaults to ``./gpu-out``) with the command line, git commit,
date, device, versions, every check (name, ok, detail) and the raw numbers; a script exits non-zero when a
check fails. Servers are ``python -m sglang.launch_server`` subprocesses in their own process group,
logged to ``$OUT/logs/<name>.log``, stopped (SIGTERM, then SIGKILL) when their ``with`` block ends.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import requests

REPO = Path(__file__).resolve().parents[2]
TINY_TARGET = REPO / "tests" / "fixtures" / "tiny-qwen3"  # the tiny trained pair (benchmark/tiny/README.md)
TINY_DRAFT = REPO / "tests" / "fixtures" / "tiny-qwen3-dspark"
HUMANEVAL = REPO / "benchmark" / "tiny" / "humaneval_code.jsonl"
OUT = Path(os.environ.get("OUT") or os.environ.get("SGL_RUN_OUT") or REPO / "gpu-out")

# Flags every server of these tests gets (see shared/device/README.md): the kit has FlashInfer kernels and
# no xgrammar; configs without tokenizers are served with input_ids.
COMMON_SERVER_ARGS = [
    "--skip-tokenizer-init",
    "--attention-backend", "flashinfer",
    "--grammar-backend", "none",
    "--sampling-backend", "pytorch",
    "--disable-prefill-cuda-graph",
    "--cuda-graph-max-bs-decode", "8",
    "--dtype", "bfloat16",
    "--context-length", "4096",
    "--max-total-tokens", "65536",
    "--decode-log-interval", "1",
    "--random-seed", "0",
]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment() -> dict[str, Any]:
    import torch

    info = {
        "command": os.environ.get("DSPARK_GPU_COMMAND") or " ".join([Path(sys.executable).name, *sys.argv]),
        "script": " ".join([Path(sys.executable).name, *sys.argv]),
        "git_commit": os.environ.get("GIT_COMMIT") or _git("rev-parse", "HEAD") or "unknown",
        "git_dirty": bool(_git("status", "--porcelain")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    try:
        import sglang

        info["sglang"] = sglang.__version__
    except ImportError:
        info["sglang"] = None
    return info


def info(name: str, detail: Any) -> None:
    """A measured fact that is not a pass/fail check (printed like one)."""
    print(f"[INFO] {name}: {detail}", flush=True)


def pack_logs(log_dir: Path, name: str) -> None:
    """Pack ``log_dir`` into ``$OUT/<name>.tar.gz`` (replaced atomically; a device run returns few files)."""
    if not log_dir.is_dir():
        return
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / f"{name}.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(log_dir, arcname=name)
    os.replace(tmp, OUT / f"{name}.tar.gz")


class Clock:
    """A run's deadline: ``$<t0_env>`` (the script's start, set by run.sh; now when unset) + ``budget_s``."""

    def __init__(self, t0_env: str, budget_s: float) -> None:
        self.t0 = float(os.environ.get(t0_env) or time.time())
        self.deadline = self.t0 + budget_s

    def left(self) -> float:
        return self.deadline - time.time()

    def guard(self, seconds: float) -> float:
        """An absolute deadline ``seconds`` from now, never past the run's."""
        return min(self.deadline, time.time() + seconds)

    def elapsed(self) -> float:
        return round(time.time() - self.t0, 1)


class Report:
    """Checks and raw results of one script, written as JSON."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.data: dict[str, Any] = {"name": name, **environment(), "checks": [], "results": {}}

    def check(self, name: str, ok: bool, detail: Any = None) -> bool:
        self.data["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
        print(f"[{'PASS' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail is not None else ""), flush=True)
        return bool(ok)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn``; an exception is a failed check carrying the traceback."""
        try:
            return fn()
        except Exception:  # noqa: BLE001 - every failure must land in the report
            self.check(name, False, traceback.format_exc(limit=8))
            return None

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.data["checks"]) and bool(self.data["checks"])

    def write(self) -> Path:
        OUT.mkdir(parents=True, exist_ok=True)
        self.data["ok"] = self.ok
        path = OUT / f"{self.name}.json"
        path.write_text(json.dumps(self.data, indent=1, default=str))
        print(f"{self.name}: {'OK' if self.ok else 'FAILED'} -> {path}", flush=True)
        return path


class Server:
    """An SGLang server for the duration of a ``with`` block."""

    def __init__(
        self, name: str, model: Path, extra_args: list[str], port: int, env: dict[str, str] | None = None,
        start_timeout: float = 420.0, skip_tokenizer_init: bool = True, log_dir: Path | None = None,
        common_args: list[str] | None = None,
    ) -> None:
        """``extra_args`` come after ``common_args`` (default ``COMMON_SERVER_ARGS``), so a flag given again
        there overrides the common value; ``skip_tokenizer_init=False`` serves the model's own tokenizer
        (``text`` requests work)."""
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        common_args = COMMON_SERVER_ARGS if common_args is None else common_args
        common = [a for a in common_args if skip_tokenizer_init or a != "--skip-tokenizer-init"]
        self.args = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model),
                     *common, *extra_args, "--port", str(port)]
        self.env = {**os.environ, **(env or {})}
        self.extra_env = env or {}
        self.start_timeout = start_timeout
        self.log_path = (log_dir or OUT / "logs") / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None
        self.startup_seconds: float | None = None
        self.deadline: float | None = None  # time.time() after which requests are not waited for (None: 300 s each)

    def __enter__(self) -> "Server":
        return self.start().wait_ready()

    def start(self) -> "Server":
        """Launch the server process (returns at once; ``wait_ready`` waits for /health)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        print(f"[server {self.name}] {' '.join(self.args)}", flush=True)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        self.started_at = time.time()
        return self

    def wait_ready(self) -> "Server":
        """Wait until /health answers 200, at most ``start_timeout`` seconds after ``start``; on a time-out
        the server is stopped. Raises with the log's tail when it exits or times out."""
        assert self.proc is not None and self.started_at is not None, "wait_ready() before start()"
        while time.time() - self.started_at < self.start_timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    self.startup_seconds = round(time.time() - self.started_at, 1)
                    print(f"[server {self.name}] up after {self.startup_seconds}s", flush=True)
                    return self
            except requests.RequestException:
                pass
            time.sleep(2)
        self.stop()
        raise RuntimeError(f"server {self.name} not healthy after {self.start_timeout}s:\n{self.log_tail()}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def describe(self) -> dict[str, Any]:
        return {"command": " ".join(self.args[1:]), "env": self.extra_env, "startup_seconds": self.startup_seconds,
                "log": str(self.log_path.relative_to(OUT) if self.log_path.is_relative_to(OUT) else self.log_path)}

    # ---- requests ----

    def _request_timeout(self) -> float:
        if self.deadline is None:
            return 300.0
        left = self.deadline - time.time()
        if left <= 0:
            raise TimeoutError(f"server {self.name}: the time budget ran out before this request was sent")
        return left

    def generate(self, input_ids: list[int], sampling_params: dict[str, Any]) -> dict[str, Any]:
        payload = {"input_ids": input_ids, "sampling_params": sampling_params}
        response = requests.post(self.url + "/generate", json=payload, timeout=self._request_timeout())
        response.raise_for_status()
        return response.json()

    def generate_many(
        self, prompts: list[list[int]], sampling_params: list[dict[str, Any]], concurrency: int
    ) -> list[dict[str, Any]]:
        """All prompts with at most ``concurrency`` requests in flight; results in prompt order."""
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(self.generate, prompts, sampling_params))

    def server_info(self) -> dict[str, Any]:
        response = requests.get(self.url + "/server_info", timeout=30)
        response.raise_for_status()
        return response.json()

    def avg_spec_accept_length(self) -> float | None:
        states = self.server_info().get("internal_states") or [{}]
        return states[0].get("avg_spec_accept_length")

    def metrics(self) -> str:
        response = requests.get(self.url + "/metrics", timeout=30)
        response.raise_for_status()
        return response.text


def random_prompts(n: int, length: int, high: int, seed: int = 0, low: int = 0) -> list[list[int]]:
    """``n`` prompts of ``length`` token ids drawn uniformly from ``low..high-1`` (reproducible by ``seed``)."""
    rng = random.Random(seed)
    return [[rng.randrange(low, high) for _ in range(length)] for _ in range(n)]


def outputs(responses: list[dict]) -> list[list[int]]:
    """The ``output_ids`` of each ``/generate`` response."""
    return [r["output_ids"] for r in responses]


def mismatches(got: list[list[int]], want: list[list[int]]) -> list[dict]:
    """Per differing prompt: the first differing position, 8 tokens from there on each side, the lengths."""
    bad = []
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            first = first_difference(g, w)
            bad.append({"prompt": i, "position": first, "got": g[first:first + 8], "want": w[first:first + 8],
                        "len": [len(g), len(w)]})
    return bad


def metric_value(metrics_text: str, name: str) -> float | None:
    """The first sample of Prometheus metric ``name`` in a /metrics text, or None."""
    for line in metrics_text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            return float(line.rsplit(" ", 1)[1])
    return None


# ---- helpers of the serving tests (tests/gpu/serving.py) ----------------------------------------------


def first_difference(a: list, b: list) -> int | None:
    """The first index where ``a`` and ``b`` differ (the shorter length when one is a proper prefix of the
    other), or None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def sse_events(response: requests.Response):
    """The JSON payloads of a ``text/event-stream`` response's ``data:`` lines, up to ``data: [DONE]``."""
    for line in response.iter_lines(decode_unicode=True):
        if not line or not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def load_from_get_load(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``/v1/loads`` core fields from SGLang 0.5.15's ``GET /get_load`` answer (one entry per DP rank; here
    exactly one): ``num_reqs`` = running + waiting, ``num_waiting_reqs``, ``num_tokens`` = used + pending
    (``num_total_tokens``), ``num_pending_tokens`` = ``num_tokens`` - used (``http_server.py:730-756``), so
    ``num_running_reqs = num_reqs - num_waiting_reqs`` and ``num_used_tokens = num_tokens - num_pending_tokens``."""
    if len(entries) != 1:
        raise ValueError(f"/get_load: expected one scheduler entry, found {len(entries)}: {str(entries)[:300]}")
    e = entries[0]
    missing = [k for k in ("num_reqs", "num_waiting_reqs", "num_tokens", "num_pending_tokens") if k not in e]
    if missing:
        raise KeyError(f"/get_load: entry lacks {missing}; found keys {sorted(e)}")
    return {"num_running_reqs": e["num_reqs"] - e["num_waiting_reqs"], "num_waiting_reqs": e["num_waiting_reqs"],
            "num_used_tokens": e["num_tokens"] - e["num_pending_tokens"], "num_total_tokens": e["num_tokens"],
            "source": "/get_load"}


def server_load(url: str, timeout: float = 10.0) -> dict[str, Any]:
    """The load of the (single) scheduler behind ``url``: ``num_running_reqs``, ``num_waiting_reqs``,
    ``num_used_tokens`` (KV pool tokens held by requests: pool size - free - radix-cache evictable, so an idle
    server with a warm cache reads 0), ``num_total_tokens`` (used + tokens of waiting requests) and ``source``.

    Read from ``GET /get_load``, not ``GET /v1/loads``: with ``--enable-metrics`` every request passes SGLang
    0.5.15's HTTP metrics middleware, whose ``_get_fastapi_request_path`` (``sglang/srt/utils/common.py:2379-2387``)
    returns ``route.path`` of the first route that fully matches. ``/v1/loads`` is the only route mounted with
    ``app.include_router`` (``http_server.py:417``); FastAPI 0.165 keeps an included router as one
    ``_IncludedRouter`` entry of ``app.routes``, which has no ``.path``, so ``/v1/loads`` answers HTTP 500
    (AttributeError) whatever the query. ``/get_load`` is a plain ``@app.get`` route (``http_server.py:730``) and
    reads the same per-scheduler load snapshot (``tokenizer_manager.get_loads(include=["core"])``). The scheduler
    publishes that snapshot at every prefill, every ``--load-snapshot-publish-interval`` (15) decode steps and
    whenever it is idle (``Scheduler.on_idle`` -> ``publish_load_snapshot(force=True)``, ``scheduler.py:3568``):
    exact once idle, up to 15 steps old under load. ``/get_load`` is deprecated upstream; when it answers 404
    (a later SGLang), ``/v1/loads?include=core`` is used instead (0.5.17 fixed the middleware with ``getattr``)."""
    response = requests.get(url + "/get_load", timeout=timeout)
    if response.status_code == 404:
        response = requests.get(url + "/v1/loads", params={"include": "core"}, timeout=timeout)
        response.raise_for_status()
        loads = response.json()["loads"]
        if len(loads) != 1:
            raise ValueError(f"{url}/v1/loads: expected one scheduler, found {len(loads)}")
        return {**{k: loads[0][k] for k in ("num_running_reqs", "num_waiting_reqs", "num_used_tokens",
                                              "num_total_tokens")}, "token_usage": loads[0].get("token_usage"),
                "source": "/v1/loads"}
    response.raise_for_status()
    return load_from_get_load(response.json())


def wait_idle(url: str, timeout: float = 20.0, poll: float = 0.25) -> dict[str, Any]:
    """Poll ``server_load`` until no request runs or waits and no pool token is held, at most ``timeout`` s.
    Returns ``{"idle": bool, "seconds": waited, "load": the last load}``."""
    start = time.time()
    load: dict[str, Any] = {}
    while True:
        try:
            load = server_load(url)
        except (requests.RequestException, ValueError, KeyError) as e:
            load = {"error": repr(e)}
        idle = (load.get("num_running_reqs") == 0 and load.get("num_waiting_reqs") == 0
                and load.get("num_used_tokens") == 0)
        if idle or time.time() - start >= timeout:
            return {"idle": idle, "seconds": round(time.time() - start, 2), "load": load}
        time.sleep(poll)

"""Cost profile of a DSpark decode step, for confidence-scheduled verification (spec D).

One decode step costs ``draft_ms(bs) + verify_ms(T)``: one draft pass for the ``bs`` requests of the batch
(backbone + Markov sampling + confidence head) and one target verify forward (``TARGET_VERIFY``) over
``T = bs * W`` tokens at verify width ``W``. The width planner (``sglang_dspark.verify_width``) maximises
expected committed tokens per millisecond with it.

Both curves are piecewise linear over measured points: flat below the first point, linear between
points, and past the last point the last segment's slope continued (a negative slope, i.e. noise, is
continued as flat).

File (JSON, written by ``python -m sglang_dspark.cost_profile measure``, read with ``--speculative-dspark-
cost-profile``)::

    {"format": "sglang-dspark-cost-profile", "version": 1,
     "device": "NVIDIA H200", "model": "Qwen/Qwen3-8B", "dtype": "bfloat16", "date": "2026-01-31T12:00:00Z",
     "points": [[1, 6.1], [8, 6.2], ...],        # [total verify tokens, ms], tokens strictly increasing
     "draft_points": [[1, 0.9], [8, 1.0], ...],  # optional: [batch size, ms of one draft pass]
     "source": "measured", "meta": {...}}        # optional: how it was made (command, warmup, repeats)

Without a file the server uses ``builtin_profile`` (a roofline guess, see there).

CLI::

    python -m sglang_dspark.cost_profile measure --forward MODULE:FACTORY [--forward-arg K=V ...]
        [--draft-forward MODULE:FACTORY [--draft-forward-arg K=V ...]] --out PATH [--tokens 1,2,4,...]
    python -m sglang_dspark.cost_profile server --out PATH [--timeout S] -- LAUNCH_SERVER_ARGS...
    python -m sglang_dspark.cost_profile show PATH
    python -m sglang_dspark.cost_profile builtin --target-params 8.2e9 [--draft-params 1.0e9] --out PATH

``FACTORY(**kwargs)`` (kwargs are the ``--forward-arg`` strings) returns ``forward(n: int)``, which runs one
forward of ``n`` total tokens (verify) or ``n`` requests (draft) on the device. ``--forward synthetic`` is a
built-in stack of dense MLP layers (``synthetic_forward``), a sanity check of the timing on any device.
``server`` is the profiler of the deployed model: it starts ``python -m sglang.launch_server`` with the
given DSPARK flags and ``--speculative-dspark-cost-profile auto`` (the server times its own captured verify
and draft CUDA graphs at start-up, per verify width and batch size), takes the profile the server writes to
``$SGLANG_DSPARK_COST_PROFILE_OUT`` and stops the server; pass the file to later servers on the same GPU and
model with ``--speculative-dspark-cost-profile PATH``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch

logger = logging.getLogger("sglang_dspark")

FORMAT = "sglang-dspark-cost-profile"
VERSION = 1
DEFAULT_TOKEN_GRID = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512, 768, 1024)
DEFAULT_BATCH_GRID = (1, 2, 4, 8, 16, 24, 32, 48, 64)
OUT_ENV = "SGLANG_DSPARK_COST_PROFILE_OUT"  # where a server started with ``auto`` writes what it measured
LAUNCH_SERVER = (sys.executable, "-m", "sglang.launch_server")

Points = tuple[tuple[int, float], ...]


class CostProfileError(ValueError):
    """A cost profile file or argument is invalid; the message names the file and key at fault."""


# ---- piecewise-linear curves ---------------------------------------------------------------------------


def _slopes(points: Points) -> list[float]:
    """Slope of the segment starting at each point; the last one continues the last segment (>= 0)."""
    slopes = [(y1 - y0) / (x1 - x0) for (x0, y0), (x1, y1) in zip(points, points[1:])]
    return slopes + [max(slopes[-1], 0.0) if slopes else 0.0]


def _interpolate(points: Points, x: float) -> float:
    """The curve through ``points`` at ``x`` (see the module docstring for the extrapolation)."""
    slopes = _slopes(points)
    i = max((j for j, (xj, _) in enumerate(points) if xj <= x), default=0)
    xi, yi = points[i]
    return yi + slopes[i] * max(x - xi, 0.0)


# ---- the profile --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostProfile:
    """Measured (or estimated) step cost of one target/drafter pair on one device.

    points: ``(total verify tokens, ms)``, tokens strictly increasing, at least 2 points.
    draft_points: ``(batch size, ms of one draft pass)``, batch sizes strictly increasing; may be empty.
    """

    points: Points
    draft_points: Points = ()
    device: str = "unknown"
    model: str = "unknown"
    dtype: str = "unknown"
    date: str = ""
    source: str = "measured"  # "measured" or "builtin"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_points(self.points, "points", "<CostProfile>", min_points=2)
        _check_points(self.draft_points, "draft_points", "<CostProfile>", min_points=0)

    def verify_ms(self, total_tokens: float) -> float:
        """ms of one verify forward over ``total_tokens`` tokens (host-side; see ``tensors`` for device)."""
        return _interpolate(self.points, total_tokens)

    def draft_ms(self, batch_size: float) -> float:
        """ms of one draft pass for ``batch_size`` requests; 0.0 when the profile has no draft points."""
        return _interpolate(self.draft_points, batch_size) if self.draft_points else 0.0

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "device": self.device,
            "model": self.model,
            "dtype": self.dtype,
            "date": self.date,
            "source": self.source,
            "points": [[x, y] for x, y in self.points],
        }
        if self.draft_points:
            data["draft_points"] = [[x, y] for x, y in self.draft_points]
        if self.meta:
            data["meta"] = self.meta
        return data

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, data: Any, origin: str = "<dict>") -> CostProfile:
        """Parse the file format; ``origin`` (the file name) goes into every error message."""
        if not isinstance(data, dict):
            raise CostProfileError(f"{origin}: expected a JSON object, found {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise CostProfileError(f"{origin}: key 'format' must be {FORMAT!r}, found {data.get('format')!r}")
        if data.get("version") != VERSION:
            raise CostProfileError(f"{origin}: key 'version' must be {VERSION}, found {data.get('version')!r}")
        if "points" not in data:
            raise CostProfileError(f"{origin}: key 'points' ([[total_tokens, ms], ...]) is missing")
        points = _parse_points(data["points"], "points", origin, min_points=2)
        draft_points = _parse_points(data.get("draft_points", []), "draft_points", origin, min_points=0)
        strings = {}
        for key in ("device", "model", "dtype", "date", "source"):
            value = data.get(key, "unknown" if key != "date" else "")
            if not isinstance(value, str):
                raise CostProfileError(f"{origin}: key {key!r} must be a string, found {value!r}")
            strings[key] = value
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise CostProfileError(f"{origin}: key 'meta' must be an object, found {type(meta).__name__}")
        return cls(points=points, draft_points=draft_points, meta=meta, **strings)

    @classmethod
    def load(cls, path: str | Path) -> CostProfile:
        """Read a profile file; errors name the file and the key at fault."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CostProfileError(f"{path}: cost profile file not found") from None
        except json.JSONDecodeError as exc:
            raise CostProfileError(f"{path}: not valid JSON ({exc})") from None
        profile = cls.from_dict(data, str(path))
        logger.info(
            "cost profile %s: %s, %s, %s, %d verify points (%g..%g tokens), %d draft points",
            path, profile.device, profile.model, profile.dtype, len(profile.points), profile.points[0][0],
            profile.points[-1][0], len(profile.draft_points),
        )
        return profile

    def table(self) -> str:
        """A human-readable table of the profile (``show``)."""
        lines = [
            f"cost profile ({self.source}): device {self.device}, model {self.model}, dtype {self.dtype}, "
            f"date {self.date or '-'}",
            f"{'tokens':>8} {'verify ms':>10} {'us/token':>9}",
        ]
        lines += [f"{x:>8d} {y:>10.3f} {1e3 * y / x:>9.1f}" for x, y in self.points]
        if self.draft_points:
            lines.append(f"{'bs':>8} {'draft ms':>10}")
            lines += [f"{x:>8d} {y:>10.3f}" for x, y in self.draft_points]
        else:
            lines.append("no draft points (draft pass counted as 0 ms)")
        for key, value in self.meta.items():
            lines.append(f"meta.{key}: {value}")
        return "\n".join(lines)


def _check_points(points: Points, key: str, origin: str, min_points: int) -> None:
    if len(points) < min_points:
        raise CostProfileError(f"{origin}: key {key!r} needs at least {min_points} points, found {len(points)}")
    for i, (x, y) in enumerate(points):
        if not (isinstance(x, int) and x >= 1):
            raise CostProfileError(f"{origin}: {key}[{i}][0] must be an integer >= 1, found {x!r}")
        if not (math.isfinite(y) and y > 0):
            raise CostProfileError(f"{origin}: {key}[{i}][1] must be a finite number of ms > 0, found {y!r}")
    xs = [x for x, _ in points]
    if any(b <= a for a, b in zip(xs, xs[1:])):
        raise CostProfileError(f"{origin}: the first entries of {key!r} must strictly increase, found {xs}")


def _parse_points(raw: Any, key: str, origin: str, min_points: int) -> Points:
    if not isinstance(raw, list):
        raise CostProfileError(f"{origin}: key {key!r} must be a list of [x, ms] pairs, found {type(raw).__name__}")
    points = []
    for i, pair in enumerate(raw):
        if not (isinstance(pair, list) and len(pair) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair
        )):
            raise CostProfileError(f"{origin}: {key}[{i}] must be a pair of numbers [x, ms], found {pair!r}")
        x, y = pair
        if isinstance(x, float) and x.is_integer():
            x = int(x)
        points.append((x, float(y)))
    points = tuple(points)
    _check_points(points, key, origin, min_points)
    return points


# ---- built-in fallback ---------------------------------------------------------------------------------


def _roofline_points(params: float, bytes_per_param: float, bandwidth_gbs: float, tflops: float,
                     overhead_ms: float, tokens_per_unit: int) -> Points:
    """Points of ``overhead + max(weight read, compute)`` for a unit (token or request) grid.

    Weight read ``params * bytes / bandwidth`` is the same for any token count (memory-bound); compute is
    ``2 * params * tokens / flops``. They cross at the knee ``bytes * flops / (2 * bandwidth)`` tokens;
    three points (1, knee, 2 * knee) describe the curve, and extrapolation continues its slope.
    """
    read_ms = params * bytes_per_param / (bandwidth_gbs * 1e9) * 1e3
    per_token_ms = 2.0 * params / (tflops * 1e12) * 1e3
    knee_units = max(2, math.ceil(read_ms / per_token_ms / tokens_per_unit))
    return tuple(
        (units, overhead_ms + max(read_ms, per_token_ms * units * tokens_per_unit))
        for units in (1, knee_units, 2 * knee_units)
    )


def builtin_profile(
    target_params: float,
    draft_params: float = 0.0,
    gamma: int = 7,
    bytes_per_param: float = 2.0,
    bandwidth_gbs: float = 4000.0,
    tflops: float = 600.0,
    overhead_ms: float = 0.5,
) -> CostProfile:
    """A roofline guess for when no measured profile is given. Honest about being a guess:

    * the verify forward reads every target weight once (``target_params * bytes_per_param``, bf16 = 2)
      at ``bandwidth_gbs`` and does ``2 * target_params`` FLOPs per token at ``tflops``; its time is the
      larger of the two plus ``overhead_ms`` (launches, sampling, scheduling). So it is flat up to a knee of
      ``bytes_per_param * tflops / (2 * bandwidth_gbs)`` tokens (150 with the defaults) and linear after it.
    * the draft pass is the same model over ``bs * gamma`` tokens with ``draft_params`` (backbone + the
      target ``lm_head`` it applies to all ``gamma`` slots); no draft curve when ``draft_params`` is 0.
    * it ignores attention (grows with context length), the KV cache and kernel efficiency steps, so
      CUDA-graph bucket cliffs and long contexts are not in it. The defaults are achievable (not peak)
      figures of an H200 in bf16: 4000 GB/s of 4800, 600 TFLOPs of 989 dense.
    """
    if target_params <= 0:
        raise CostProfileError(f"builtin_profile: target_params must be > 0, found {target_params}")
    if gamma < 1:
        raise CostProfileError(f"builtin_profile: gamma must be >= 1, found {gamma}")
    verify = _roofline_points(target_params, bytes_per_param, bandwidth_gbs, tflops, overhead_ms, 1)
    draft = (
        _roofline_points(draft_params, bytes_per_param, bandwidth_gbs, tflops, 0.0, gamma)
        if draft_params > 0 else ()
    )
    return CostProfile(
        points=verify,
        draft_points=draft,
        device=f"roofline {bandwidth_gbs:g} GB/s, {tflops:g} TFLOPs",
        model=f"{target_params:.3g} params (draft {draft_params:.3g})",
        dtype=f"{bytes_per_param:g} bytes/param",
        source="builtin",
        meta={"overhead_ms": overhead_ms, "gamma": gamma},
    )


# ---- measuring ---------------------------------------------------------------------------------------


class Timer(Protocol):
    def __call__(self, forward: Callable[[int], object], n: int) -> float:
        """Run ``forward(n)`` once; return its duration in ms."""


class CudaEventTimer:
    """Device time of one call, from CUDA events around it (synchronises after each call)."""

    def __call__(self, forward: Callable[[int], object], n: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        forward(n)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


class WallTimer:
    """Wall time of one call (CPU devices); ``clock`` returns seconds."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock

    def __call__(self, forward: Callable[[int], object], n: int) -> float:
        start = self.clock()
        forward(n)
        return (self.clock() - start) * 1e3


def measure_points(
    forward: Callable[[int], object], grid: Sequence[int], timer: Timer, warmup: int = 3, repeats: int = 10
) -> Points:
    """Time ``forward(n)`` for each ``n`` of ``grid``: ``warmup`` untimed calls, then the median of
    ``repeats`` timed calls. Returns ``((n, ms), ...)`` sorted by ``n``."""
    if repeats < 1 or warmup < 0:
        raise CostProfileError(f"measure_points: need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    points = []
    for n in sorted(set(grid)):
        for _ in range(warmup):
            forward(n)
        ms = statistics.median(timer(forward, n) for _ in range(repeats))
        logger.info("measured n=%d: %.4f ms (median of %d)", n, ms, repeats)
        points.append((n, float(ms)))
    return tuple(points)


def synthetic_forward(
    hidden: str = "4096", layers: str = "4", device: str = "cuda", dtype: str = "bfloat16"
) -> Callable[[int], object]:
    """A stack of ``layers`` dense MLP layers (``hidden -> 3 hidden -> hidden``) over ``n`` tokens: shows
    the memory-bound knee of the device without a model. Arguments are strings (``--forward-arg``)."""
    d, depth, dt = int(hidden), int(layers), getattr(torch, dtype)
    weights = [
        (
            torch.randn(d, 3 * d, device=device, dtype=dt) / d**0.5,
            torch.randn(3 * d, d, device=device, dtype=dt) / d**0.5,
        )
        for _ in range(depth)
    ]
    inputs = torch.randn(max(DEFAULT_TOKEN_GRID), d, device=device, dtype=dt)

    def forward(n: int) -> torch.Tensor:
        x = inputs[:n]
        for up, down in weights:
            x = torch.nn.functional.silu(x @ up) @ down
        return x

    return forward


def _load_factory(spec: str) -> Callable[..., Callable[[int], object]]:
    if spec == "synthetic":
        return synthetic_forward
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise CostProfileError(f"--forward/--draft-forward must be MODULE:FACTORY or 'synthetic', got {spec!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise CostProfileError(f"cannot load forward factory {spec!r}: {exc}") from None


def _parse_kwargs(pairs: Sequence[str], flag: str) -> dict[str, str]:
    kwargs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CostProfileError(f"{flag} takes KEY=VALUE, got {pair!r}")
        kwargs[key] = value
    return kwargs


def _factory_kwargs(spec: str, pairs: Sequence[str], flag: str, device: str) -> dict[str, str]:
    kwargs = _parse_kwargs(pairs, flag)
    if spec == "synthetic":
        kwargs.setdefault("device", device)
    return kwargs


def _parse_grid(text: str, flag: str) -> list[int]:
    try:
        grid = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CostProfileError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not grid or min(grid) < 1:
        raise CostProfileError(f"{flag} must list integers >= 1, got {text!r}")
    return grid


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine() or "cpu"


def measure_profile(args: argparse.Namespace, argv: Sequence[str]) -> CostProfile:
    """The ``measure`` subcommand: time the factories' forwards and build the profile."""
    timer: Timer = CudaEventTimer() if args.device.startswith("cuda") else WallTimer()
    kwargs = _factory_kwargs(args.forward, args.forward_arg, "--forward-arg", args.device)
    forward = _load_factory(args.forward)(**kwargs)
    points = measure_points(forward, _parse_grid(args.tokens, "--tokens"), timer, args.warmup, args.repeats)
    draft_points: Points = ()
    if args.draft_forward is not None:
        kwargs = _factory_kwargs(args.draft_forward, args.draft_forward_arg, "--draft-forward-arg", args.device)
        draft = _load_factory(args.draft_forward)(**kwargs)
        draft_points = measure_points(
            draft, _parse_grid(args.batch_sizes, "--batch-sizes"), timer, args.warmup, args.repeats
        )
    return CostProfile(
        points=points,
        draft_points=draft_points,
        device=_device_name(args.device),
        model=args.model,
        dtype=args.dtype,
        date=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        source="measured",
        meta={
            "command": " ".join(["python -m sglang_dspark.cost_profile", *argv]),
            "warmup": args.warmup,
            "repeats": args.repeats,
            "torch": torch.__version__,
            "timer": type(timer).__name__,
        },
    )


def profile_from_server(
    out: Path, server_args: Sequence[str], timeout_s: float = 900.0, launcher: Sequence[str] = LAUNCH_SERVER
) -> CostProfile:
    """Start ``launcher + server_args + --speculative-dspark-cost-profile auto`` with ``OUT_ENV=out``, wait until
    the server has written a valid profile there, stop the server (its whole process group) and return the
    profile. The server's output goes to ``out`` with the suffix ``.server.log``, named in every error."""
    if "--speculative-algorithm" not in server_args:
        raise CostProfileError("server: pass the DSPARK launch flags after --, e.g. --model-path M "
                               "--speculative-algorithm DSPARK --speculative-draft-model-path D")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    log_path = out.with_name(out.name + ".server.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*launcher, *server_args, "--speculative-dspark-cost-profile", "auto"],
            env={**os.environ, OUT_ENV: str(out)}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if out.exists():
                    try:
                        return CostProfile.load(out)
                    except CostProfileError:  # still being written
                        pass
                if proc.poll() is not None:
                    raise CostProfileError(
                        f"server: exited with {proc.returncode} before writing {out} (log: {log_path})")
                time.sleep(0.5)
            raise CostProfileError(f"server: no cost profile in {out} after {timeout_s:g} s (log: {log_path})")
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sglang_dspark.cost_profile",
        description="Measure, show or estimate the DSpark step cost profile (--speculative-dspark-cost-profile).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="time a verify forward (and optionally a draft pass) on this device")
    m.add_argument("--forward", required=True, help="MODULE:FACTORY returning forward(total_tokens), or 'synthetic'")
    m.add_argument("--forward-arg", action="append", default=[], metavar="K=V", help="keyword for the factory")
    m.add_argument("--draft-forward", default=None, help="MODULE:FACTORY returning forward(batch_size)")
    m.add_argument("--draft-forward-arg", action="append", default=[], metavar="K=V")
    m.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKEN_GRID)), help="total-token grid")
    m.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_GRID)), help="draft batch grid")
    m.add_argument("--warmup", type=int, default=3)
    m.add_argument("--repeats", type=int, default=20)
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    m.add_argument("--model", default="unknown", help="recorded in the file")
    m.add_argument("--dtype", default="bfloat16", help="recorded in the file")
    m.add_argument("--out", required=True, type=Path)
    v = sub.add_parser("server", help="start an SGLang DSPARK server, take the profile it measures, stop it")
    v.add_argument("--out", required=True, type=Path)
    v.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the server's profile")
    v.add_argument("server_args", nargs=argparse.REMAINDER, help="-- then the launch_server flags")
    s = sub.add_parser("show", help="print a profile file as a table")
    s.add_argument("path", type=Path)
    b = sub.add_parser("builtin", help="write the built-in roofline fallback (see builtin_profile)")
    b.add_argument("--target-params", type=float, required=True)
    b.add_argument("--draft-params", type=float, default=0.0)
    b.add_argument("--gamma", type=int, default=7)
    b.add_argument("--bandwidth-gbs", type=float, default=4000.0)
    b.add_argument("--tflops", type=float, default=600.0)
    b.add_argument("--out", type=Path, default=None, help="write the file here (else only print it)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "measure":
            profile = measure_profile(args, argv)
            profile.save(args.out)
            print(f"wrote {args.out}\n{profile.table()}")
        elif args.command == "server":
            server_args = args.server_args[1:] if args.server_args[:1] == ["--"] else args.server_args
            profile = profile_from_server(args.out, server_args, args.timeout)
            print(f"wrote {args.out}\n{profile.table()}")
        elif args.command == "show":
            print(CostProfile.load(args.path).table())
        else:
            profile = builtin_profile(
                args.target_params, args.draft_params, args.gamma,
                bandwidth_gbs=args.bandwidth_gbs, tflops=args.tflops,
            )
            if args.out is not None:
                profile.save(args.out)
                print(f"wrote {args.out}")
            print(profile.table())
    except CostProfileError as exc:
        parser.exit(1, f"error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

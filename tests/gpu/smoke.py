"""End-to-end DSPARK serving checks on the bigram pair (``bigram_pair.py``), whose outputs and accepted
counts are known in advance.

    python tests/gpu/smoke.py smoke   baseline server + DSPARK with the perfect (vanilla) and half (rnn) drafts
    python tests/gpu/smoke.py more    DSPARK with simulated acceptance (constant, per-position profile), the
                                      half-gated draft, and the half draft without CUDA graphs

Checked for every DSPARK server: greedy outputs token-identical to the bigram chain (and to the
no-speculation server) at concurrency 1, 8 and 16 (16 > the captured CUDA-graph batch sizes, so the eager
draft/verify path runs too), sampled requests (temperature / top-k / top-p; the target's distribution is
one-hot here) identical as well, per-request ``spec_verify_ct`` equal to the count predicted from the
bigrams, and ``/server_info`` ``avg_spec_accept_length`` / ``/metrics`` reporting it.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bigram_pair  # noqa: E402
from harness import Report, Server, metric_value, mismatches, outputs  # noqa: E402

N_PROMPTS, N_OUT = 16, 96
GREEDY = {"temperature": 0.0, "max_new_tokens": N_OUT, "ignore_eos": True}
SAMPLED = [
    {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": N_OUT, "ignore_eos": True},
    {"temperature": 0.7, "top_k": 20, "max_new_tokens": N_OUT, "ignore_eos": True},
]
PROFILE = "0.605,0.341,0.186,0.099,0.052,0.027,0.014"


def make_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(bigram_pair.VOCAB - 2) for _ in range(rng.randint(8, 300))] for _ in range(n)]


class Smoke:
    def __init__(self, report: Report, pair: bigram_pair.BigramPair, prompts: list[list[int]]) -> None:
        self.report, self.pair, self.prompts = report, pair, prompts
        self.expected = [bigram_pair.chain(pair.f, pair.f[p[-1]], N_OUT) for p in prompts]
        self.port = 31000

    def _server(self, name: str, extra_args: list[str], env: dict[str, str] | None = None) -> Server:
        self.port += 1
        return Server(name, self.pair.target, extra_args, self.port, env)

    def _dspark_args(self, variant: str) -> list[str]:
        return ["--speculative-algorithm", "DSPARK", "--speculative-draft-model-path", str(self.pair.drafts[variant]),
                "--enable-metrics"]

    def baseline(self) -> list[list[int]]:
        with self._server("baseline", []) as server:
            server.generate_many(self.prompts[:2], [GREEDY] * 2, 2)  # warm-up
            c1 = outputs(server.generate_many(self.prompts, [GREEDY] * N_PROMPTS, 1))
            c8 = outputs(server.generate_many(self.prompts, [GREEDY] * N_PROMPTS, 8))
            self.report.data["results"]["baseline"] = {"server": server.describe()}
        self.report.check("baseline: greedy output is the bigram chain (fixture sanity)",
                          not mismatches(c1, self.expected), mismatches(c1, self.expected)[:3] or None)
        self.report.check("baseline: concurrency 8 == concurrency 1", c8 == c1, mismatches(c8, c1)[:3] or None)
        return c1

    def dspark(
        self, name: str, variant: str, reference: list[list[int]], steps_for: Callable[[int, list[int]], int] | None,
        expected_mean: tuple[float, float] | None, extra_args: list[str] = (), env: dict[str, str] | None = None,
    ) -> None:
        """One DSPARK server: outputs vs ``reference``; per-request verify counts vs ``steps_for(first
        token, g)``; server mean accept length within ``expected_mean = (value, tolerance)``."""
        g = self.pair.g[variant]
        results: dict = {}
        with self._server(name, [*self._dspark_args(variant), *extra_args], env) as server:
            server.generate_many(self.prompts[:2], [GREEDY] * 2, 2)  # warm-up
            runs = {f"greedy-c{c}": ([GREEDY] * N_PROMPTS, c) for c in (1, 8, 16)}
            runs["mixed-c8"] = ([GREEDY if i % 3 == 0 else SAMPLED[i % 2] for i in range(N_PROMPTS)], 8)
            for run, (params, concurrency) in runs.items():
                responses = server.generate_many(self.prompts, params, concurrency)
                bad = mismatches(outputs(responses), reference)
                self.report.check(f"{name} {run}: outputs identical to the target's", not bad, bad[:3] or None)
                verify = [r["meta_info"].get("spec_verify_ct") for r in responses]
                record = {"spec_verify_ct": verify,
                          "spec_accept_length": [r["meta_info"].get("spec_accept_length") for r in responses],
                          "completion_tokens": [r["meta_info"].get("completion_tokens") for r in responses]}
                if steps_for is not None:
                    want = [steps_for(e[0], g) for e in self.expected]
                    record["expected_verify_ct"] = want
                    off = [(i, v, w) for i, (v, w) in enumerate(zip(verify, want)) if v != w]
                    self.report.check(f"{name} {run}: per-request spec_verify_ct as predicted", not off, off[:5] or None)
                results[run] = record
            avg = server.avg_spec_accept_length()
            metrics = server.metrics()
            results["avg_spec_accept_length"] = avg
            results["metrics_spec_accept_length"] = metric_value(metrics, "sglang:spec_accept_length")
            results["server"] = server.describe()
        self.report.check(f"{name}: /metrics reports sglang:spec_accept_length",
                          results["metrics_spec_accept_length"] is not None, results["metrics_spec_accept_length"])
        if expected_mean is not None:
            value, tolerance = expected_mean
            self.report.check(f"{name}: /server_info avg_spec_accept_length ~ {value:.3f}",
                              avg is not None and abs(avg - value) <= tolerance, avg)
        self.report.data["results"][name] = results

    def mean_commit(self, g: list[int]) -> float:
        """Mean tokens committed per verify step over the prompts (from the bigrams)."""
        steps = sum(bigram_pair.expected_steps(self.pair.f, g, e[0], N_OUT) for e in self.expected)
        return (N_OUT - 1) * len(self.expected) / steps


def main(which: str) -> int:
    report = Report(f"gpu-smoke-{which}")
    pair = report.run("build the bigram pair", lambda: bigram_pair.build(Path("/tmp/dspark-bigram")))
    if pair is None:
        report.write()
        return 1
    smoke = Smoke(report, pair, make_prompts(N_PROMPTS))
    bigram_steps = lambda first, g: bigram_pair.expected_steps(pair.f, g, first, N_OUT)  # noqa: E731
    if which == "smoke":
        baseline = report.run("baseline server", smoke.baseline) or smoke.expected
        report.run("dspark-perfect", lambda: smoke.dspark(
            "dspark-perfect", "perfect", baseline, bigram_steps, (bigram_pair.GAMMA + 1, 0.05)))
        report.run("dspark-half", lambda: smoke.dspark(
            "dspark-half", "half", baseline, bigram_steps, (smoke.mean_commit(pair.g["half"]), 0.5)))
    elif which == "more":
        # Perfect drafts: accepting fewer than all of them still emits the target's tokens.
        constant_steps = lambda first, g: math.ceil((N_OUT - 1) / 3)  # noqa: E731
        report.run("dspark-sim-len3", lambda: smoke.dspark(
            "dspark-sim-len3", "perfect", smoke.expected, constant_steps, (3.0, 0.01),
            env={"SGLANG_SIMULATE_ACC_LEN": "3"}))
        mean = 1 + sum(float(x) for x in PROFILE.split(","))
        report.run("dspark-sim-profile", lambda: smoke.dspark(
            "dspark-sim-profile", "perfect", smoke.expected, None, (mean, 0.15),
            env={"SGLANG_DSPARK_SIMULATE_ACC_PROFILE": PROFILE}))
        report.run("dspark-half-gated", lambda: smoke.dspark(
            "dspark-half-gated", "half-gated", smoke.expected, bigram_steps, (smoke.mean_commit(pair.g["half-gated"]), 0.5)))
        report.run("dspark-half-eager", lambda: smoke.dspark(
            "dspark-half-eager", "half", smoke.expected, bigram_steps, (smoke.mean_commit(pair.g["half"]), 0.5),
            extra_args=["--disable-cuda-graph"]))
    else:
        raise SystemExit(f"smoke.py: expected 'smoke' or 'more', found {which!r}")
    report.write()
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "smoke"))

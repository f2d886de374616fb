"""Speedup over no speculation against concurrency, this project's DSPARK next to SGLang 0.5.17's.

    python benchmark/plot_perf.py [--out benchmark/results/perf-speedup.png]

Reads the result files of ``benchmark/perf.py`` named in ``SERIES`` (each engine's speedup is over its own
no-speculation server, measured in the same run; a series takes a setting from the first of its files that
has it) and draws one panel per simulated acceptance setting, with the issue's targets at concurrency 1 and
32 as markers. Needs matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = (("acc1", "accept length 1"), ("acc2", "accept length 2"), ("acc3", "accept length 3"),
            ("card", "card profile (mean 2.33)"))
TARGETS = {"acc1": {1: 0.85, 32: 0.75}, "acc2": {1: 1.65, 32: 1.10}, "acc3": {1: 2.40, 32: 1.55}}
# (label, line style, setting-name suffix, result files in order of preference)
SERIES = (
    ("sglang-dspark (default: scheduled)", "o-", "-sched-nosync", ("perf-ours-sched-nosync.json",)),
    ("sglang-dspark, full verification", "d:", "-nosync", ("perf-ours-nosync.json",)),
    ("SGLang 0.5.17 DSPARK", "s--", "", ("perf-sglang-0.5.17.json", "perf-sglang-0.5.17.run1.json")),
)


def speedups(paths: list[Path], setting: str) -> tuple[list[int], list[float]]:
    """(concurrencies, speedups) of ``setting`` from the first file that measured it."""
    for path in paths:
        points = json.loads(path.read_text())["results"]["settings"].get(setting, {}).get("points", [])
        points = sorted((p["concurrency"], p["speedup"]) for p in points if "speedup" in p)
        if points:
            return [c for c, _ in points], [s for _, s in points]
    return [], []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "perf-speedup.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SETTINGS), figsize=(4 * len(SETTINGS), 3.6), sharey=True)
    for ax, (setting, title) in zip(axes, SETTINGS):
        for label, style, suffix, files in SERIES:
            x, y = speedups([RESULTS / f for f in files], setting + suffix)
            ax.plot(x, y, style, label=label)
        for c, target in TARGETS.get(setting, {}).items():
            ax.plot([c], [target], "k^", label="target" if c == 1 else None)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 8, 32, 64], ["1", "8", "32", "64"])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("concurrency")
    axes[0].set_ylabel("output tok/s vs no speculation")
    axes[0].legend(fontsize=7)
    fig.suptitle("Qwen3-8B shape, dummy weights, simulated acceptance, H200 (512 in / 512 out, greedy)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

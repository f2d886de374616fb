"""Speedup over no speculation against concurrency, this project's DSPARK next to SGLang 0.5.17's.

    python benchmark/plot_perf.py [--ours benchmark/results/perf-ours.json]
        [--peer benchmark/results/perf-sglang-0.5.17.json] [--out benchmark/results/perf-speedup.png]

Reads the result files of ``benchmark/perf.py`` (each engine's speedup is over its own no-speculation
server, measured in the same run) and draws one panel per simulated acceptance setting, with the issue's
targets at concurrency 1 and 32 as markers. Needs matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = (("acc1", "accept length 1"), ("acc2", "accept length 2"), ("acc3", "accept length 3"),
            ("card", "card profile (mean 2.33)"))
TARGETS = {"acc1": {1: 0.85, 32: 0.75}, "acc2": {1: 1.65, 32: 1.10}, "acc3": {1: 2.40, 32: 1.55}}


def speedups(path: Path, setting: str) -> tuple[list[int], list[float]]:
    points = json.loads(path.read_text())["results"]["settings"].get(setting, {}).get("points", [])
    points = sorted((p["concurrency"], p["speedup"]) for p in points if "speedup" in p)
    return [c for c, _ in points], [s for _, s in points]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ours", type=Path, default=RESULTS / "perf-ours.json")
    parser.add_argument("--peer", type=Path, default=RESULTS / "perf-sglang-0.5.17.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "perf-speedup.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SETTINGS), figsize=(4 * len(SETTINGS), 3.6), sharey=True)
    for ax, (setting, title) in zip(axes, SETTINGS):
        for path, label, style in ((args.ours, "sglang-dspark", "o-"), (args.peer, "SGLang 0.5.17 DSPARK", "s--")):
            x, y = speedups(path, setting)
            ax.plot(x, y, style, label=label)
        for c, target in TARGETS.get(setting, {}).items():
            ax.plot([c], [target], "k^", label="target" if c == 1 else None)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 8, 32, 64], ["1", "8", "32", "64"])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("concurrency")
    axes[0].set_ylabel("output tok/s vs no speculation")
    axes[0].legend(fontsize=8)
    fig.suptitle("Qwen3-8B shape, dummy weights, simulated acceptance, H200 (512 in / 512 out, greedy)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

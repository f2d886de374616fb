"""Calibration of the DSpark confidence head: predicted vs measured acceptance per draft position.

    python benchmark/analysis/calibration.py reference [--prompts 24] [--max-new-tokens 192]
        [--temperature 1.0] [--gamma 7] [--out-dir benchmark/results/calibration-tiny]
    python benchmark/analysis/calibration.py records RECORDS.jsonl [--out-dir DIR]

``reference`` runs the tiny pair (tests/fixtures/tiny-qwen3 + tiny-qwen3-dspark) in the reference loop on
CPU and logs one step record per verify step; ``records`` reads such records from a file (e.g. logged by
the server). Both write ``records.jsonl`` (reference only), ``calibration.json`` and, when matplotlib is
installed, ``reliability.png`` into ``--out-dir``.

Record formats (JSON lines; the two kinds may not be mixed in one file):

* step: ``{"confidence": [c_1..c_gamma], "accepted": a, "verified": L}`` -- ``c_k = sigmoid(logit_k / T_k)``
  the head's conditional confidences (or ``"confidence_logits"`` instead, sigmoid applied here), ``a`` the
  number of drafts accepted, ``L`` the number verified (optional, default gamma). From these two views:
  *conditional* (what the head predicts, spec A.8): position ``k`` counts in the steps that reached it
  (``k <= min(a + 1, L)``), predicted ``c_k``, label ``k <= a``; *survival* (what the scheduler uses):
  every verified position ``k <= L``, predicted ``prod_{j<=k} c_j``, label ``k <= a``.
* position: ``{"position": k, "predicted": p, "accepted": true}`` -- taken as given (view "records").

Per position and pooled: count, mean predicted, measured rate, ECE (equal-width bins, weighted mean
``|predicted - measured|``), Brier score, AUC, and the bins themselves; for step records also the mean
committed tokens per step predicted by the survivals (``1 + sum_k s_k`` over verified positions) vs measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
HUMANEVAL_PROMPTS = REPO / "benchmark" / "tiny" / "humaneval_code.jsonl"
HELDOUT_PROMPTS = REPO / "tests" / "fixtures" / "tiny-qwen3" / "heldout_prompts.jsonl"
sys.path.insert(0, str(REPO))  # sglang_dspark of this checkout, also when the package is not installed

logger = logging.getLogger("sglang_dspark")


# ---- records -> (position, predicted, accepted) ------------------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def step_views(steps: list[dict[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Step records -> {"conditional": (position, predicted, accepted), "survival": (...)}, 1-D arrays."""
    views: dict[str, list[tuple[int, float, bool]]] = {"conditional": [], "survival": []}
    for i, step in enumerate(steps):
        if "confidence" in step:
            conf = np.asarray(step["confidence"], dtype=np.float64)
        elif "confidence_logits" in step:
            conf = _sigmoid(np.asarray(step["confidence_logits"], dtype=np.float64))
        else:
            raise ValueError(f"step record {i}: needs 'confidence' or 'confidence_logits', found keys {sorted(step)}")
        gamma, accepted = conf.shape[0], int(step["accepted"])
        verified = int(step.get("verified", gamma))
        if not 0 <= accepted <= verified <= gamma:
            raise ValueError(
                f"step record {i}: need 0 <= accepted <= verified <= gamma={gamma}, got {accepted}, {verified}"
            )
        survival = np.cumprod(conf)
        for k in range(1, verified + 1):
            views["survival"].append((k, float(survival[k - 1]), k <= accepted))
            if k <= accepted + 1:
                views["conditional"].append((k, float(conf[k - 1]), k <= accepted))
    return {name: _columns(rows) for name, rows in views.items()}


def _columns(rows: list[tuple[int, float, bool]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, bool)
    pos, pred, acc = zip(*rows)
    return np.asarray(pos, np.int64), np.asarray(pred, np.float64), np.asarray(acc, bool)


# ---- metrics -------------------------------------------------------------------------------------------


def auc(predicted: np.ndarray, accepted: np.ndarray) -> float | None:
    """Probability that an accepted draft scores above a rejected one (ties count half); None without both."""
    n_pos, n_neg = int(accepted.sum()), int((~accepted).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(predicted, return_inverse=True, return_counts=True)
    first_rank = np.concatenate([[0], np.cumsum(counts)[:-1]]) + 1
    ranks = (first_rank + (counts - 1) / 2.0)[inverse]  # average rank of each tie group
    return float((ranks[accepted].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def reliability(predicted: np.ndarray, accepted: np.ndarray, num_bins: int) -> dict[str, Any]:
    """Bins over [0, 1] (equal width): counts, mean predicted, measured rate; ECE, Brier, AUC."""
    n = int(predicted.size)
    out: dict[str, Any] = {"count": n}
    if n == 0:
        return out
    index = np.minimum((predicted * num_bins).astype(np.int64), num_bins - 1)
    bins, ece = [], 0.0
    for b in range(num_bins):
        mask = index == b
        count = int(mask.sum())
        if count == 0:
            continue
        mean_pred, rate = float(predicted[mask].mean()), float(accepted[mask].mean())
        ece += count / n * abs(mean_pred - rate)
        bins.append({"lo": b / num_bins, "hi": (b + 1) / num_bins, "count": count,
                     "mean_predicted": mean_pred, "accept_rate": rate})
    out.update(
        mean_predicted=float(predicted.mean()),
        accept_rate=float(accepted.mean()),
        ece=ece,
        brier=float(np.mean((predicted - accepted) ** 2)),
        auc=auc(predicted, accepted),
        bins=bins,
    )
    return out


def calibration_report(
    views: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], num_bins: int
) -> dict[str, Any]:
    """Per view: pooled metrics and metrics per position."""
    report = {}
    for name, (pos, pred, acc) in views.items():
        positions = sorted(set(pos.tolist()))
        report[name] = {
            "pooled": reliability(pred, acc, num_bins),
            "per_position": {str(k): reliability(pred[pos == k], acc[pos == k], num_bins) for k in positions},
        }
    return report


def committed_summary(steps: list[dict[str, Any]]) -> dict[str, float]:
    """Mean committed tokens per step (1 + accepted) measured vs predicted by the survivals."""
    predicted, measured = [], []
    for step in steps:
        conf = (np.asarray(step["confidence"], np.float64) if "confidence" in step
                else _sigmoid(np.asarray(step["confidence_logits"], np.float64)))
        verified = int(step.get("verified", conf.shape[0]))
        predicted.append(1.0 + float(np.cumprod(conf)[:verified].sum()))
        measured.append(1.0 + int(step["accepted"]))
    return {"steps": len(steps), "predicted_mean_committed": float(np.mean(predicted)),
            "measured_mean_committed": float(np.mean(measured))}


# ---- plot ----------------------------------------------------------------------------------------------


PLOT_MIN_BIN_COUNT = 10  # bins with fewer samples are in the JSON but not drawn (their rate is noise)


def plot(report: dict[str, Any], path: Path, title: str) -> bool:
    """Reliability diagram per view (one line per position, pooled in black); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: %s not written (pip install matplotlib)", path)
        return False
    views = list(report)
    fig, axes = plt.subplots(1, len(views), figsize=(5.2 * len(views), 5), squeeze=False)
    for ax, name in zip(axes[0], views):
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect")
        per_position = report[name]["per_position"]
        cmap = plt.get_cmap("viridis", max(len(per_position), 1))
        for i, (k, stats) in enumerate(per_position.items()):
            bins = [b for b in stats.get("bins", []) if b["count"] >= PLOT_MIN_BIN_COUNT]
            if not bins:
                continue
            xs, ys = [b["mean_predicted"] for b in bins], [b["accept_rate"] for b in bins]
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1, color=cmap(i),
                    label=f"k={k} ECE {100 * stats['ece']:.1f}% (n={stats['count']})")
        pooled = report[name]["pooled"]
        bins = [b for b in pooled.get("bins", []) if b["count"] >= PLOT_MIN_BIN_COUNT]
        if bins:
            ax.plot([b["mean_predicted"] for b in bins], [b["accept_rate"] for b in bins],
                    color="black", linewidth=2, label=f"pooled ECE {100 * pooled['ece']:.1f}%")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted", ylabel="measured",
               title=f"{name}: " + ("P(accept k | 1..k-1 accepted)" if name == "conditional"
                                    else "P(1..k all accepted)" if name == "survival" else "as recorded"))
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{title} (bins with < {PLOT_MIN_BIN_COUNT} samples not drawn)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- the reference run ---------------------------------------------------------------------------------


def _prompts(prompt_set: str, n: int) -> list[str]:
    path = HUMANEVAL_PROMPTS if prompt_set == "humaneval" else HELDOUT_PROMPTS
    with open(path) as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    return texts[:n]


def collect_reference(
    num_prompts: int, max_new_tokens: int, temperature: float, gamma: int | None, seed: int, prompt_set: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Step records of the tiny pair in the reference loop (CPU, fp32), one prompt at a time."""
    import torch

    from sglang_dspark.demo import load_tiny_pair
    from sglang_dspark.reference.decode import speculative_generate
    from sglang_dspark.reference.sampling import SamplingParams

    torch.set_num_threads(1)
    pair = load_tiny_pair()
    generator = torch.Generator().manual_seed(seed)
    steps: list[dict[str, Any]] = []
    tokens = 0
    start = time.perf_counter()
    for text in _prompts(prompt_set, num_prompts):
        result = speculative_generate(
            pair.target, pair.drafter, pair.tokenizer(text)["input_ids"], max_new_tokens, gamma,
            SamplingParams(temperature=temperature), generator, pair.tokenizer.eos_token_id,
        )
        tokens += len(result.tokens)
        for logits, committed in zip(result.confidence_logits, result.committed_per_step, strict=True):
            steps.append({"confidence_logits": [round(float(x), 6) for x in logits], "accepted": committed - 1})
    meta = {
        "source": "reference loop, tiny-qwen3 + tiny-qwen3-dspark, CPU fp32",
        "prompt_set": prompt_set, "prompts": num_prompts, "max_new_tokens": max_new_tokens,
        "temperature": temperature, "gamma": gamma or pair.drafter.config.block_size, "seed": seed,
        "generated_tokens": tokens, "seconds": round(time.perf_counter() - start, 1),
    }
    return steps, meta


# ---- CLI -----------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SystemExit(f"error: {path}:{n}: not valid JSON ({exc})") from None
    return rows


def analyse(rows: list[dict[str, Any]], num_bins: int) -> dict[str, Any]:
    """Report for step records or position records (see the module docstring)."""
    if all("position" in r for r in rows):
        pos, pred, acc = _columns([(int(r["position"]), float(r["predicted"]), bool(r["accepted"])) for r in rows])
        return calibration_report({"records": (pos, pred, acc)}, num_bins)
    if any("position" in r for r in rows):
        raise ValueError("records mix position records and step records")
    report = calibration_report(step_views(rows), num_bins)
    report["committed"] = committed_summary(rows)
    return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for name, view in report.items():
        if name == "committed":
            lines.append(f"mean committed tokens/step: predicted {view['predicted_mean_committed']:.3f}, "
                         f"measured {view['measured_mean_committed']:.3f} ({view['steps']} steps)")
            continue
        lines.append(f"{name}: {'pos':>5} {'n':>6} {'pred':>6} {'meas':>6} {'ECE%':>6} {'Brier':>6} {'AUC':>6}")
        for k, s in [*view["per_position"].items(), ("all", view["pooled"])]:
            if s["count"] == 0:
                continue
            auc_text = "-" if s["auc"] is None else f"{s['auc']:.3f}"
            lines.append(f"{'':>{len(name) + 1}} {k:>5} {s['count']:>6d} {s['mean_predicted']:>6.3f} "
                         f"{s['accept_rate']:>6.3f} {100 * s['ece']:>6.2f} {s['brier']:>6.3f} {auc_text:>6}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("reference", help="run the tiny pair on CPU and analyse its confidence head")
    ref.add_argument("--prompts", type=int, default=24)
    ref.add_argument("--prompt-set", choices=("humaneval", "heldout"), default="humaneval")
    ref.add_argument("--max-new-tokens", type=int, default=192)
    ref.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; the head is trained for 1.0")
    ref.add_argument("--gamma", type=int, default=None)
    ref.add_argument("--seed", type=int, default=0)
    rec = sub.add_parser("records", help="analyse a JSON-lines file of step or position records")
    rec.add_argument("path", type=Path)
    for p in (ref, rec):
        p.add_argument("--bins", type=int, default=10)
        p.add_argument("--out-dir", type=Path, default=REPO / "benchmark" / "results" / "calibration")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.command == "reference":
        rows, meta = collect_reference(args.prompts, args.max_new_tokens, args.temperature, args.gamma, args.seed,
                                       args.prompt_set)
        with open(args.out_dir / "records.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    else:
        rows, meta = _read_jsonl(args.path), {"source": str(args.path)}
    meta.update(command="python benchmark/analysis/calibration.py " + " ".join(sys.argv[1:] if argv is None else argv),
                date=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), bins=args.bins)
    try:
        report = analyse(rows, args.bins)
    except (ValueError, KeyError, TypeError) as exc:
        parser.exit(1, f"error: {meta['source']}: bad record ({exc!r})\n")
    (args.out_dir / "calibration.json").write_text(json.dumps({"meta": meta, **report}, indent=1) + "\n")
    title = ", ".join(f"{k} {v}" for k, v in meta.items() if k in ("source", "temperature", "prompts", "gamma"))
    wrote_png = plot({k: v for k, v in report.items() if k != "committed"}, args.out_dir / "reliability.png", title)
    print("\n".join(summary_lines(report)))
    written = [args.out_dir / "calibration.json"] + ([args.out_dir / "reliability.png"] if wrote_png else [])
    print("wrote " + " and ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where two greedy runs of the same target disagree, how close was the target's own choice?

    python benchmark/analysis/divergence_margins.py RESULTS_JSON [--pairs a:b ...] [--out OUT_JSON]

For each prompt whose two greedy outputs differ, the first divergence position p is re-scored by the
Hugging Face target in float32 on CPU (prompt + the common prefix): the report gives the fp32 logit gap
between the two tokens chosen there and the gap between the fp32 top-1 and top-2 logits. Gaps far below
the bfloat16 resolution of logits of that size (2**-7 relative, ~0.06 at |logit| 8) mean both kernels
faced a near-tie, which bf16 rounding decides either way; a large gap at a divergence would be a bug.
Reads the ``issue4-1-tiny.json`` written by ``tests/gpu/issue4.py`` (outputs of every server run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "gpu"))


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--pairs", nargs="+", default=["baseline.greedy_c1:dspark.greedy_c1"],
                        help="run pairs SERVER.RUN:SERVER.RUN inside results")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from issue4 import TINY_TARGET, tiny_prompts
    from transformers import Qwen3ForCausalLM

    torch.set_num_threads(1)
    results = json.loads(args.results.read_text())["results"]
    prompts, _ = tiny_prompts()
    model = Qwen3ForCausalLM.from_pretrained(TINY_TARGET, dtype=torch.float32).eval()
    report = {"results": str(args.results), "target": str(TINY_TARGET.relative_to(REPO)), "pairs": {}}
    for pair in args.pairs:
        (sa, ra), (sb, rb) = (side.split(".") for side in pair.split(":"))
        outs_a = [r["output_ids"] for r in results[sa][ra]]
        outs_b = [r["output_ids"] for r in results[sb][rb]]
        rows = []
        for i, (a, b) in enumerate(zip(outs_a, outs_b)):
            p = first_divergence(a, b)
            if p is None:
                continue
            ids = torch.tensor([prompts[i] + a[:p]])
            with torch.no_grad():
                logits = model(ids).logits[0, -1].float()
            top2 = torch.topk(logits, 2).values
            rows.append({
                "prompt": i, "position": p, "token_a": a[p], "token_b": b[p],
                "fp32_gap_a_minus_b": round(float(logits[a[p]] - logits[b[p]]), 5),
                "fp32_top1_minus_top2": round(float(top2[0] - top2[1]), 5),
                "fp32_top1_logit": round(float(top2[0]), 3),
                "fp32_argmax_is": "a" if int(logits.argmax()) == a[p] else "b" if int(logits.argmax()) == b[p] else "other",
            })
        gaps = [abs(r["fp32_gap_a_minus_b"]) for r in rows]
        report["pairs"][pair] = {"diverging_prompts": len(rows), "of": len(outs_a),
                                 "max_abs_gap": max(gaps) if gaps else None, "rows": rows}
        print(f"{pair}: {len(rows)}/{len(outs_a)} prompts diverge; max |fp32 logit gap| at the divergence "
              f"{max(gaps) if gaps else None}")
        for r in rows:
            print("   ", r)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

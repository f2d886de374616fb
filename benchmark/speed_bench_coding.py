"""The coding prompts of SPEED-Bench as one JSONL file for ``python -m sglang.bench_serving``.

    python benchmark/speed_bench_coding.py DIR [--out speed_bench_coding.jsonl]

DIR is where NeMo-Skills' SPEED-Bench ``prepare.py`` wrote its JSONL files (the model card's recipe).
SGLang 0.5.15's ``--dataset-name speed-bench`` reads rows with ``turns`` (first turn = prompt) but its
``--speed-bench-category`` only knows the throughput split's categories (low_entropy, mixed,
high_entropy); the card benchmarks the ``coding`` category, so this keeps every row of any JSONL under
DIR whose ``category`` is ``coding`` (first occurrence of each prompt) and prints how many it wrote, the
``--num-prompts`` for "all coding prompts".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def coding_rows(root: Path) -> list[dict]:
    rows, seen = [], set()
    for path in sorted(root.rglob("*.jsonl")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{path}:{number}: not JSON ({exc.msg})") from None
            turns = row.get("turns") if isinstance(row, dict) else None
            if row.get("category") == "coding" and turns and turns[0] not in seen:
                seen.add(turns[0])
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="directory holding SPEED-Bench's prepared JSONL files")
    parser.add_argument("--out", type=Path, default=Path("speed_bench_coding.jsonl"))
    args = parser.parse_args(argv)
    rows = coding_rows(args.dir)
    if not rows:
        print(f"{args.dir}: no JSONL row with category 'coding' and a non-empty 'turns' list", file=sys.stderr)
        return 1
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} coding prompts to {args.out} (use --num-prompts {len(rows)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

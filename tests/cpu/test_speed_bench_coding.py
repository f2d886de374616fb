"""benchmark/speed_bench_coding.py: the coding rows of SPEED-Bench's JSONL files, deduplicated."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmark" / "speed_bench_coding.py"
spec = importlib.util.spec_from_file_location("speed_bench_coding", SCRIPT)
speed_bench_coding = importlib.util.module_from_spec(spec)
spec.loader.exec_module(speed_bench_coding)


def test_keeps_coding_rows_once(tmp_path, capsys):
    (tmp_path / "qualitative").mkdir()
    rows = [{"category": "coding", "turns": ["write fib"]}, {"category": "math", "turns": ["2+2"]},
            {"category": "coding", "turns": []}, {"category": "coding", "turns": ["write fib"]},
            {"category": "coding", "turns": ["sort a list", "now reverse it"]}]
    (tmp_path / "qualitative" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    out = tmp_path / "coding.jsonl"
    assert speed_bench_coding.main([str(tmp_path), "--out", str(out)]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["turns"][0] for r in got] == ["write fib", "sort a list"]
    assert "--num-prompts 2" in capsys.readouterr().out


def test_no_coding_rows_is_an_error(tmp_path, capsys):
    (tmp_path / "b.jsonl").write_text(json.dumps({"category": "math", "turns": ["x"]}) + "\n")
    assert speed_bench_coding.main([str(tmp_path), "--out", str(tmp_path / "o.jsonl")]) == 1
    assert "no JSONL row with category 'coding'" in capsys.readouterr().err

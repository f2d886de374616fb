"""``python -m sglang_dspark.inspect`` (header-only checkpoint description) and ``python -m sglang_dspark.demo``
(the reference loop on the tiny trained pair)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sglang_dspark.checkpoint as checkpoint
from sglang_dspark import demo, inspect
from sglang_dspark.checkpoint import random_draft_weights, save_draft
from sglang_dspark.config import DSparkConfig
from sglang_dspark.reference.decode import speculative_generate, target_generate
from sglang_dspark.reference.sampling import SamplingParams

REPO = Path(__file__).resolve().parents[2]
TARGET_DIR = REPO / "tests" / "fixtures" / "tiny-qwen3"
DRAFT_DIR = REPO / "tests" / "fixtures" / "tiny-qwen3-dspark"
needs_fixtures = pytest.mark.skipif(
    not (TARGET_DIR.is_dir() and DRAFT_DIR.is_dir()),
    reason="tiny pair fixtures not present (see benchmark/tiny/README.md)",
)

# The target the tiny config below fits: 6 layers, 4 kv heads of 16 -> 6 * 2 * 4 * 16 * 2 = 1536 bytes/token.
TARGET = {"model_type": "qwen3", "hidden_size": 32, "vocab_size": 64, "num_hidden_layers": 6,
          "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 16}
TARGET_KV_BYTES = 1536


def tiny_config(**changes) -> DSparkConfig:
    """d=32, 3 draft layers, 4 heads / 2 kv heads of 8 (kv 3*2*2*8*2 = 192 B/token), V=64, S=2, r=8."""
    config = DSparkConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=64, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=256, block_size=5, mask_token_id=61, target_layer_ids=(1, 4),
        num_target_layers=6, markov_rank=8, markov_head_type="vanilla",
        enable_confidence_head=True, confidence_head_with_markov=True,
    )
    return config.replace(**changes)


def write_draft(path: Path, fmt: str, config: DSparkConfig, tables: bool) -> dict[str, torch.Tensor]:
    weights = random_draft_weights(config, dtype=torch.bfloat16)
    embed = lm_head = None
    if tables:
        gen = torch.Generator().manual_seed(3)
        embed, lm_head = (torch.randn(config.vocab_size, config.hidden_size, generator=gen).bfloat16() for _ in "ab")
    save_draft(path, config, weights, fmt, embed_tokens=embed, lm_head=lm_head)
    return weights


def write_target(path: Path, **changes) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**TARGET, **changes}))
    return path


def run_inspect(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = inspect.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def text_fields(text: str) -> dict[str, str]:
    """``  key   value`` lines of the text report -> {key: value}."""
    return dict(re.findall(r"^  (\S.*?\S)\s{2,}(.*)$", text, re.M))


# ---- inspect --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, tables, changes",
    [
        ("deepspec", False, {}),
        ("torchspec", True, {}),
        ("deepspec", True, dict(markov_head_type="gated", confidence_head_with_markov=False)),
        ("torchspec", False, dict(markov_rank=0, enable_confidence_head=False, confidence_head_with_markov=False,
                                  num_target_layers=None)),
    ],
)
def test_inspect_reports_a_random_draft(tmp_path, capsys, fmt, tables, changes):
    config = tiny_config(**changes)
    weights = write_draft(tmp_path / "draft", fmt, config, tables)
    target = write_target(tmp_path / "target")

    code, out, _ = run_inspect(capsys, str(tmp_path / "draft"), "--target", str(target), "--json")
    assert code == 0
    report = json.loads(out)
    expected_params = sum(t.numel() for t in weights.values())
    assert report["format"] == fmt
    assert (report["hidden_size"], report["num_attention_heads"], report["num_key_value_heads"],
            report["head_dim"], report["num_hidden_layers"], report["intermediate_size"],
            report["vocab_size"]) == (32, 4, 2, 8, 3, 48, 64)
    assert (report["fc_in_features"], report["fc_out_features"]) == (64, 32)
    assert report["block_size"] == 5 and report["target_layer_ids"] == [1, 4] and report["mask_token_id"] == 61
    assert report["num_target_layers"] == config.num_target_layers
    rank = config.markov_rank
    assert report["markov_head"] == {"type": config.markov_head_type if rank else None, "rank": rank}
    conf = report["confidence_head"]
    assert conf["enabled"] == config.enable_confidence_head
    assert conf["with_markov"] == (config.enable_confidence_head and config.confidence_head_with_markov and rank > 0)
    assert conf["in_features"] == ((32 + 8 if conf["with_markov"] else 32) if conf["enabled"] else None)
    assert report["drafter_parameters"] == expected_params
    assert report["target_table_copies"] == {"embed_tokens": tables, "lm_head": tables}
    assert report["target_table_copy_parameters"] == (2 * 64 * 32 if tables else 0)
    assert report["weight_dtype"] == "bfloat16"
    assert report["kv_bytes_per_token"] == 3 * 2 * 2 * 8 * 2 == config.kv_bytes_per_token
    assert report["target"]["kv_bytes_per_token"] == TARGET_KV_BYTES
    assert report["target"]["draft_kv_share"] == pytest.approx(192 / TARGET_KV_BYTES)

    code, out, _ = run_inspect(capsys, str(tmp_path / "draft"), "--target", str(target))
    assert code == 0
    fields = text_fields(out)
    assert fields["format"] == fmt
    assert fields["attention"] == "4 heads, 2 kv heads, head_dim 8"
    assert fields["fc"].startswith("64 -> 32")
    assert fields["gamma (block_size)"] == "5"
    assert fields["target_layer_ids"] == "[1, 4]"
    assert fields["mask token id"] == "61"
    assert fields["markov head"] == (f"{config.markov_head_type}, rank 8" if rank else "none (markov_rank 0)")
    if not conf["enabled"]:
        assert fields["confidence head"] == "none"
    else:
        assert fields["confidence head"].startswith("with Markov" if conf["with_markov"] else "without Markov")
    assert fields["drafter parameters"] == f"{expected_params:,}"
    assert fields["embed/lm_head copies"].startswith("embed_tokens, lm_head" if tables else "none")
    assert fields["weight dtype"] == "bfloat16"
    assert fields["draft KV bytes/token"] == "192"
    assert fields["target KV bytes/token"] == "1,536"
    assert fields["draft/target KV"].startswith("12.5%")


def test_inspect_reads_headers_only(tmp_path, capsys, monkeypatch):
    """The tensor data is never loaded: the loader's load_file is not called."""
    write_draft(tmp_path / "draft", "deepspec", tiny_config(), tables=False)

    def refuse(*args, **kwargs):
        raise AssertionError("inspect loaded tensor data")

    monkeypatch.setattr(checkpoint, "load_file", refuse)
    monkeypatch.setattr("safetensors.torch.load_file", refuse)
    code, out, _ = run_inspect(capsys, str(tmp_path / "draft"), "--json")
    assert code == 0 and json.loads(out)["target"] is None


def test_inspect_sharded_draft_equals_single_file(tmp_path, capsys):
    config = tiny_config()
    write_draft(tmp_path / "single", "deepspec", config, tables=True)
    tensors = load_file(str(tmp_path / "single" / "model.safetensors"))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(sharded / shard))
        weight_map.update({n: shard for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    reports = []
    for path in (tmp_path / "single", sharded):
        code, out, _ = run_inspect(capsys, str(path), "--json")
        assert code == 0
        reports.append(json.loads(out))
    for report in reports:
        del report["path"], report["weight_files"], report["weight_file_bytes"]
    assert reports[0] == reports[1]


def test_inspect_target_mismatch_exits_2_naming_file_and_key(tmp_path, capsys):
    write_draft(tmp_path / "draft", "deepspec", tiny_config(), tables=False)
    target = write_target(tmp_path / "target", hidden_size=48)
    code, out, err = run_inspect(capsys, str(tmp_path / "draft"), "--target", str(target))
    assert code == 2 and out == ""
    assert str(tmp_path / "draft" / "config.json") in err
    assert "key 'hidden_size': expected 48" in err and "found 32" in err and str(target) in err

    code, _, err = run_inspect(capsys, str(tmp_path / "draft"), "--target", str(tmp_path / "absent"))
    assert code == 2 and str(tmp_path / "absent" / "config.json") in err and "not found" in err


def test_inspect_malformed_draft_exits_1_naming_the_tensor(tmp_path, capsys):
    draft = tmp_path / "draft"
    write_draft(draft, "deepspec", tiny_config(), tables=False)
    tensors = load_file(str(draft / "model.safetensors"))
    tensors["fc.weight"] = tensors["fc.weight"][:, :40].contiguous()
    save_file(tensors, str(draft / "model.safetensors"))
    code, out, err = run_inspect(capsys, str(draft))
    assert code == 1 and out == ""
    assert "tensor 'fc.weight': expected shape [32, 64], found [32, 40]" in err
    assert str(draft / "model.safetensors") in err


@needs_fixtures
def test_inspect_committed_tiny_fixture():
    proc = subprocess.run(
        [sys.executable, "-m", "sglang_dspark.inspect", str(DRAFT_DIR), "--target", str(TARGET_DIR), "--json"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    tensors = load_file(str(DRAFT_DIR / "model.safetensors"))
    assert report["drafter_parameters"] == sum(t.numel() for t in tensors.values()) == 1_706_305
    assert report["target_table_copies"] == {"embed_tokens": False, "lm_head": False}
    assert report["format"] == "deepspec" and report["weight_dtype"] == "bfloat16"
    assert report["block_size"] == 7 and report["target_layer_ids"] == [0, 1, 2] and report["mask_token_id"] == 1
    assert report["markov_head"] == {"type": "vanilla", "rank": 64}
    assert report["confidence_head"] == {"enabled": True, "with_markov": True, "in_features": 320}
    assert report["kv_bytes_per_token"] == 2 * 2 * 1 * 128 * 2
    assert report["target"]["kv_bytes_per_token"] == 4 * 2 * 1 * 128 * 2
    assert report["target"]["draft_kv_share"] == 0.5


# ---- demo -----------------------------------------------------------------------------------------


def test_demo_names_missing_fixtures(tmp_path):
    with pytest.raises(demo.DemoSetupError, match=re.escape(str(tmp_path / "nope")) + ".*pip install -e"):
        demo.load_tiny_pair(tmp_path / "nope", tmp_path / "nope-dspark")


@needs_fixtures
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_progress_hook_counts_every_emitted_token(temperature):
    """The demo's progress bars are fed by ``on_tokens``; it must count each emitted token once and not
    change what is generated."""
    pair = demo.load_tiny_pair()
    prompt_ids = pair.tokenizer(demo.default_prompt())["input_ids"]
    sampling = SamplingParams(temperature=temperature)
    eos = pair.tokenizer.eos_token_id
    counts: list[int] = []
    hooked = speculative_generate(pair.target, pair.drafter, prompt_ids, 40, 7, sampling,
                                  torch.Generator().manual_seed(5), eos, on_tokens=counts.append)
    plain = speculative_generate(pair.target, pair.drafter, prompt_ids, 40, 7, sampling,
                                 torch.Generator().manual_seed(5), eos)
    assert hooked.tokens == plain.tokens and len(hooked.tokens) == 40
    assert sum(counts) == 40 and len(counts) == len(hooked.committed_per_step) + 1
    target_counts: list[int] = []
    tokens = target_generate(pair.target, prompt_ids, 12, sampling, torch.Generator().manual_seed(5), eos,
                             on_tokens=target_counts.append)
    assert target_counts == [1] * len(tokens)


@needs_fixtures
def test_demo_cli_on_the_tiny_pair():
    proc = subprocess.run(
        [sys.executable, "-m", "sglang_dspark.demo", "--max-new-tokens", "24"],
        capture_output=True, text=True, timeout=180, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "has_close_elements" in out  # the default prompt: first HumanEval code block
    assert "--- generated code (24 tokens) ---" in out
    steps = int(re.search(r"^verify steps: (\d+)$", out, re.M).group(1))
    positions = re.findall(r"^  position (\d): +[\d.]+% \((\d+)/(\d+)\)$", out, re.M)
    assert [int(p) for p, _, _ in positions] == list(range(1, 8))
    assert all(int(total) == steps for _, _, total in positions)
    accepted = [int(a) for _, a, _ in positions]
    assert accepted == sorted(accepted, reverse=True)  # position j accepted only if j-1 was
    mean = float(re.search(r"^mean acceptance length: ([\d.]+) tokens per verify step", out, re.M).group(1))
    assert mean == pytest.approx(1 + sum(accepted) / steps, abs=0.005)
    assert mean >= 2.0  # the trained pair accepts several tokens per step (README: 4.25 on HumanEval)
    assert re.search(r"^speculative: 24 tokens in [\d.]+ s = [\d.]+ tokens/s$", out, re.M)
    assert re.search(r"^target only: 24 tokens in [\d.]+ s = [\d.]+ tokens/s$", out, re.M)
    assert "speculative output equals the target's greedy output: yes" in out
    assert "DSpark" in proc.stderr  # the tqdm progress bar goes to stderr

"""``python -m sglang_dspark.convert``: layout conversion is exact and refuses what it cannot know."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, safe_open

from sglang_dspark.checkpoint import load_draft, random_draft_weights, save_draft
from sglang_dspark.config import DSparkConfig
from sglang_dspark.convert import main

from tiny_configs import tiny_config


def bf16_draft(path: Path, fmt: str, config: DSparkConfig, with_tables: bool = True) -> dict:
    weights = random_draft_weights(config, seed=11, dtype=torch.bfloat16)
    tables = {}
    if with_tables:
        gen = torch.Generator().manual_seed(12)
        tables = {name: torch.randn(64, 32, generator=gen).to(torch.bfloat16) for name in ("embed_tokens", "lm_head")}
    save_draft(path, config, weights, fmt, extra_config={"num_anchors": 512, "bos_token_id": 1, "eos_token_id": 2},
               **tables)
    return weights


def read_dir(path: Path) -> tuple[dict, dict]:
    return json.loads((path / "config.json").read_text()), load_file(str(path / "model.safetensors"))


def assert_identical_dirs(a: Path, b: Path) -> None:
    (config_a, tensors_a), (config_b, tensors_b) = read_dir(a), read_dir(b)
    assert config_a == config_b
    assert sorted(tensors_a) == sorted(tensors_b)
    for name in tensors_a:
        assert tensors_a[name].dtype == tensors_b[name].dtype
        assert torch.equal(tensors_a[name].view(torch.int16), tensors_b[name].view(torch.int16)), name


def test_round_trip_deepspec_torchspec_deepspec_is_exact(tmp_path):
    config = tiny_config()
    weights = bf16_draft(tmp_path / "ds", "deepspec", config)
    assert main([str(tmp_path / "ds"), str(tmp_path / "ts"), "--to", "torchspec"]) == 0
    assert main([str(tmp_path / "ts"), str(tmp_path / "ds2"), "--to", "deepspec"]) == 0
    assert_identical_dirs(tmp_path / "ds", tmp_path / "ds2")

    ts_config, ts_tensors = read_dir(tmp_path / "ts")
    assert ts_config["model_type"] == "dspark" and "num_target_layers" not in ts_config
    assert ts_config["num_anchors"] == 512 and ts_config["eos_token_id"] == 2
    assert torch.equal(ts_tensors["context_proj.weight"], weights["fc.weight"])
    assert torch.equal(ts_tensors["markov_w2.weight"], weights["markov_head.markov_w2.weight"])
    ds, ts = load_draft(tmp_path / "ds"), load_draft(tmp_path / "ts")
    assert ds.config == ts.config and (ds.format, ts.format) == ("deepspec", "torchspec")
    assert torch.equal(ds.lm_head, ts.lm_head) and torch.equal(ds.embed_tokens, ts.embed_tokens)
    with safe_open(str(tmp_path / "ts" / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_round_trip_torchspec_deepspec_torchspec_is_exact(tmp_path):
    bf16_draft(tmp_path / "ts", "torchspec", tiny_config(), with_tables=False)
    assert main([str(tmp_path / "ts"), str(tmp_path / "ds"), "--to", "deepspec"]) == 0
    assert main([str(tmp_path / "ds"), str(tmp_path / "ts2"), "--to", "torchspec"]) == 0
    assert_identical_dirs(tmp_path / "ts", tmp_path / "ts2")
    assert "lm_head.weight" not in read_dir(tmp_path / "ds")[1]


def test_deepspec_output_refused_without_target_layer_count(tmp_path, capsys):
    weights = bf16_draft(tmp_path / "ts", "torchspec", tiny_config(num_target_layers=None))
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "ts"), str(tmp_path / "out"), "--to", "deepspec"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'num_target_layers' (the target's layer count) is unknown" in err
    assert "--num-target-layers" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()

    assert main([str(tmp_path / "ts"), str(tmp_path / "out"), "--to", "deepspec", "--num-target-layers", "6"]) == 0
    out = load_draft(tmp_path / "out")
    assert out.format == "deepspec" and out.config.num_target_layers == 6
    assert all(torch.equal(out.weights[n], weights[n]) for n in weights)


def test_target_dir_supplies_and_checks_the_layer_count(tmp_path, capsys):
    bf16_draft(tmp_path / "ts", "torchspec", tiny_config(num_target_layers=None))
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"hidden_size": 32, "vocab_size": 64, "num_hidden_layers": 7}))
    assert main([str(tmp_path / "ts"), str(tmp_path / "a"), "--to", "deepspec", "--target", str(target)]) == 0
    assert json.loads((tmp_path / "a" / "config.json").read_text())["num_target_layers"] == 7

    with pytest.raises(SystemExit):
        main([str(tmp_path / "ts"), str(tmp_path / "b"), "--to", "deepspec", "--target", str(target),
              "--num-target-layers", "6"])
    assert "num_target_layers: the sources disagree: --num-target-layers says 6, --target says 7" in capsys.readouterr().err

    (target / "config.json").write_text(json.dumps({"hidden_size": 32, "vocab_size": 64, "num_hidden_layers": 4}))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "ts"), str(tmp_path / "c"), "--to", "deepspec", "--target", str(target)])
    err = capsys.readouterr().err
    assert "key 'target_layer_ids': expected ids in 0..2 for the target" in err and "found [4] in [1, 2, 4]" in err


def test_source_layer_count_conflicting_with_flag(tmp_path, capsys):
    bf16_draft(tmp_path / "ds", "deepspec", tiny_config())
    with pytest.raises(SystemExit):
        main([str(tmp_path / "ds"), str(tmp_path / "out"), "--to", "torchspec", "--num-target-layers", "8"])
    assert "the source config says 6, --num-target-layers says 8" in capsys.readouterr().err


def test_dtype_cast_and_existing_output(tmp_path, capsys):
    weights = bf16_draft(tmp_path / "ds", "deepspec", tiny_config())
    assert main([str(tmp_path / "ds"), str(tmp_path / "f32"), "--to", "deepspec", "--dtype", "float32"]) == 0
    config, tensors = read_dir(tmp_path / "f32")
    assert config["dtype"] == "float32"
    assert tensors["fc.weight"].dtype == torch.float32
    assert torch.equal(tensors["fc.weight"], weights["fc.weight"].float())
    with pytest.raises(SystemExit):
        main([str(tmp_path / "ds"), str(tmp_path / "f32"), "--to", "deepspec"])
    assert "expected an empty directory, found ['config.json', 'model.safetensors']" in capsys.readouterr().err
    assert main([str(tmp_path / "ds"), str(tmp_path / "f32"), "--to", "deepspec", "--overwrite"]) == 0
    assert_identical_dirs(tmp_path / "ds", tmp_path / "f32")


def test_gated_draft_cannot_become_torchspec(tmp_path, capsys):
    bf16_draft(tmp_path / "ds", "deepspec", tiny_config(markov_head_type="gated"))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "ds"), str(tmp_path / "out"), "--to", "torchspec"])
    assert "TorchSpec defines only 'vanilla' ('classical'), found 'gated'" in capsys.readouterr().err


def test_module_cli_help():
    result = subprocess.run([sys.executable, "-m", "sglang_dspark.convert", "--help"],
                            capture_output=True, text=True, check=True)
    assert "usage: python -m sglang_dspark.convert" in result.stdout
    for flag in ("--to {deepspec,torchspec}", "--num-target-layers", "--target", "--dtype", "--overwrite"):
        assert flag in result.stdout

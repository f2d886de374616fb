"""Config builders for the SGLang tests: a tiny Qwen3 target and DSpark drafts (config.json only); the GPU
worker-step checks run on CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

TARGET_LAYERS = 8
GPU_TESTS = Path(__file__).resolve().parents[2] / "gpu"


def run_worker_step_checks(name: str, tmp_path: Path, monkeypatch: Any) -> list[dict[str, Any]]:
    """``tests/gpu/unit.py``'s ``check_worker_step`` (``DSparkWorker._decode`` with SGLang's kernels and forwards
    replaced by torch stand-ins) on CPU -> its checks (``{"name", "ok", "detail"}`` each)."""
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.syspath_prepend(str(GPU_TESTS))
    for module in ("harness", "unit"):
        sys.modules.pop(module, None)  # harness reads OUT at import
    import unit
    from harness import Report

    report = Report(name)
    report.run("worker step", lambda: unit.check_worker_step(report))
    return report.data["checks"]


def target_config(**overrides: Any) -> dict[str, Any]:
    """A tiny Qwen3 target config.json (8 layers, hidden 64, vocab 1000)."""
    config = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": TARGET_LAYERS, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1000, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 4096, "torch_dtype": "bfloat16",
        "tie_word_embeddings": False, "hidden_act": "silu",
    }
    config.update(overrides)
    return config


def draft_config(fmt: str = "deepspec", **overrides: Any) -> dict[str, Any]:
    """A tiny DSpark draft config.json for ``target_config()`` in the DeepSpec or TorchSpec layout.
    An override with value None removes the key."""
    config = {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1000, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 4096, "hidden_act": "silu",
        "block_size": 7, "mask_token_id": 999, "target_layer_ids": [1, 3, 5], "markov_rank": 16,
        "markov_head_type": "vanilla", "enable_confidence_head": True, "confidence_head_with_markov": True,
        "architectures": ["Qwen3DSparkModel"],
    }
    if fmt == "deepspec":
        config.update(model_type="qwen3", num_target_layers=TARGET_LAYERS)
    else:
        config.update(model_type=fmt, target_num_hidden_layers=TARGET_LAYERS)
    config.update(overrides)
    return {k: v for k, v in config.items() if v is not None}


def write_model_dir(path: Path, config: dict[str, Any]) -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)

"""Describe a DSpark draft checkpoint without loading its tensors.

    python -m sglang_dspark.inspect DRAFT [--target TARGET] [--json]

Reads ``config.json`` through the loader (either layout) and only the safetensors headers (names,
shapes, dtypes: ``safe_open`` reads the header, never the tensor data), so an 8B draft is described in
well under a second and a few MB of memory. The tensor names and shapes are checked exactly as
``load_draft`` checks them (``checkpoint.normalize_weights`` run on ``meta`` tensors). With
``--target`` the draft is also validated against the target's config (exit status 2 on a mismatch)
and its context-KV cost is compared with the target's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from sglang_dspark.checkpoint import (
    CONFIG_FILE,
    DSparkCheckpointError,
    normalize_weights,
    read_draft_config,
    read_shards,
    read_target_config,
    target_config_value,
    validate_against_target,
)
from sglang_dspark.config import DSparkConfig

logger = logging.getLogger("sglang_dspark")

EXIT_DRAFT_ERROR = 1
EXIT_TARGET_MISMATCH = 2
KV_DTYPE_BYTES = 2  # bf16 K/V cache, as DSparkConfig.kv_bytes_per_token

# safetensors header dtype -> torch dtype
_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class TargetMismatchError(DSparkCheckpointError):
    """The draft is well-formed but does not fit the given target."""


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as its safetensors header describes it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path


def read_tensor_headers(draft_dir: str | os.PathLike) -> dict[str, TensorHeader]:
    """Checkpoint tensor name -> header entry, for every weight file of ``draft_dir``, with the file
    selection and consistency checks of ``checkpoint.read_shards``; no tensor data is read."""
    headers, _ = read_shards(draft_dir, _file_headers)
    return headers


def _file_headers(file: Path) -> dict[str, TensorHeader]:
    headers: dict[str, TensorHeader] = {}
    with safe_open(str(file), framework="pt") as handle:
        for name in handle.keys():
            entry = handle.get_slice(name)
            dtype_name = entry.get_dtype()
            if dtype_name not in _SAFETENSORS_DTYPES:
                raise DSparkCheckpointError(
                    f"{file}: tensor {name!r}: expected a dtype in {sorted(_SAFETENSORS_DTYPES)}, "
                    f"found {dtype_name!r}"
                )
            headers[name] = TensorHeader(tuple(entry.get_shape()), _SAFETENSORS_DTYPES[dtype_name], file)
    return headers


def target_kv_bytes_per_token(target_config: dict[str, Any], target_path: str | os.PathLike) -> int:
    """Target K/V bytes per token in bf16: layers x 2 (K, V) x kv_heads x head_dim x 2 bytes.

    ``num_key_value_heads`` defaults to ``num_attention_heads`` and ``head_dim`` to
    hidden_size / num_attention_heads when the target config omits them (HF Qwen3 defaults).
    """
    text = target_config.get("text_config") if isinstance(target_config.get("text_config"), dict) else {}

    def present(key: str) -> bool:
        return target_config.get(key) is not None or text.get(key) is not None

    layers = target_config_value(target_config, "num_hidden_layers", target_path)
    heads = target_config_value(target_config, "num_attention_heads", target_path)
    kv_heads = target_config_value(target_config, "num_key_value_heads", target_path) if present(
        "num_key_value_heads") else heads
    if present("head_dim"):
        head_dim = target_config_value(target_config, "head_dim", target_path)
    else:
        head_dim = target_config_value(target_config, "hidden_size", target_path) // heads
    return layers * 2 * kv_heads * head_dim * KV_DTYPE_BYTES


def inspect_draft(
    draft_dir: str | os.PathLike, target: str | os.PathLike | None = None
) -> dict[str, Any]:
    """The report of ``python -m sglang_dspark.inspect`` as a JSON-ready dict.

    Raises ``DSparkCheckpointError`` for a malformed draft and its subclass ``TargetMismatchError``
    when ``target`` (a directory or config.json) cannot be read or the draft does not fit it
    (``validate_against_target``).
    """
    root = Path(draft_dir)
    config_path = root if root.is_file() else root / CONFIG_FILE
    root = config_path.parent
    config, fmt = read_draft_config(config_path)
    headers = read_tensor_headers(root)
    meta = {name: torch.empty(h.shape, dtype=h.dtype, device="meta") for name, h in headers.items()}
    weights = normalize_weights(meta, config, fmt, root, {name: h.file for name, h in headers.items()})

    drafter_params = sum(t.numel() for t in weights.drafter.values())
    copies = {"embed_tokens": weights.embed_tokens, "lm_head": weights.lm_head}
    dtypes = sorted({_dtype_name(t.dtype) for t in weights.drafter.values()})
    fc_out, fc_in = weights.drafter["fc.weight"].shape
    files = sorted({h.file for h in headers.values()})
    report: dict[str, Any] = {
        "path": str(root),
        "format": fmt,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "num_hidden_layers": config.num_hidden_layers,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "fc_in_features": int(fc_in),
        "fc_out_features": int(fc_out),
        "block_size": config.block_size,
        "target_layer_ids": list(config.target_layer_ids),
        "num_target_layers": config.num_target_layers,
        "mask_token_id": config.mask_token_id,
        "markov_head": _markov_report(config),
        "confidence_head": _confidence_report(config),
        "drafter_parameters": int(drafter_params),
        "target_table_copies": {name: t is not None for name, t in copies.items()},
        "target_table_copy_parameters": int(sum(t.numel() for t in copies.values() if t is not None)),
        "weight_dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "weight_files": [f.name for f in files],
        "weight_file_bytes": sum(f.stat().st_size for f in files),
        "kv_bytes_per_token": config.kv_bytes_per_token,
        "target": None,
    }
    if target is not None:
        target_path = Path(target) if Path(target).is_file() else Path(target) / CONFIG_FILE
        try:
            target_config = read_target_config(target_path)
            validate_against_target(config, target_config, config_path, target_path)
            target_kv = target_kv_bytes_per_token(target_config, target_path)
            target_layers = target_config_value(target_config, "num_hidden_layers", target_path)
        except DSparkCheckpointError as exc:
            raise TargetMismatchError(str(exc)) from exc
        report["target"] = {
            "path": str(target_path.parent),
            "num_hidden_layers": target_layers,
            "kv_bytes_per_token": target_kv,
            "draft_kv_share": config.kv_bytes_per_token / target_kv,
        }
    logger.debug("inspected %s: %d tensors in %d file(s)", root, len(headers), len(files))
    return report


def format_report(report: dict[str, Any]) -> str:
    """The human-readable form of ``inspect_draft``'s report."""
    markov, conf, target = report["markov_head"], report["confidence_head"], report["target"]
    copies = [name for name, present in report["target_table_copies"].items() if present]
    dtype = report["weight_dtype"]
    rows = [
        ("format", report["format"]),
        ("hidden size", report["hidden_size"]),
        ("attention", f"{report['num_attention_heads']} heads, {report['num_key_value_heads']} kv heads, "
                      f"head_dim {report['head_dim']}"),
        ("draft layers", report["num_hidden_layers"]),
        ("intermediate size", report["intermediate_size"]),
        ("vocab size", report["vocab_size"]),
        ("fc", f"{report['fc_in_features']} -> {report['fc_out_features']} "
               f"({len(report['target_layer_ids'])} captured layers x {report['hidden_size']})"),
        ("gamma (block_size)", report["block_size"]),
        ("target_layer_ids", report["target_layer_ids"]),
        ("num_target_layers", report["num_target_layers"] if report["num_target_layers"] is not None
         else "not stated"),
        ("mask token id", report["mask_token_id"]),
        ("markov head", f"{markov['type']}, rank {markov['rank']}" if markov["type"] else "none (markov_rank 0)"),
        ("confidence head", (("with" if conf["with_markov"] else "without")
                             + f" Markov features (in {conf['in_features']})") if conf["enabled"] else "none"),
        ("drafter parameters", f"{report['drafter_parameters']:,}"),
        ("embed/lm_head copies", (", ".join(copies) + f" ({report['target_table_copy_parameters']:,} "
                                  "parameters, kept aside)") if copies else "none (uses the target's)"),
        ("weight dtype", dtype if isinstance(dtype, str) else "mixed: " + ", ".join(dtype)),
        ("weight files", f"{', '.join(report['weight_files'])} ({report['weight_file_bytes']:,} bytes)"),
        ("draft KV bytes/token", f"{report['kv_bytes_per_token']:,}"),
    ]
    if target is not None:
        rows += [
            ("target", f"{target['path']} ({target['num_hidden_layers']} layers), fits"),
            ("target KV bytes/token", f"{target['kv_bytes_per_token']:,}"),
            ("draft/target KV", f"{100 * target['draft_kv_share']:.1f}% of the target's per token"),
        ]
    width = max(len(key) for key, _ in rows)
    return "\n".join([f"DSpark draft {report['path']}"] + [f"  {k:<{width}}  {v}" for k, v in rows])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sglang_dspark.inspect",
        description=(
            "Describe a Qwen3 DSpark draft checkpoint (DeepSpec or TorchSpec layout): shapes, gamma, "
            "captured target layers, Markov and confidence heads, parameter count, dtype and draft KV "
            "cost per token. Only config.json and the safetensors headers are read, never the tensor data."
        ),
        epilog=(
            "Exit status: 0 ok, 1 malformed draft, 2 draft does not fit --target. Example: python -m "
            "sglang_dspark.inspect dspark_qwen3_8b_block7 --target Qwen3-8B"
        ),
    )
    parser.add_argument("draft", help="The draft checkpoint directory (config.json + *.safetensors).")
    parser.add_argument(
        "--target", default=None,
        help="The target model directory (or its config.json). Validates the draft against it and "
        "compares the draft's KV bytes per token with the target's.",
    )
    parser.add_argument("--json", action="store_true", help="Print the report as JSON instead of text.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = inspect_draft(args.draft, args.target)
    except TargetMismatchError as exc:
        parser.exit(EXIT_TARGET_MISMATCH, f"error: {exc}\n")
    except DSparkCheckpointError as exc:
        parser.exit(EXIT_DRAFT_ERROR, f"error: {exc}\n")
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _markov_report(config: DSparkConfig) -> dict[str, Any]:
    return {"type": config.markov_head_type if config.markov_rank > 0 else None, "rank": config.markov_rank}


def _confidence_report(config: DSparkConfig) -> dict[str, Any]:
    return {
        "enabled": config.enable_confidence_head,
        "with_markov": config.enable_confidence_head and config.confidence_in_features > config.hidden_size,
        "in_features": config.confidence_in_features if config.enable_confidence_head else None,
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


if __name__ == "__main__":
    sys.exit(main())

"""Convert a DSpark draft between the DeepSpec and TorchSpec layouts.

    python -m sglang_dspark.convert SRC DST --to deepspec|torchspec [--num-target-layers N | --target DIR]

SRC may be in either layout (sharded or not); DST gets ``config.json`` + ``model.safetensors``.
Tensors are copied bit-exactly unless ``--dtype`` is given; ``embed_tokens`` / ``lm_head`` copies
are kept when SRC has them. Config keys the loader does not interpret (bos/eos ids, num_anchors,
...) are carried over.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from sglang_dspark.checkpoint import (
    FORMATS,
    DSparkCheckpointError,
    load_draft,
    passthrough_config,
    read_draft_config,
    read_target_config,
    save_draft,
    target_config_value,
)

logger = logging.getLogger("sglang_dspark")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sglang_dspark.convert",
        description=(
            "Convert a Qwen3 DSpark draft checkpoint between the DeepSpec layout (DeepSeek's "
            "dspark_qwen3_*_block7: model_type qwen3, num_target_layers, canonical tensor names) and "
            "the TorchSpec layout (model_type dspark, context_proj/context_norm/final_norm, bare "
            "markov_w1/markov_w2). The source layout is detected from its config.json."
        ),
        epilog=(
            "The DeepSpec layout records the target's layer count (num_target_layers); when the "
            "source does not carry it (TorchSpec exports usually do not), give --num-target-layers "
            "or --target. Example: python -m sglang_dspark.convert Qwen3-8B-DSpark out/ --to "
            "deepspec --target Qwen3-8B"
        ),
    )
    parser.add_argument("src", help="source draft directory (config.json + *.safetensors)")
    parser.add_argument("dst", help="output directory (created; must not hold other weight files)")
    parser.add_argument("--to", required=True, choices=FORMATS, help="output layout")
    parser.add_argument(
        "--num-target-layers", type=int, default=None,
        help="number of decoder layers of the target model (needed for --to deepspec when unknown)",
    )
    parser.add_argument(
        "--target", default=None,
        help="target model directory or config.json: validates the draft against it and supplies "
        "num_target_layers",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating tensors")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace config.json / model.safetensors already in DST"
    )
    return parser


def convert(
    src: str,
    dst: str,
    to: str,
    num_target_layers: int | None = None,
    target: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> None:
    """Load ``src`` in either layout and write it to ``dst`` in layout ``to``."""
    source_config, _ = read_draft_config(src)
    known = {"the source config": source_config.num_target_layers, "--num-target-layers": num_target_layers}
    if target is not None:
        known["--target"] = target_config_value(read_target_config(target), "num_hidden_layers", target)
    stated = {where: n for where, n in known.items() if n is not None}
    if len(set(stated.values())) > 1:
        raise DSparkCheckpointError(
            f"{src}: num_target_layers: the sources disagree: "
            + ", ".join(f"{where} says {n}" for where, n in stated.items())
        )
    if to == "deepspec" and not stated:
        raise DSparkCheckpointError(
            f"{dst}: cannot write the DeepSpec layout: key 'num_target_layers' (the target's layer count) "
            f"is unknown: {src} does not state it; give --num-target-layers or --target"
        )
    ckpt = load_draft(src, target_config=target, dtype=dtype)
    config = ckpt.config
    if stated:
        config = config.replace(num_target_layers=next(iter(stated.values())))
    save_draft(
        dst, config, ckpt.weights, to,
        embed_tokens=ckpt.embed_tokens, lm_head=ckpt.lm_head,
        extra_config=passthrough_config(ckpt.raw_config), overwrite=overwrite,
    )
    logger.info("converted %s (%s) -> %s (%s)", src, ckpt.format, dst, to)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        convert(
            args.src, args.dst, args.to, num_target_layers=args.num_target_layers, target=args.target,
            dtype=DTYPES[args.dtype] if args.dtype else None, overwrite=args.overwrite,
        )
    except DSparkCheckpointError as exc:
        parser.exit(1, f"error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

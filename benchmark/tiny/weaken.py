"""A weak DSpark drafter on purpose: a copy of a draft checkpoint with Gaussian noise on its backbone weights.

    python benchmark/tiny/weaken.py SRC_DIR OUT_DIR [--noise 2.0] [--seed 0] [--heads]
        [--confidence-shift DELTA] [--overwrite]

Every non-weight file of ``SRC_DIR`` (``config.json``, a shard index, ...) is copied as it is. In each
``*.safetensors`` file, a backbone tensor ``w`` becomes ``w + noise * std(w) * N(0, 1)`` (``std`` over the
whole tensor, computed in float32; the result is cast back to ``w``'s dtype). The backbone is everything but
the Markov and confidence heads (``markov_head.*``, ``confidence_head.*``) and the target's
``embed_tokens`` / ``lm_head`` copies a checkpoint may carry; ``--heads`` noises the two heads too. A tensor
with fewer than two elements, or a constant one (std 0), is left as it is. Tensors are visited in sorted name
order with one ``torch.Generator`` seeded by ``--seed``, so a (source, noise, seed) triple always gives the
same checkpoint. ``--confidence-shift DELTA`` then adds ``DELTA`` to the confidence head's bias
(``confidence_head.proj.bias``): every confidence logit moves by ``DELTA``, a one-parameter recalibration of
a head that the noise left overconfident (see ``CALIBRATING_SHIFT``). ``OUT_DIR/weaken.json`` says what was
done (source, noise, seed, shift, which tensors were noised).

Used by ``tests/gpu/issue6.py`` (scheduled verification with a drafter whose acceptance is near 1); the
default ``--noise`` is chosen so that the tiny drafter (``tests/fixtures/tiny-qwen3-dspark``) commits about
one token per verify step on the tiny target (measured with the reference loop, see ``DEFAULT_NOISE``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger("sglang_dspark")

# Noise factor (times each tensor's std) of the default weak drafter. On the tiny pair (greedy, reference loop
# on CPU, fp32, the first 16 HumanEval + 16 held-out prompts x 128 new tokens, seed 0) it brings the tokens per
# verify step (accepted drafts + 1, pooled over steps) from 4.86 down to 1.05 (temperature 1.0: 2.62 -> 1.19).
# On 4 + 4 of those prompts x 64 tokens, noise 0.5 gives 2.88, 1.0 gives 1.23, 4.0 gives 1.03.
DEFAULT_NOISE = 2.0
# The confidence head is left as trained, so it still scores drafts as if the backbone were the trained one:
# on the same run it predicts 2.14 committed tokens per step (1 + the sum of its survivals) against 1.05
# measured. Shifting its logits by -3 brings the prediction to 1.06 (-2: 1.17, -4: 1.02).
CALIBRATING_SHIFT = -3.0
CONFIDENCE_BIAS = "confidence_head.proj.bias"
NOTE_FILE = "weaken.json"
HEAD_PREFIXES = ("markov_head.", "confidence_head.")
TARGET_PARTS = ("embed_tokens", "lm_head")  # the target's tensors, never noised


def is_head(name: str) -> bool:
    """Whether ``name`` is a Markov or confidence head tensor (with or without a ``model.`` prefix)."""
    return name.removeprefix("model.").startswith(HEAD_PREFIXES)


def is_target_copy(name: str) -> bool:
    """Whether ``name`` is a copy of the target's ``embed_tokens`` / ``lm_head`` carried by the checkpoint."""
    return any(part in name.split(".") for part in TARGET_PARTS)


def noised(tensor: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor | None:
    """``tensor + noise * std(tensor) * N(0, 1)`` in ``tensor``'s dtype and shape (any shape), or None when
    the tensor has fewer than two elements or zero std (nothing to scale the noise to)."""
    if tensor.numel() < 2:
        return None
    x = tensor.float()
    std = float(x.std())
    if not std > 0.0:
        return None
    eps = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    return (x + noise * std * eps).to(tensor.dtype)


def weaken(src: Path, out: Path, noise: float = DEFAULT_NOISE, seed: int = 0, heads: bool = False,
           confidence_shift: float = 0.0, overwrite: bool = False) -> dict:
    """Write the weakened copy of draft checkpoint ``src`` into ``out``; returns the note written to
    ``out/weaken.json``. ``src`` is only read. Raises ``FileExistsError`` when ``out`` exists and
    ``overwrite`` is false, ``ValueError`` for a bad noise, ``out`` inside ``src`` (or the same dir), or a
    ``confidence_shift`` on a checkpoint without ``confidence_head.proj.bias``."""
    src, out = Path(src).resolve(), Path(out).resolve()
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"weaken: {src}/config.json does not exist (expected a draft checkpoint dir)")
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"weaken: {src} holds no *.safetensors file")
    if not noise >= 0.0:
        raise ValueError(f"weaken: --noise must be >= 0, found {noise}")
    if out == src or src in out.parents:
        raise ValueError(f"weaken: the output dir {out} must not be {src} or inside it")
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"weaken: {out} exists (pass --overwrite to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for path in sorted(src.iterdir()):
        if path.is_file() and path.suffix != ".safetensors" and path.name != NOTE_FILE:
            shutil.copy2(path, out / path.name)

    tensors: dict[str, dict[str, torch.Tensor]] = {}
    metadata: dict[str, dict[str, str] | None] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            metadata[file.name] = f.metadata()
            tensors[file.name] = {name: f.get_tensor(name) for name in f.keys()}
    generator = torch.Generator().manual_seed(seed)
    where = {name: fname for fname, group in tensors.items() for name in group}
    changed, kept = [], []
    for name in sorted(where):
        group = tensors[where[name]]
        if is_target_copy(name) or (is_head(name) and not heads):
            kept.append(name)
            continue
        new = noised(group[name], noise, generator)
        if new is None:
            kept.append(name)
            continue
        group[name] = new
        changed.append(name)
    if confidence_shift:
        bias = [name for name in where if name.removeprefix("model.") == CONFIDENCE_BIAS]
        if len(bias) != 1:
            raise ValueError(f"weaken: --confidence-shift needs exactly one tensor {CONFIDENCE_BIAS!r} in {src}, "
                             f"found {bias or 'none'}")
        group = tensors[where[bias[0]]]
        group[bias[0]] = (group[bias[0]].float() + confidence_shift).to(group[bias[0]].dtype)
    for fname, group in tensors.items():
        save_file(group, str(out / fname), metadata=metadata[fname])

    note = {
        "tool": "benchmark/tiny/weaken.py",
        "source": str(src),
        "noise": noise,
        "seed": seed,
        "heads_noised": heads,
        "confidence_shift": confidence_shift,
        "rule": "w + noise * std(w) * N(0, 1) per tensor (float32 std over the tensor, cast back to w's dtype)",
        "noised": changed,
        "unchanged": kept,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / NOTE_FILE).write_text(json.dumps(note, indent=1) + "\n")
    logger.info("weaken: %s -> %s, noise %s, seed %d: %d tensors noised, %d kept", src, out, noise, seed,
                len(changed), len(kept))
    return note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="draft checkpoint dir (e.g. tests/fixtures/tiny-qwen3-dspark)")
    parser.add_argument("out", type=Path, help="output dir (created)")
    parser.add_argument("--noise", type=float, default=DEFAULT_NOISE,
                        help=f"noise std as a multiple of each tensor's std (default {DEFAULT_NOISE})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heads", action="store_true", help="noise the Markov and confidence heads too")
    parser.add_argument("--confidence-shift", type=float, default=0.0,
                        help=f"add this to the confidence head's bias (e.g. {CALIBRATING_SHIFT}: recalibrates the "
                             "default weak tiny drafter's head)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        note = weaken(args.src, args.out, args.noise, args.seed, args.heads, args.confidence_shift, args.overwrite)
    except (OSError, ValueError) as exc:
        parser.exit(1, f"error: {exc}\n")
    print(f"{args.out}: {len(note['noised'])} tensors noised (x{args.noise} std, seed {args.seed}), "
          f"{len(note['unchanged'])} unchanged, confidence shift {args.confidence_shift}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

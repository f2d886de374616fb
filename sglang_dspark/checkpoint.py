"""The one loader for Qwen3 DSpark draft checkpoints, used by the reference and by the SGLang model.

Two on-disk layouts are read into one ``DSparkConfig`` and one dict of canonical tensors
(spec B.1-B.3):

* ``deepspec``: DeepSeek's ``dspark_qwen3_*_block7`` releases. ``config.json`` is a copy of the
  target's Qwen3 config (``model_type: qwen3``, ``architectures: ["Qwen3DSparkModel"]``) plus the
  DSpark keys, including ``num_target_layers`` = the TARGET's layer count. Tensor names are the
  canonical names below.
* ``torchspec``: TorchSpec exports (``Dogacel/Qwen3-8B-DSpark``). ``model_type`` is ``dspark`` or
  ``qwen3_dspark``; ``markov_head_type`` may say ``classical`` (= ``vanilla``); ``num_target_layers``,
  when present, counts the CAPTURED layers (TorchSpec's meaning) and the target's layer count is
  ``target_num_hidden_layers``; ``head_dim`` may be absent. Backbone tensors may use TorchSpec's
  internal names ``context_proj`` / ``context_norm`` / ``final_norm`` and the Markov tables may be
  bare ``markov_w1`` / ``markov_w2``.

Canonical tensor names (no ``model.`` prefix), d = hidden, S = len(target_layer_ids), r = Markov
rank, V = vocab::

    fc.weight [d, S*d]   hidden_norm.weight [d]   norm.weight [d]
    layers.{i}.input_layernorm.weight [d]   layers.{i}.post_attention_layernorm.weight [d]
    layers.{i}.self_attn.{q,k,v,o}_proj.weight   layers.{i}.self_attn.{q,k}_norm.weight [head_dim]
    layers.{i}.mlp.{gate,up,down}_proj.weight
    markov_head.markov_w1.weight [V, r]   markov_head.markov_w2.weight [V, r]
    gated: markov_head.gate_proj.{weight [r, d+r], bias [r]}
    rnn:   markov_head.joint_proj.{weight [3r, 2r+d], bias [3r]}
    confidence_head.proj.{weight [1, d(+r)], bias [1]}

``embed_tokens.weight`` / ``lm_head.weight`` [V, d] are copies of the target's tables that some
checkpoints carry; they are shape-checked and kept aside, never part of the drafter. Every other
tensor must be used: a silently dropped ``fc`` would leave a random projection and acceptance ~1.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from sglang_dspark.config import MARKOV_HEAD_TYPES, DSparkConfig

logger = logging.getLogger("sglang_dspark")

T = TypeVar("T")

FORMATS = ("deepspec", "torchspec")
DEEPSPEC_ARCHITECTURE = "Qwen3DSparkModel"
DEEPSPEC_MODEL_TYPE = "qwen3"
TORCHSPEC_MODEL_TYPES = ("dspark", "qwen3_dspark")
TORCHSPEC_MARKOV_ALIASES = {"classical": "vanilla"}
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
ASIDE_TENSORS = ("embed_tokens.weight", "lm_head.weight")

# Checkpoint name prefix -> canonical prefix. TorchSpec's DFlash backbone names and bare Markov tables.
_PREFIX_ALIASES = (
    ("context_proj.", "fc."),
    ("context_norm.", "hidden_norm."),
    ("final_norm.", "norm."),
    ("markov_w1.", "markov_head.markov_w1."),
    ("markov_w2.", "markov_head.markov_w2."),
)
# Canonical prefix -> TorchSpec output prefix (the inverse of the aliases above).
_TORCHSPEC_NAMES = tuple((canonical, torchspec) for torchspec, canonical in _PREFIX_ALIASES)

# config.json keys this module interprets or writes; everything else may be passed through verbatim.
_OWNED_CONFIG_KEYS = frozenset(
    {
        "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_draft_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
        "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling", "max_position_embeddings",
        "hidden_act", "attention_bias", "attention_dropout", "block_size", "mask_token_id",
        "target_layer_ids", "num_target_layers", "target_num_hidden_layers", "target_hidden_size",
        "markov_rank", "markov_head_type", "enable_confidence_head", "confidence_head_with_markov",
        "tie_word_embeddings", "layer_types", "use_sliding_window", "sliding_window", "dtype",
        "torch_dtype",
    }
)


class DSparkCheckpointError(ValueError):
    """A draft checkpoint (or its target) is malformed or does not match; the message names the
    file, the key or tensor, what was expected and what was found."""


@dataclass
class DraftWeights:
    """Canonical drafter tensors plus the optional target-table copies kept aside."""

    drafter: dict[str, torch.Tensor]
    embed_tokens: torch.Tensor | None = None  # [V, d]
    lm_head: torch.Tensor | None = None  # [V, d]


@dataclass
class DraftCheckpoint:
    """A loaded draft: ``weights`` holds canonical names only (see module docstring)."""

    path: Path
    format: str  # "deepspec" | "torchspec"
    config: DSparkConfig
    weights: dict[str, torch.Tensor]
    embed_tokens: torch.Tensor | None = None  # [V, d]
    lm_head: torch.Tensor | None = None  # [V, d]
    raw_config: dict[str, Any] = field(default_factory=dict)  # config.json as read


# ----------------------------------------------------------------------------------------------
# config.json


def read_draft_config(draft_dir: str | os.PathLike) -> tuple[DSparkConfig, str]:
    """Read ``config.json`` of a draft directory (or the file itself) -> (config, format name)."""
    path = _config_path(draft_dir)
    return parse_draft_config(_read_json(path), path)


def parse_draft_config(raw: Mapping[str, Any], path: str | os.PathLike) -> tuple[DSparkConfig, str]:
    """Parse an already-read draft config dict; ``path`` is only used in error messages."""
    fmt = detect_format(raw, path)
    keys = _Keys(raw, path)
    hidden = keys.get_int("hidden_size")
    heads = keys.get_int("num_attention_heads")
    num_layers = keys.get_int("num_hidden_layers")
    target_layer_ids = keys.get_int_list("target_layer_ids")
    markov_rank = keys.get_int("markov_rank", minimum=0)
    enable_confidence = keys.get_bool("enable_confidence_head")

    if "head_dim" in raw and raw["head_dim"] is not None:
        head_dim = keys.get_int("head_dim")
    elif hidden % heads:
        raise DSparkCheckpointError(
            f"{path}: key 'head_dim' is absent and hidden_size={hidden} is not divisible by "
            f"num_attention_heads={heads}; expected an explicit head_dim"
        )
    else:
        head_dim = hidden // heads

    allowed_markov = MARKOV_HEAD_TYPES + (tuple(TORCHSPEC_MARKOV_ALIASES) if fmt == "torchspec" else ())
    if markov_rank > 0:
        markov_type = str(keys.require("markov_head_type")).lower()
    else:
        markov_type = str(raw.get("markov_head_type") or "vanilla").lower()
    if markov_type not in allowed_markov:
        raise DSparkCheckpointError(
            f"{path}: key 'markov_head_type': expected one of {list(allowed_markov)}, "
            f"found {raw.get('markov_head_type')!r}"
        )
    markov_type = TORCHSPEC_MARKOV_ALIASES.get(markov_type, markov_type)

    if enable_confidence:
        with_markov = keys.get_bool("confidence_head_with_markov")
    else:
        with_markov = bool(raw.get("confidence_head_with_markov", False))

    if fmt == "deepspec":
        num_target_layers = keys.get_optional_int("num_target_layers")
    else:
        num_target_layers = _torchspec_target_layers(keys, raw, path, num_layers, hidden, target_layer_ids)

    layer_types = raw.get("layer_types")
    if layer_types is not None and list(layer_types) != ["full_attention"] * num_layers:
        raise DSparkCheckpointError(
            f"{path}: key 'layer_types': expected {num_layers} x 'full_attention' (DSpark drafts "
            f"have no sliding-window layers), found {layer_types!r}"
        )
    if raw.get("use_sliding_window"):
        raise DSparkCheckpointError(
            f"{path}: key 'use_sliding_window': expected false (DSpark drafts use full attention), "
            f"found {raw['use_sliding_window']!r}"
        )

    config = DSparkConfig(
        hidden_size=hidden,
        intermediate_size=keys.get_int("intermediate_size"),
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=keys.get_int("num_key_value_heads"),
        head_dim=head_dim,
        vocab_size=keys.get_int("vocab_size"),
        rms_norm_eps=keys.get_float("rms_norm_eps"),
        rope_theta=_rope_theta(raw, path),
        max_position_embeddings=keys.get_int("max_position_embeddings"),
        block_size=keys.get_int("block_size"),
        mask_token_id=keys.get_int("mask_token_id", minimum=0),
        target_layer_ids=tuple(target_layer_ids),
        num_target_layers=num_target_layers,
        markov_rank=markov_rank,
        markov_head_type=markov_type,
        enable_confidence_head=enable_confidence,
        confidence_head_with_markov=with_markov,
        hidden_act=str(raw.get("hidden_act", "silu")),
        attention_bias=bool(raw.get("attention_bias", False)),
    )
    check_config(config, path)
    return config, fmt


def detect_format(raw: Mapping[str, Any], path: str | os.PathLike) -> str:
    """``deepspec`` for ``model_type: qwen3`` + ``Qwen3DSparkModel``; ``torchspec`` for
    ``model_type`` in ``TORCHSPEC_MODEL_TYPES``; anything else is an error."""
    model_type = raw.get("model_type")
    if model_type in TORCHSPEC_MODEL_TYPES:
        return "torchspec"
    if model_type == DEEPSPEC_MODEL_TYPE:
        architectures = raw.get("architectures") or []
        if DEEPSPEC_ARCHITECTURE not in architectures:
            raise DSparkCheckpointError(
                f"{path}: key 'architectures': expected [{DEEPSPEC_ARCHITECTURE!r}] for a DeepSpec "
                f"DSpark draft (model_type 'qwen3'), found {architectures!r}; a plain Qwen3 model or "
                "a DFlash draft is not a DSpark draft"
            )
        return "deepspec"
    raise DSparkCheckpointError(
        f"{path}: key 'model_type': expected {DEEPSPEC_MODEL_TYPE!r} (DeepSpec layout) or one of "
        f"{list(TORCHSPEC_MODEL_TYPES)} (TorchSpec layout), found {model_type!r}"
    )


def check_config(config: DSparkConfig, path: str | os.PathLike) -> None:
    """Internal consistency of a config (whether read or built in code)."""
    problems = []
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "block_size"):
        if getattr(config, name) < 1:
            problems.append(f"key {name!r}: expected a positive integer, found {getattr(config, name)}")
    if config.num_key_value_heads >= 1 and config.num_attention_heads % config.num_key_value_heads:
        problems.append(
            f"key 'num_attention_heads': expected a multiple of num_key_value_heads="
            f"{config.num_key_value_heads}, found {config.num_attention_heads}"
        )
    if config.head_dim % 2:
        problems.append(f"key 'head_dim': expected an even size (rotate-half RoPE), found {config.head_dim}")
    if not 0 <= config.mask_token_id < config.vocab_size:
        problems.append(
            f"key 'mask_token_id': expected an id in 0..{config.vocab_size - 1} (vocab_size "
            f"{config.vocab_size}), found {config.mask_token_id}"
        )
    if config.markov_head_type not in MARKOV_HEAD_TYPES:
        problems.append(
            f"key 'markov_head_type': expected one of {list(MARKOV_HEAD_TYPES)}, found "
            f"{config.markov_head_type!r}"
        )
    if config.markov_rank < 0:
        problems.append(f"key 'markov_rank': expected >= 0, found {config.markov_rank}")
    if not config.target_layer_ids:
        problems.append("key 'target_layer_ids': expected a non-empty list, found []")
    negative = [i for i in config.target_layer_ids if i < 0]
    if negative:
        problems.append(
            f"key 'target_layer_ids': expected 0-indexed target decoder layers (>= 0), found {negative} "
            f"in {list(config.target_layer_ids)}"
        )
    if config.num_target_layers is not None:
        problems += _layer_id_problems(
            config.target_layer_ids, config.num_target_layers, "its num_target_layers"
        )
    if problems:
        raise DSparkCheckpointError(f"{path}: invalid DSpark draft config:\n  " + "\n  ".join(problems))


def validate_against_target(
    config: DSparkConfig,
    target_config: Mapping[str, Any] | Any,
    draft_path: str | os.PathLike,
    target_path: str | os.PathLike,
) -> None:
    """Check that the draft fits the target.

    ``target_config`` is a dict or an HF ``PretrainedConfig``; ``hidden_size``, ``vocab_size`` and
    ``num_hidden_layers`` are read from it. Valid capture ids are 0..L_t-2: the final layer's HF
    hidden state is final-normed while DSpark captures raw decoder-layer outputs.
    """
    check_config(config, draft_path)
    target_hidden = target_config_value(target_config, "hidden_size", target_path)
    target_vocab = target_config_value(target_config, "vocab_size", target_path)
    target_layers = target_config_value(target_config, "num_hidden_layers", target_path)
    problems = []
    if config.hidden_size != target_hidden:
        problems.append(
            f"key 'hidden_size': expected {target_hidden} (hidden_size of the target, {target_path}), "
            f"found {config.hidden_size}"
        )
    if config.vocab_size != target_vocab:
        problems.append(
            f"key 'vocab_size': expected {target_vocab} (vocab_size of the target, {target_path}), "
            f"found {config.vocab_size}"
        )
    if not 0 <= config.mask_token_id < target_vocab:
        problems.append(
            f"key 'mask_token_id': expected an id in 0..{target_vocab - 1} (the target's vocab, "
            f"{target_path}), found {config.mask_token_id}"
        )
    if config.num_target_layers is not None and config.num_target_layers != target_layers:
        problems.append(
            f"key 'num_target_layers': expected {target_layers} (num_hidden_layers of the target, "
            f"{target_path}), found {config.num_target_layers}"
        )
    problems += _layer_id_problems(config.target_layer_ids, target_layers, f"the target ({target_path})")
    if problems:
        raise DSparkCheckpointError(
            f"{draft_path}: draft does not match target {target_path}:\n  " + "\n  ".join(problems)
        )


def read_target_config(target: str | os.PathLike) -> dict[str, Any]:
    """Read a target model's ``config.json`` (a directory or the file)."""
    return _read_json(_config_path(target))


def target_config_value(
    target_config: Mapping[str, Any] | Any, key: str, target_path: str | os.PathLike
) -> int:
    """Integer ``key`` of a target config (dict or HF config; falls back to ``text_config``)."""
    if isinstance(target_config, Mapping):
        value = target_config.get(key)
        text_config = target_config.get("text_config")
        if value is None and isinstance(text_config, Mapping):
            value = text_config.get(key)
    else:
        value = getattr(target_config, key, None)
        text_config = getattr(target_config, "text_config", None)
        if value is None and text_config is not None:
            value = getattr(text_config, key, None)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DSparkCheckpointError(
            f"{target_path}: target config key {key!r}: expected an integer, found {value!r}"
        )
    return value


# ----------------------------------------------------------------------------------------------
# tensors


def expected_shapes(config: DSparkConfig) -> dict[str, tuple[int, ...]]:
    """Canonical drafter tensor name -> shape for ``config`` (embed/lm_head excluded)."""
    d, r, v = config.hidden_size, config.markov_rank, config.vocab_size
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    inter = config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "fc.weight": (d, config.num_context_features),
        "hidden_norm.weight": (d,),
        "norm.weight": (d,),
    }
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        projections = {
            "q_proj": (q_width, d), "k_proj": (kv_width, d), "v_proj": (kv_width, d), "o_proj": (d, q_width)
        }
        for proj, shape in projections.items():
            shapes[f"{p}self_attn.{proj}.weight"] = shape
            if config.attention_bias:
                shapes[f"{p}self_attn.{proj}.bias"] = (shape[0],)
        shapes[p + "self_attn.q_norm.weight"] = (config.head_dim,)
        shapes[p + "self_attn.k_norm.weight"] = (config.head_dim,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, d)
        shapes[p + "mlp.up_proj.weight"] = (inter, d)
        shapes[p + "mlp.down_proj.weight"] = (d, inter)
    if r > 0:
        shapes["markov_head.markov_w1.weight"] = (v, r)
        shapes["markov_head.markov_w2.weight"] = (v, r)
        if config.markov_head_type == "gated":
            shapes["markov_head.gate_proj.weight"] = (r, d + r)
            shapes["markov_head.gate_proj.bias"] = (r,)
        elif config.markov_head_type == "rnn":
            shapes["markov_head.joint_proj.weight"] = (3 * r, 2 * r + d)
            shapes["markov_head.joint_proj.bias"] = (3 * r,)
    if config.enable_confidence_head:
        shapes["confidence_head.proj.weight"] = (1, config.confidence_in_features)
        shapes["confidence_head.proj.bias"] = (1,)
    return shapes


def canonical_name(name: str, config: DSparkConfig) -> str | None:
    """Map a checkpoint tensor name to its canonical name; None for ``rotary_emb`` buffers.

    Strips one ``model.`` prefix, renames TorchSpec's ``context_proj``/``context_norm``/
    ``final_norm`` and bare ``markov_w1``/``markov_w2``, and ``midlayer.`` -> ``layers.0.`` for a
    one-layer draft. Unknown names are returned unchanged (``normalize_weights`` reports them).
    """
    name = name.removeprefix("model.")
    if name.startswith("rotary_emb.") or ".rotary_emb." in name:
        return None
    for alias, canonical in _PREFIX_ALIASES:
        if name.startswith(alias):
            return canonical + name[len(alias):]
    if name.startswith("midlayer.") and config.num_hidden_layers == 1:
        return "layers.0." + name[len("midlayer."):]
    return name


def normalize_weights(
    raw: Mapping[str, torch.Tensor],
    config: DSparkConfig,
    fmt: str,
    path: str | os.PathLike,
    sources: Mapping[str, str | os.PathLike] | None = None,
) -> DraftWeights:
    """Checkpoint name -> tensor mapping to canonical drafter tensors (no copies, no casts).

    Raises ``DSparkCheckpointError`` listing every missing tensor, every tensor left unused, every
    shape mismatch (expected vs found) and every pair of names that map to the same tensor.
    ``sources`` (checkpoint name -> file) makes messages name the shard a tensor came from.
    """
    expected = expected_shapes(config)
    aside_shape = (config.vocab_size, config.hidden_size)
    by_canonical: dict[str, str] = {}
    problems: list[str] = []
    skipped = 0

    def where(raw_name: str) -> str:
        return str(sources.get(raw_name, path)) if sources else str(path)

    for raw_name in raw:
        name = canonical_name(raw_name, config)
        if name is None:
            skipped += 1
            continue
        if name in by_canonical:
            problems.append(
                f"duplicate: tensors {by_canonical[name]!r} and {raw_name!r} both map to {name!r}"
            )
            continue
        by_canonical[name] = raw_name

    unused = sorted(raw_name for name, raw_name in by_canonical.items()
                    if name not in expected and name not in ASIDE_TENSORS)
    if unused:
        problems.append(
            f"{len(unused)} tensor(s) left unused (not part of a {config.markov_head_type} DSpark draft "
            f"with {config.num_hidden_layers} layers, markov_rank {config.markov_rank}, confidence head "
            f"{'on' if config.enable_confidence_head else 'off'}): {unused}"
        )
    missing = [name for name in expected if name not in by_canonical]
    if missing:
        problems.append(f"{len(missing)} required tensor(s) missing: {missing}")
    for name, shape in list(expected.items()) + [(n, aside_shape) for n in ASIDE_TENSORS]:
        raw_name = by_canonical.get(name)
        if raw_name is None:
            continue
        found = tuple(raw[raw_name].shape)
        if found != shape:
            problems.append(
                f"{where(raw_name)}: tensor {raw_name!r}"
                + (f" (canonical {name!r})" if raw_name != name else "")
                + f": expected shape {list(shape)}, found {list(found)}"
            )
    if problems:
        raise DSparkCheckpointError(
            f"{path}: {fmt} DSpark draft tensors do not match the config:\n  " + "\n  ".join(problems)
        )
    if skipped:
        logger.debug("%s: skipped %d rotary_emb buffer(s)", path, skipped)
    aside = {n: raw[by_canonical[n]] for n in ASIDE_TENSORS if n in by_canonical}
    return DraftWeights(
        drafter={name: raw[by_canonical[name]] for name in expected},
        embed_tokens=aside.get("embed_tokens.weight"),
        lm_head=aside.get("lm_head.weight"),
    )


def load_safetensors(draft_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of a directory -> (name -> tensor, name -> file); see ``read_shards``."""
    return read_shards(draft_dir, lambda file: load_file(str(file)))


def read_shards(
    draft_dir: str | os.PathLike, read_file: Callable[[Path], Mapping[str, T]]
) -> tuple[dict[str, T], dict[str, Path]]:
    """``read_file`` applied to every weight file of a directory -> (name -> entry, name -> file).

    Reads ``*.safetensors.index.json`` when present (and checks it against the shards), else every
    ``*.safetensors`` file (names must not repeat across files). ``read_file`` maps a file to its
    tensors (``load_file``) or to header entries (``python -m sglang_dspark.inspect``).
    """
    root = Path(draft_dir)
    indexes = sorted(root.glob("*" + INDEX_SUFFIX))
    if len(indexes) > 1:
        raise DSparkCheckpointError(
            f"{root}: expected at most one *{INDEX_SUFFIX}, found {[p.name for p in indexes]}"
        )
    if indexes:
        weight_map = _read_json(indexes[0]).get("weight_map")
        if not isinstance(weight_map, dict):
            raise DSparkCheckpointError(
                f"{indexes[0]}: required key 'weight_map' is missing or not an object"
            )
        files = [root / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(root.glob("*.safetensors"))
        weight_map = None
    if not files:
        raise DSparkCheckpointError(
            f"{root}: expected {WEIGHTS_FILE} or sharded *.safetensors with model{INDEX_SUFFIX}, found none"
        )
    absent_files = [f.name for f in files if not f.is_file()]
    if absent_files:
        raise DSparkCheckpointError(
            f"{indexes[0]}: lists shard(s) {absent_files}, which do not exist in {root}"
        )
    entries: dict[str, T] = {}
    sources: dict[str, Path] = {}
    for file in files:
        for name, entry in read_file(file).items():
            if name in entries:
                raise DSparkCheckpointError(f"{file}: tensor {name!r} also appears in {sources[name]}")
            if weight_map is not None and weight_map.get(name) != file.name:
                raise DSparkCheckpointError(
                    f"{indexes[0]}: key 'weight_map.{name}': expected {file.name!r} (the shard holding "
                    f"it), found {weight_map.get(name)!r}"
                )
            entries[name] = entry
            sources[name] = file
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(entries))
        if absent:
            raise DSparkCheckpointError(f"{indexes[0]}: lists tensor(s) no shard holds: {absent}")
    return entries, sources


def load_draft(
    draft_dir: str | os.PathLike,
    target_config: Mapping[str, Any] | Any | str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    target_path: str | os.PathLike | None = None,
) -> DraftCheckpoint:
    """Load a draft directory in either layout into canonical tensors.

    ``target_config``: a dict, an HF ``PretrainedConfig``, or a target directory / config.json
    path; when given the draft is validated against it (``target_path`` names it in errors; by
    default the path given or the config's ``_name_or_path``). ``dtype`` casts floating tensors.
    """
    root = Path(draft_dir)
    config_path = _config_path(root)
    raw_config = _read_json(config_path)
    config, fmt = parse_draft_config(raw_config, config_path)
    if target_config is not None:
        if isinstance(target_config, (str, os.PathLike)):
            target_path = target_path or _config_path(target_config)
            target_config = read_target_config(target_config)
        target_path = target_path or getattr(target_config, "_name_or_path", None) or "<target config>"
        validate_against_target(config, target_config, config_path, target_path)
    tensors, sources = load_safetensors(root)
    weights = normalize_weights(tensors, config, fmt, root, sources)
    if dtype is not None:
        weights.drafter = {n: _cast(t, dtype) for n, t in weights.drafter.items()}
        weights.embed_tokens = _cast(weights.embed_tokens, dtype)
        weights.lm_head = _cast(weights.lm_head, dtype)
    tables = {"embed_tokens": weights.embed_tokens, "lm_head": weights.lm_head}
    logger.info(
        "loaded %s DSpark draft %s: %d drafter tensors, %d layers, markov %s r=%d, confidence %s, "
        "own target tables %s",
        fmt, root, len(weights.drafter), config.num_hidden_layers, config.markov_head_type,
        config.markov_rank, config.enable_confidence_head, [n for n, t in tables.items() if t is not None],
    )
    return DraftCheckpoint(
        path=root, format=fmt, config=config, weights=weights.drafter,
        embed_tokens=weights.embed_tokens, lm_head=weights.lm_head, raw_config=raw_config,
    )


# ----------------------------------------------------------------------------------------------
# writing


def save_draft(
    out_dir: str | os.PathLike,
    config: DSparkConfig,
    weights: Mapping[str, torch.Tensor],
    fmt: str,
    embed_tokens: torch.Tensor | None = None,
    lm_head: torch.Tensor | None = None,
    extra_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in the DeepSpec or TorchSpec layout.

    ``weights`` uses canonical names and must match ``config`` exactly. DeepSpec output needs
    ``config.num_target_layers`` (the target's layer count). ``extra_config`` keys (e.g.
    ``bos_token_id``, ``num_anchors``) are written verbatim unless this module owns the key.
    Returns the directory.
    """
    if fmt not in FORMATS:
        raise DSparkCheckpointError(
            f"{out_dir}: output format: expected one of {list(FORMATS)}, found {fmt!r}"
        )
    check_config(config, out_dir)
    aside = {n: t for n, t in zip(ASIDE_TENSORS, (embed_tokens, lm_head)) if t is not None}
    normalized = normalize_weights({**weights, **aside}, config, "canonical", out_dir)
    if fmt == "deepspec" and config.num_target_layers is None:
        raise DSparkCheckpointError(
            f"{out_dir}: cannot write the DeepSpec layout: key 'num_target_layers' (the target's layer "
            "count) is unknown; set it in the config (config.replace(num_target_layers=L)) or give the "
            "converter --num-target-layers / --target"
        )
    if fmt == "torchspec" and config.markov_rank > 0 and config.markov_head_type != "vanilla":
        raise DSparkCheckpointError(
            f"{out_dir}: cannot write the TorchSpec layout: key 'markov_head_type': TorchSpec defines "
            f"only 'vanilla' ('classical'), found {config.markov_head_type!r}; write deepspec instead"
        )
    dtype_name = str(normalized.drafter["fc.weight"].dtype).removeprefix("torch.")
    extra = {k: v for k, v in (extra_config or {}).items() if k not in _OWNED_CONFIG_KEYS}
    if fmt == "deepspec":
        raw_config = {**extra, **_deepspec_config(config, dtype_name)}
        tensors = dict(normalized.drafter)
    else:
        raw_config = {**extra, **_torchspec_config(config, dtype_name)}
        tensors = {_torchspec_name(n): t for n, t in normalized.drafter.items()}
    tensors.update(aside)

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in root.iterdir()
                   if p.name.endswith((".safetensors", INDEX_SUFFIX)) and p.name != WEIGHTS_FILE)
    if stale:
        raise DSparkCheckpointError(
            f"{root}: expected no other weight files, found {stale}; use an empty directory"
        )
    existing = [p.name for p in (root / CONFIG_FILE, root / WEIGHTS_FILE) if p.exists()]
    if existing and not overwrite:
        raise DSparkCheckpointError(
            f"{root}: expected an empty directory, found {existing} "
            "(overwrite=True / --overwrite replaces them)"
        )
    contiguous = {n: t.contiguous() for n, t in tensors.items()}
    save_file(contiguous, str(root / WEIGHTS_FILE), metadata={"format": "pt"})
    with open(root / CONFIG_FILE, "w") as f:
        json.dump(raw_config, f, indent=2)
        f.write("\n")
    logger.info("wrote %s DSpark draft %s (%d tensors)", fmt, root, len(tensors))
    return root


def passthrough_config(raw_config: Mapping[str, Any]) -> dict[str, Any]:
    """Keys of a read config.json this module does not interpret (bos/eos ids, num_anchors, ...)."""
    return {k: v for k, v in raw_config.items() if k not in _OWNED_CONFIG_KEYS}


def random_draft_weights(
    config: DSparkConfig, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random canonical drafter weights for ``config`` (tests, tiny exported pairs).

    Matrices ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2), ``markov_w1``
    (an embedding table) ~ N(0, 1), so activations stay O(1) through the backbone.
    """
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in expected_shapes(config).items():
        values = torch.randn(shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight"):
            values = 1.0 + 0.1 * values
        elif name.endswith(".bias"):
            values = 0.1 * values
        elif name != "markov_head.markov_w1.weight":
            values = values / shape[1] ** 0.5
        weights[name] = values.to(dtype)
    return weights


# ----------------------------------------------------------------------------------------------
# helpers


def _deepspec_config(config: DSparkConfig, dtype_name: str) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "architectures": [DEEPSPEC_ARCHITECTURE],
        "model_type": DEEPSPEC_MODEL_TYPE,
        **_common_config(config),
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "layer_types": ["full_attention"] * config.num_hidden_layers,
        "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": False,
        "num_target_layers": config.num_target_layers,
        **_dspark_config(config),
        "dtype": dtype_name,
    }
    return raw


def _torchspec_config(config: DSparkConfig, dtype_name: str) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "architectures": [DEEPSPEC_ARCHITECTURE],
        "model_type": TORCHSPEC_MODEL_TYPES[0],
        **_common_config(config),
        "num_draft_layers": config.num_hidden_layers,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": False,
        "target_hidden_size": config.hidden_size,
        **_dspark_config(config),
        "torch_dtype": dtype_name,
    }
    if config.num_target_layers is not None:
        raw["target_num_hidden_layers"] = config.num_target_layers
    return raw


def _common_config(config: DSparkConfig) -> dict[str, Any]:
    return {
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "attention_bias": config.attention_bias,
    }


def _dspark_config(config: DSparkConfig) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "target_layer_ids": list(config.target_layer_ids),
        "block_size": config.block_size,
        "mask_token_id": config.mask_token_id,
        "markov_rank": config.markov_rank,
    }
    if config.markov_rank > 0:
        raw["markov_head_type"] = config.markov_head_type
    raw["enable_confidence_head"] = config.enable_confidence_head
    if config.enable_confidence_head:
        raw["confidence_head_with_markov"] = config.confidence_head_with_markov
    return raw


def _torchspec_name(name: str) -> str:
    for canonical, torchspec in _TORCHSPEC_NAMES:
        if name.startswith(canonical):
            return torchspec + name[len(canonical):]
    return name


def _torchspec_target_layers(
    keys: "_Keys", raw: Mapping[str, Any], path: str | os.PathLike, num_layers: int, hidden: int,
    target_layer_ids: list[int],
) -> int | None:
    """TorchSpec keys that restate draft facts must agree; returns the target's layer count if given."""
    if raw.get("num_draft_layers") is not None and keys.get_int("num_draft_layers") != num_layers:
        raise DSparkCheckpointError(
            f"{path}: key 'num_draft_layers': expected {num_layers} (num_hidden_layers), "
            f"found {raw['num_draft_layers']!r}"
        )
    captured = raw.get("num_target_layers")
    if captured is not None and keys.get_int("num_target_layers") != len(target_layer_ids):
        raise DSparkCheckpointError(
            f"{path}: key 'num_target_layers': in the TorchSpec layout it counts the captured layers; "
            f"expected {len(target_layer_ids)} (len(target_layer_ids)), found {raw['num_target_layers']!r}"
        )
    if raw.get("target_hidden_size") is not None and keys.get_int("target_hidden_size") != hidden:
        raise DSparkCheckpointError(
            f"{path}: key 'target_hidden_size': expected {hidden} (hidden_size; the draft and target "
            f"widths must agree), found {raw['target_hidden_size']!r}"
        )
    return keys.get_optional_int("target_num_hidden_layers")


def _layer_id_problems(ids: tuple[int, ...], num_layers: int, owner: str) -> list[str]:
    bad = [i for i in ids if not 0 <= i <= num_layers - 2]
    if not bad:
        return []
    text = (
        f"key 'target_layer_ids': expected ids in 0..{num_layers - 2} for {owner} with {num_layers} "
        f"layers, found {bad} in {list(ids)}"
    )
    if num_layers - 1 in bad:
        text += (
            f"; layer {num_layers - 1} is the final layer, which is forbidden: HF returns its hidden "
            "state final-normed, while DSpark captures raw decoder-layer outputs"
        )
    return [text]


def _rope_theta(raw: Mapping[str, Any], path: str | os.PathLike) -> float:
    params = raw.get("rope_parameters")
    flat = raw.get("rope_theta")
    scaling = raw.get("rope_scaling")
    for key, block in (("rope_parameters", params), ("rope_scaling", scaling)):
        if block is None:
            continue
        if not isinstance(block, Mapping):
            raise DSparkCheckpointError(f"{path}: key {key!r}: expected an object, found {block!r}")
        rope_type = block.get("rope_type", block.get("type", "default"))
        if rope_type != "default":
            raise DSparkCheckpointError(
                f"{path}: key '{key}.rope_type': expected 'default' (plain RoPE), found {rope_type!r}"
            )
    nested = params.get("rope_theta") if params is not None else None
    if nested is not None and flat is not None and float(nested) != float(flat):
        raise DSparkCheckpointError(
            f"{path}: keys 'rope_theta' and 'rope_parameters.rope_theta' disagree: {flat!r} vs {nested!r}"
        )
    theta = nested if nested is not None else flat
    if theta is None:
        raise DSparkCheckpointError(
            f"{path}: required key 'rope_theta' (or 'rope_parameters.rope_theta') is missing"
        )
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise DSparkCheckpointError(f"{path}: key 'rope_theta': expected a positive number, found {theta!r}")
    return float(theta)


class _Keys:
    """Typed access to a raw config dict with errors naming the file and the key."""

    def __init__(self, raw: Mapping[str, Any], path: str | os.PathLike):
        self.raw, self.path = raw, path

    def require(self, key: str) -> Any:
        if self.raw.get(key) is None:
            raise DSparkCheckpointError(f"{self.path}: required key {key!r} is missing")
        return self.raw[key]

    def get_int(self, key: str, minimum: int = 1) -> int:
        value = self.require(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise DSparkCheckpointError(
                f"{self.path}: key {key!r}: expected an integer >= {minimum}, found {value!r}"
            )
        return value

    def get_optional_int(self, key: str) -> int | None:
        return None if self.raw.get(key) is None else self.get_int(key)

    def get_float(self, key: str) -> float:
        value = self.require(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise DSparkCheckpointError(
                f"{self.path}: key {key!r}: expected a positive number, found {value!r}"
            )
        return float(value)

    def get_bool(self, key: str) -> bool:
        value = self.require(key)
        if not isinstance(value, bool):
            raise DSparkCheckpointError(f"{self.path}: key {key!r}: expected true or false, found {value!r}")
        return value

    def get_int_list(self, key: str) -> list[int]:
        value = self.require(key)
        integers = isinstance(value, list) and all(type(v) is int for v in value)
        if not integers or not value:
            raise DSparkCheckpointError(
                f"{self.path}: key {key!r}: expected a non-empty list of integers, found {value!r}"
            )
        return value


def _config_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / CONFIG_FILE if path.is_dir() else path


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DSparkCheckpointError(f"{path}: file not found (expected a {path.name})")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise DSparkCheckpointError(f"{path}: expected valid JSON, found a parse error: {exc}") from exc
    if not isinstance(data, dict):
        raise DSparkCheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if tensor is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)

"""DSPARK server-argument resolution (``--speculative-algorithm DSPARK``).

SGLang calls, inside ``ServerArgs.__post_init__`` (arg_groups/speculative_hook.py):
``validate_server_args`` (registered with the algorithm), then ``DSparkSpecAlgo.handle_server_args``
-> ``handle_server_args`` below. Afterwards the worker can rely on::

    speculative_dspark_block_size = gamma           (flag, else the draft's block_size, else 7)
    speculative_num_draft_tokens  = gamma + 1       (verify width: [bonus, d_1 .. d_gamma])
    speculative_num_steps = speculative_eagle_topk = 1
    speculative_dspark_verify = "scheduled" | "full"  (scheduled needs the draft's confidence head)
    speculative_dspark_cost_profile = "auto" | "builtin" | a readable cost profile file
    speculative_draft_attention_backend in SUPPORTED_DRAFT_ATTENTION_BACKENDS
    max_running_requests (48 unless given), enable_mixed_chunk = False

and on the draft matching the target (hidden size, vocab, mask token, capture layer ids).
Every error is a ``ValueError`` that names the flag, or the file and key, at fault.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sglang_dspark.checkpoint import (
    CONFIG_FILE,
    DSparkCheckpointError,
    parse_draft_config,
    read_target_config,
    validate_against_target,
)
from sglang_dspark.config import DSparkConfig

if TYPE_CHECKING:
    from sglang.srt.server_args import ServerArgs

logger = logging.getLogger("sglang_dspark")

DEFAULT_MAX_RUNNING_REQUESTS = 48
CUDA_LIKE_DEVICES = ("cuda", "musa")
# The draft forward is gamma tokens wide while --speculative-num-draft-tokens is gamma + 1. FlashInfer
# takes the per-request query length from spec_info.draft_token_num; triton and fa3 take it from the
# server args, so they are only right for the (gamma + 1)-wide target verify, not for the draft.
SUPPORTED_DRAFT_ATTENTION_BACKENDS = ("flashinfer",)
DRAFT_ATTENTION_FALLBACK = "flashinfer"


def validate_server_args(server_args: ServerArgs) -> None:
    """Checks that need no draft checkpoint: platform, parallelism, single-chain drafting, flags."""
    from sglang.srt.arg_groups.overrides import resolved_view

    _require_patched_sglang()
    device = server_args.device or ""
    if not device.startswith(CUDA_LIKE_DEVICES):
        raise ValueError(
            f"DSPARK speculative decoding needs a CUDA device (--device cuda), got --device {server_args.device!r}."
        )
    if server_args.pp_size != 1:
        raise ValueError(f"DSPARK speculative decoding only supports --pp-size 1, got {server_args.pp_size}.")
    if resolved_view(server_args).enable_dp_attention:
        raise ValueError("DSPARK speculative decoding does not support --enable-dp-attention.")
    if server_args.speculative_draft_model_path is None:
        raise ValueError(
            "DSPARK speculative decoding requires --speculative-draft-model-path (a DSpark draft checkpoint)."
        )
    for flag, value in (
        ("--speculative-eagle-topk", server_args.speculative_eagle_topk),
        ("--speculative-num-steps", server_args.speculative_num_steps),
    ):
        if value is not None and int(value) != 1:
            raise ValueError(
                f"DSPARK drafts one chain of gamma tokens in a single step: {flag} must be 1 (or unset), "
                f"got {value}. Set the number of draft tokens with --speculative-dspark-block-size."
            )
    if server_args.speculative_draft_window_size is not None:
        raise ValueError(
            "DSPARK speculative decoding does not support --speculative-draft-window-size "
            f"(got {server_args.speculative_draft_window_size}); the draft keeps the full context."
        )
    block_size = server_args.speculative_dspark_block_size
    if block_size is not None and int(block_size) < 1:
        raise ValueError(f"--speculative-dspark-block-size must be a positive integer, got {block_size}.")


def handle_server_args(server_args: ServerArgs) -> None:
    """Resolve the DSPARK fields in place (see the module docstring); runs after ``validate_server_args``."""
    server_args.speculative_num_steps = 1
    server_args.speculative_eagle_topk = 1

    draft_path = server_args.speculative_draft_model_path
    draft_config = read_draft_config_for_server(server_args)
    gamma = resolve_gamma(server_args, draft_config)
    server_args.speculative_dspark_block_size = gamma
    server_args.speculative_num_draft_tokens = gamma + 1

    target_file = _config_file(server_args.model_path, server_args.revision)
    try:
        validate_against_target(draft_config, read_target_config(target_file), draft_path, server_args.model_path)
    except DSparkCheckpointError as e:
        raise ValueError(
            f"--speculative-draft-model-path {draft_path} does not fit --model-path {server_args.model_path}: {e}"
        ) from e

    check_tensor_parallel(server_args, draft_config)
    resolve_verify_mode(server_args, draft_config)
    _resolve_draft_attention_backend(server_args)
    if server_args.max_running_requests is None:
        server_args.max_running_requests = DEFAULT_MAX_RUNNING_REQUESTS
        logger.info(
            "DSPARK: max_running_requests set to %d; override with --max-running-requests.",
            DEFAULT_MAX_RUNNING_REQUESTS,
        )
    if server_args.enable_mixed_chunk:
        server_args.enable_mixed_chunk = False
        logger.warning("DSPARK: mixed chunked prefill (--enable-mixed-chunk) is disabled.")
    logger.info(
        "DSPARK: gamma=%d draft tokens, verify width %d (%s verification), target layers %s, draft attention "
        "backend %s.",
        gamma, gamma + 1, server_args.speculative_dspark_verify, list(draft_config.target_layer_ids),
        server_args.speculative_draft_attention_backend,
    )


def resolve_verify_mode(server_args: ServerArgs, draft_config: DSparkConfig) -> None:
    """--speculative-dspark-verify: scheduled by default when the draft has a confidence head; a cost profile
    file given with --speculative-dspark-cost-profile is read here, so a bad one fails at launch."""
    from sglang_dspark.cost_profile import CostProfile, CostProfileError

    mode = server_args.speculative_dspark_verify
    has_head = draft_config.enable_confidence_head
    if mode is None:
        mode = "scheduled" if has_head else "full"
    elif mode not in ("scheduled", "full"):
        raise ValueError(f"--speculative-dspark-verify must be 'scheduled' or 'full', got {mode!r}.")
    if mode == "scheduled" and not has_head:
        raise ValueError(
            f"--speculative-dspark-verify scheduled needs a draft with a confidence head: "
            f"{server_args.speculative_draft_model_path} has none (key 'enable_confidence_head' is false); "
            "use --speculative-dspark-verify full."
        )
    server_args.speculative_dspark_verify = mode
    profile = server_args.speculative_dspark_cost_profile or "auto"
    server_args.speculative_dspark_cost_profile = profile
    if mode == "scheduled" and profile not in ("auto", "builtin"):
        try:
            CostProfile.load(profile)
        except (OSError, CostProfileError) as e:
            raise ValueError(f"--speculative-dspark-cost-profile {profile}: {e}") from e


def resolve_gamma(server_args: ServerArgs, draft_config: DSparkConfig) -> int:
    """gamma from --speculative-dspark-block-size, else the checkpoint's block_size; checks
    --speculative-num-draft-tokens against gamma + 1."""
    flag = server_args.speculative_dspark_block_size
    if flag is not None:
        gamma, source = int(flag), f"--speculative-dspark-block-size {int(flag)}"
        if gamma > draft_config.block_size:
            raise ValueError(
                f"--speculative-dspark-block-size {gamma} exceeds the block_size {draft_config.block_size} the draft "
                f"{server_args.speculative_draft_model_path} was trained with; use at most {draft_config.block_size}."
            )
        if gamma != draft_config.block_size:
            logger.warning(
                "DSPARK: --speculative-dspark-block-size %d is below the draft checkpoint's block_size %d (%s).",
                gamma, draft_config.block_size, server_args.speculative_draft_model_path,
            )
    else:
        gamma = draft_config.block_size
        source = f"block_size {gamma} of {server_args.speculative_draft_model_path}"
    num_draft_tokens = server_args.speculative_num_draft_tokens
    if num_draft_tokens is not None and int(num_draft_tokens) != gamma + 1:
        raise ValueError(
            f"--speculative-num-draft-tokens {num_draft_tokens} contradicts --speculative-dspark-block-size: "
            f"DSPARK verifies gamma + 1 tokens and gamma = {gamma} ({source}), so --speculative-num-draft-tokens "
            f"must be {gamma + 1}. Leave it unset (it is derived), or set --speculative-dspark-block-size "
            f"{int(num_draft_tokens) - 1}."
        )
    return gamma


def check_tensor_parallel(server_args: ServerArgs, draft_config: DSparkConfig) -> None:
    """The draft's layers split over ``--tp-size`` ranks as DFLASH's parallel layers need: query heads and
    ``intermediate_size`` divisible by tp, key/value heads divisible by tp or dividing it (then replicated). The
    rest of TP is the worker's (the lm_head gathered once, rank 0's draft state broadcast each step)."""
    tp = int(server_args.tp_size)
    c = draft_config
    kv_ok = c.num_key_value_heads % tp == 0 if c.num_key_value_heads >= tp else tp % c.num_key_value_heads == 0
    if c.num_attention_heads % tp or c.intermediate_size % tp or not kv_ok:
        raise ValueError(
            f"--tp-size {tp} does not split the draft {server_args.speculative_draft_model_path}: expected keys "
            f"'num_attention_heads' and 'intermediate_size' divisible by {tp} and 'num_key_value_heads' divisible "
            f"by {tp} or dividing it, found {c.num_attention_heads}, {c.intermediate_size} and {c.num_key_value_heads}"
        )


def read_draft_config_for_server(server_args: ServerArgs) -> DSparkConfig:
    """The draft checkpoint's ``DSparkConfig`` (a local dir or a hub repo's config.json); any problem is a
    ValueError naming the flag."""
    path = server_args.speculative_draft_model_path
    config_file = _config_file(path, server_args.speculative_draft_model_revision)
    try:
        config, _fmt = parse_draft_config(_read_json(config_file), config_file)
    except DSparkCheckpointError as e:
        raise ValueError(f"--speculative-draft-model-path {path} is not a usable DSpark draft: {e}") from e
    return config


def target_capture(server_args: ServerArgs, target_num_layers: int) -> tuple[list[int], int]:
    """(target layer ids whose outputs the target captures, draft layer count) for the target model runner."""
    config = read_draft_config_for_server(server_args)
    bad = [i for i in config.target_layer_ids if not 0 <= i <= target_num_layers - 2]
    if bad:
        raise ValueError(
            f"{server_args.speculative_draft_model_path}: key 'target_layer_ids' {list(config.target_layer_ids)} "
            f"has ids {bad} outside 0..{target_num_layers - 2} for the {target_num_layers}-layer target."
        )
    return list(config.target_layer_ids), config.num_hidden_layers


def _resolve_draft_attention_backend(server_args: ServerArgs) -> None:
    from sglang.srt.arg_groups.overrides import attention_backends_of, resolved_view

    explicit = server_args.speculative_draft_attention_backend
    if explicit is not None:
        if explicit not in SUPPORTED_DRAFT_ATTENTION_BACKENDS:
            raise ValueError(
                f"--speculative-draft-attention-backend {explicit} is not supported by DSPARK; "
                f"choose one of {list(SUPPORTED_DRAFT_ATTENTION_BACKENDS)} (the draft forward is gamma tokens wide)."
            )
        return
    inherited, _ = attention_backends_of(resolved_view(server_args))
    if inherited in SUPPORTED_DRAFT_ATTENTION_BACKENDS:
        server_args.speculative_draft_attention_backend = inherited
        return
    if inherited is not None:
        logger.warning(
            "DSPARK: the draft does not support the target's attention backend %r; using %r for the draft.",
            inherited, DRAFT_ATTENTION_FALLBACK,
        )
    server_args.speculative_draft_attention_backend = DRAFT_ATTENTION_FALLBACK


def _require_patched_sglang() -> None:
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    if not hasattr(SpeculativeAlgorithm, "is_dflash_family"):
        import sglang

        site = Path(sglang.__file__).resolve().parent.parent
        raise ValueError(
            f"DSPARK needs the sglang-dspark patch series applied to {site / 'sglang'}: run "
            f"`python -m sglang_dspark.patching apply --site {site}`."
        )


def _config_file(model_path: str, revision: str | None) -> Path:
    """``config.json`` of a local model dir, or of a hub repo (downloaded alone)."""
    local = Path(model_path)
    if local.is_dir():
        return local / CONFIG_FILE
    if local.is_file():
        return local
    if model_path.startswith(("/", ".", "~")) or model_path.count("/") > 1:
        raise ValueError(f"{model_path}: no such directory (expected a model dir holding {CONFIG_FILE}).")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(model_path, CONFIG_FILE, revision=revision))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DSparkCheckpointError(f"{path}: file not found (expected a {path.name})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DSparkCheckpointError(f"{path}: expected valid JSON, found a parse error: {e}") from e
    if not isinstance(data, dict):
        raise DSparkCheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data

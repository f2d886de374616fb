"""SGLang plugin entry point: ``sglang.srt.plugins: dspark = sglang_dspark.plugin:load``.

``load()`` runs in the launcher and in every scheduler process (SGLang's ``load_plugins()``). It
registers the ``DSPARK`` speculative algorithm (``DSparkSpecAlgo``, a ``CustomSpecAlgo``) and the
TorchSpec config model types ``dspark`` / ``qwen3_dspark`` with ``transformers.AutoConfig``. It
needs SGLang 0.5.15 with ``patches/sglang-0.5.15`` applied (``python -m sglang_dspark.patching apply``).

What the worker (``sglang_dspark.worker.DSparkWorker``) and the draft model
(``sglang_dspark.model.DSparkDraftModel``) can rely on:

* ``spec_algorithm`` (scheduler, model runners, graph runners) is the ``DSparkSpecAlgo`` instance:
  ``is_dspark()`` and ``is_dflash_family()`` are True, ``is_dflash()`` is False,
  ``supports_target_verify_for_draft()`` is True, ``need_topk()`` / ``carries_draft_hidden_states()``
  are False. Every SGLang gate that DFLASH passes through tests ``is_dflash_family()`` after the
  patches: target aux-hidden capture + FULL prefill-graph capture, draft KV sizing in the pool,
  draft ``input_embeds`` in the decode graph, ``spec_info.prepare_for_decode`` for KV
  over-allocation, request validation.
* Widths: ``server_args.speculative_dspark_block_size`` = gamma, ``speculative_num_draft_tokens`` =
  gamma + 1. ``get_num_tokens_per_bs_for_target_verify(n, is_draft_worker)`` is ``n - 1`` on the draft
  worker and ``n`` on the target, so the draft ``DecodeCudaGraphRunner`` (TARGET_VERIFY) is captured
  gamma tokens per request and the target's gamma + 1; the captured dummy spec info is
  ``DFlashVerifyInput(draft_token_num=<that width>)``. The draft attention backend is flashinfer.
* The target model runner captures the outputs of the draft's ``target_layer_ids``
  (``resolve_target_capture``) through ``set_dflash_layers_to_capture``: with CaptureHiddenMode.FULL,
  ``logits_output.hidden_states`` is ``[num_tokens, S * d]`` in ``target_layer_ids`` order.
  ``model_runner.dflash_draft_num_layers`` is the draft's layer count (KV pool sizing).
* ``create_worker`` registers the draft architectures ``Qwen3DSparkModel`` and ``DSparkDraftModel``
  -> ``sglang_dspark.model.DSparkDraftModel`` in SGLang's ``ModelRegistry`` before returning
  ``DSparkWorker``, so the draft ``TpModelWorker`` built inside the worker finds the class.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sglang.srt.speculative.spec_registry import CustomSpecAlgo
from transformers import AutoConfig, Qwen3Config

from sglang_dspark import args

if TYPE_CHECKING:
    from sglang.srt.server_args import ServerArgs

logger = logging.getLogger("sglang_dspark")

ALGORITHM_NAME = "DSPARK"
DRAFT_ARCHITECTURES = ("Qwen3DSparkModel", "DSparkDraftModel")


class DSparkHFConfig(Qwen3Config):
    """TorchSpec DSpark draft config (``model_type: dspark``): a Qwen3 backbone config plus DSpark keys."""

    model_type = "dspark"


class Qwen3DSparkHFConfig(Qwen3Config):
    """TorchSpec DSpark draft config (``model_type: qwen3_dspark``)."""

    model_type = "qwen3_dspark"


class DSparkSpecAlgo(CustomSpecAlgo):
    """``DSPARK``: a DFLASH-family algorithm; the draft runs gamma tokens, the target verifies gamma + 1."""

    def is_dspark(self) -> bool:
        return True

    def is_dflash_family(self) -> bool:
        return True

    def supports_target_verify_for_draft(self) -> bool:
        return True

    def handle_server_args(self, server_args: ServerArgs) -> None:
        args.handle_server_args(server_args)

    def get_num_tokens_per_bs_for_target_verify(self, num_draft_tokens: int, is_draft_worker: bool) -> int:
        """Tokens per request of a TARGET_VERIFY forward: gamma on the draft, gamma + 1 on the target."""
        return num_draft_tokens - 1 if is_draft_worker else num_draft_tokens

    def resolve_target_capture(self, server_args: ServerArgs, target_num_layers: int) -> tuple[list[int], int]:
        return args.target_capture(server_args, target_num_layers)


def _create_worker_class(server_args: ServerArgs) -> type:
    register_draft_architectures()
    from sglang_dspark.worker import DSparkWorker

    return DSparkWorker


def register_draft_architectures() -> None:
    """Map the draft ``architectures`` names to ``DSparkDraftModel`` in SGLang's ``ModelRegistry``.

    Imports the SGLang model registry and the draft model (SGLang layers), so it runs only when the
    draft worker is created, not in ``load()``.
    """
    from sglang.srt.models.registry import ModelRegistry

    from sglang_dspark.model import DSparkDraftModel

    for arch in DRAFT_ARCHITECTURES:
        ModelRegistry.models[arch] = DSparkDraftModel


def register_config_types() -> None:
    """Let ``transformers.AutoConfig`` (and so SGLang's ModelConfig) read TorchSpec draft configs."""
    for config_class in (DSparkHFConfig, Qwen3DSparkHFConfig):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)


def load() -> None:
    """Entry point: register DSPARK and the draft config types (idempotent)."""
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
    from sglang.srt.speculative.spec_registry import get_spec

    register_config_types()
    if get_spec(ALGORITHM_NAME) is None:
        SpeculativeAlgorithm.register(
            ALGORITHM_NAME,
            supports_overlap=True,
            validate_server_args=args.validate_server_args,
            spec_class=DSparkSpecAlgo,
        )(_create_worker_class)
        logger.debug("registered speculative algorithm %s", ALGORITHM_NAME)

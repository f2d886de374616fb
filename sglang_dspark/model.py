"""The DSpark drafter on SGLang layers: DFLASH's non-causal backbone plus the Markov and confidence heads.

``DSparkDraftModel`` is ``sglang.srt.models.dflash.DFlashDraftModel`` (fused-QKV ``RadixAttention``
layers, ``ENCODER_ONLY`` i.e. non-causal over the cached context and the block, ``fc`` +
``hidden_norm`` context projection, final ``norm``) with the heads of ``sglang_dspark.reference.heads``
attached. Its ``forward`` is DFLASH's: one pass over the gamma block slots ``[anchor, mask x (gamma-1)]``
(target embeddings in, final-normed hidden states out). ``draft_block`` turns those hidden states into
draft tokens: base logits through the TARGET's lm_head, then ``accept.sample_draft_block``.

The draft checkpoint is read through ``sglang_dspark.checkpoint`` (both DeepSpec and TorchSpec layouts):
the config from the HF config SGLang loaded from ``--speculative-draft-model-path`` (``parse_draft_config``),
the tensors through ``normalize_weights`` (canonical names, every tensor checked).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from sglang.srt.models.dflash import DFlashDraftModel

from sglang_dspark.accept import DraftBlock, sample_draft_block
from sglang_dspark.checkpoint import expected_shapes, normalize_weights, parse_draft_config
from sglang_dspark.config import DSparkConfig
from sglang_dspark.reference.heads import build_confidence_head, build_markov_head

logger = logging.getLogger("sglang_dspark")

# SGLang's fused parameters -> the checkpoint tensors they are loaded from.
_FUSED_PARAMS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def _dflash_config_view(hf_config, config: DSparkConfig):
    """A shallow copy of the draft's HF config carrying the fields ``DFlashDraftModel`` reads, taken from
    the normalised ``DSparkConfig`` (TorchSpec configs lack some, or give them another meaning)."""
    view = copy.copy(hf_config)
    view.target_layer_ids = list(config.target_layer_ids)
    # DFLASH validates the ids against this count; the real check against the target is done at launch
    # (sglang_dspark.args) and by the target's capture setup.
    view.num_target_layers = config.num_target_layers or max(config.target_layer_ids) + 1
    view.block_size = config.block_size
    view.head_dim = config.head_dim
    view.layer_types = ["full_attention"] * config.num_hidden_layers  # non-causal (ENCODER_ONLY) everywhere
    view.dflash_config = {}  # DFLASH reads dflash_config before the top-level keys: the view's keys win
    return view


class DSparkDraftModel(DFlashDraftModel):
    """DSpark drafter: DFLASH backbone + Markov head + confidence head (no embedding, no lm_head)."""

    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        # SGLang hands over the draft's HF config (read from --speculative-draft-model-path); the one loader
        # normalises it (DeepSpec or TorchSpec keys) into a DSparkConfig.
        source = getattr(config, "name_or_path", "") or "<draft config>"
        dspark_config, fmt = parse_draft_config(config.to_dict(), source)
        super().__init__(_dflash_config_view(config, dspark_config), quant_config=quant_config, prefix=prefix)
        self.checkpoint_dir = source
        self.dspark_config = dspark_config
        self.checkpoint_format = fmt
        self.markov_head = build_markov_head(dspark_config)
        self.confidence_head = build_confidence_head(dspark_config)
        self._check_parameters_match_checkpoint()

    def _canonical_parameter_names(self) -> set[str]:
        """Checkpoint (canonical) names of this module's parameters, fused ones expanded."""
        names = set()
        for name, _ in self.named_parameters():
            module_path, _, leaf = name.rpartition(".")
            parent, _, module = module_path.rpartition(".")
            prefix = f"{parent}." if parent else ""
            names.update(f"{prefix}{part}.{leaf}" for part in _FUSED_PARAMS.get(module, (module,)))
        return names

    def _check_parameters_match_checkpoint(self) -> None:
        own = self._canonical_parameter_names()
        expected = set(expected_shapes(self.dspark_config))
        if own != expected:
            raise ValueError(
                f"{self.checkpoint_dir}: DSparkDraftModel parameters do not match the checkpoint's tensors "
                f"(SGLang-only: {sorted(own - expected)}, checkpoint-only: {sorted(expected - own)}); the "
                "draft's HF config.json and its DSpark fields disagree"
            )

    @torch.no_grad()
    def draft_block(
        self,
        hidden_states: torch.Tensor,
        lm_head_weight: torch.Tensor,
        anchor: torch.Tensor,
        inv_temperature: torch.Tensor,
        greedy: torch.Tensor,
        uniforms: torch.Tensor,
        all_greedy: bool = False,
    ) -> DraftBlock:
        """Draft tokens from the backbone output.

        hidden_states ``[bs * gamma, d]`` (this model's ``forward`` output), lm_head_weight ``[V, d]`` (the
        target's, vocab rows only), anchor int64 ``[bs]``, ``1/T`` ``[bs]``, greedy bool ``[bs]``, uniforms
        ``[bs, gamma]`` -> ``DraftBlock`` (tokens ``[bs, gamma]``, q ``[bs, gamma, V]`` unless ``all_greedy``,
        confidence logits).
        """
        bs, gamma = uniforms.shape
        hidden = hidden_states.view(bs, gamma, -1)
        base_logits = F.linear(hidden, lm_head_weight)  # model dtype; the sampler takes one position at a time to fp32
        return sample_draft_block(
            base_logits, hidden, anchor, self.markov_head, self.confidence_head, inv_temperature, greedy, uniforms,
            all_greedy,
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Checkpoint tensors (either layout) -> canonical names (checked) -> DFLASH's fused loader."""
        loaded = normalize_weights(dict(weights), self.dspark_config, self.checkpoint_format, self.checkpoint_dir)
        copies = [n for n, t in (("embed_tokens", loaded.embed_tokens), ("lm_head", loaded.lm_head)) if t is not None]
        if copies:
            logger.info(
                "%s: the draft carries its own %s; DSPARK uses the target's tables instead",
                self.checkpoint_dir, " and ".join(copies),
            )
        super().load_weights(loaded.drafter.items())


EntryClass = [DSparkDraftModel]

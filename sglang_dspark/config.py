"""The normalised DSpark draft configuration shared by the reference, the loader and the SGLang model.

Both checkpoint formats (DeepSpec, TorchSpec; see ``sglang_dspark.checkpoint``) are read into one
``DSparkConfig``. Everything downstream uses only this dataclass and the canonical (DeepSpec) tensor
names listed in ``checkpoint.py``; no other module looks at a raw config.json.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")


@dataclass(frozen=True)
class DSparkConfig:
    """A Qwen3 DSpark drafter.

    Shapes use d = hidden_size, r = markov_rank, V = vocab_size, S = len(target_layer_ids).
    """

    hidden_size: int  # d, equal to the target's hidden size
    intermediate_size: int
    num_hidden_layers: int  # draft backbone layers
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # V, equal to the target's vocab size
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    block_size: int  # gamma: draft tokens per block = block slots
    mask_token_id: int
    target_layer_ids: tuple[int, ...]  # 0-indexed target decoder layers whose outputs are captured
    num_target_layers: int | None  # target layer count when the checkpoint states it (DeepSpec)
    markov_rank: int  # r; 0 means no Markov head (DFlash ablation)
    markov_head_type: str  # one of MARKOV_HEAD_TYPES
    enable_confidence_head: bool
    confidence_head_with_markov: bool
    hidden_act: str = "silu"
    attention_bias: bool = False

    @property
    def num_context_features(self) -> int:
        """Width of the concatenated captured target hidden states: S * d."""
        return len(self.target_layer_ids) * self.hidden_size

    @property
    def confidence_in_features(self) -> int:
        """Input width of ``confidence_head.proj``: d + r with Markov features, else d."""
        with_markov = self.confidence_head_with_markov and self.markov_rank > 0
        return self.hidden_size + (self.markov_rank if with_markov else 0)

    @property
    def kv_bytes_per_token(self) -> int:
        """Draft context K/V bytes per cached token in bf16 (all draft layers, K and V)."""
        return self.num_hidden_layers * 2 * self.num_key_value_heads * self.head_dim * 2

    def replace(self, **changes) -> "DSparkConfig":
        return dataclasses.replace(self, **changes)

"""A tiny ``DSparkConfig`` shared by the loader and converter tests (imported as a plain module: pytest puts
this directory on ``sys.path``)."""

from __future__ import annotations

from sglang_dspark.config import DSparkConfig

TARGET_LAYERS = 6


def tiny_config(**changes) -> DSparkConfig:
    """d=32, 2 draft layers, 4/2 heads of 8, V=64, r=8, S=3 captured layers of a 6-layer target."""
    config = DSparkConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=64, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=256, block_size=4, mask_token_id=60, target_layer_ids=(1, 2, 4),
        num_target_layers=TARGET_LAYERS, markov_rank=8, markov_head_type="vanilla",
        enable_confidence_head=True, confidence_head_with_markov=True,
    )
    return config.replace(**changes)

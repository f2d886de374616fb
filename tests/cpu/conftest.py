"""Shared tiny-model fixtures for the CPU tests: random HF Qwen3 targets and matching DSpark drafters."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from sglang_dspark.config import DSparkConfig
from sglang_dspark.reference.drafter import DSparkDrafter

# The models here are tiny: one thread is fastest, and with two threads on a busy 2-core runner the
# threads spin-wait on each other (measured 25x slower).
torch.set_num_threads(1)


def build_tiny_target(
    vocab_size: int = 96,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    tie_word_embeddings: bool = True,
    initializer_range: float = 0.2,
    seed: int = 0,
):
    """A random fp32 ``Qwen3ForCausalLM`` in eval mode. A large ``initializer_range`` gives peaked,
    well-separated logits (no near-ties for greedy comparisons, non-trivial sampling distributions)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        initializer_range=initializer_range,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).float().eval()


def tiny_drafter_config(target, **overrides) -> DSparkConfig:
    """A small ``DSparkConfig`` matching ``target`` (hidden size, vocab, rope theta); ``overrides`` win."""
    tcfg = target.config
    fields = dict(
        hidden_size=tcfg.hidden_size,
        intermediate_size=2 * tcfg.hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=tcfg.vocab_size,
        rms_norm_eps=1e-6,
        rope_theta=float(tcfg.rope_parameters["rope_theta"]),
        max_position_embeddings=tcfg.max_position_embeddings,
        block_size=7,
        mask_token_id=tcfg.vocab_size - 1,
        target_layer_ids=(0, tcfg.num_hidden_layers - 2),
        num_target_layers=tcfg.num_hidden_layers,
        markov_rank=16,
        markov_head_type="vanilla",
        enable_confidence_head=True,
        confidence_head_with_markov=True,
    )
    fields.update(overrides)
    return DSparkConfig(**fields)


def build_tiny_drafter(target, seed: int = 1, init_std: float = 0.1, **overrides) -> DSparkDrafter:
    """A random fp32 drafter for ``target`` (see ``tiny_drafter_config`` for the overridable fields)."""
    generator = torch.Generator().manual_seed(seed)
    return DSparkDrafter(tiny_drafter_config(target, **overrides), init_std=init_std, generator=generator).eval()


@pytest.fixture(scope="session")
def tiny_target() -> Callable[..., object]:
    """Factory: ``tiny_target(**kwargs)`` -> random HF Qwen3 target (see ``build_tiny_target``)."""
    return build_tiny_target


@pytest.fixture(scope="session")
def tiny_drafter() -> Callable[..., DSparkDrafter]:
    """Factory: ``tiny_drafter(target, **overrides)`` -> random DSpark drafter matching ``target``."""
    return build_tiny_drafter

"""Greedy speculative decoding with the reference drafter reproduces the target token for token, and the
drafter's building blocks match Hugging Face Qwen3 math."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RotaryEmbedding, apply_rotary_pos_emb

from sglang_dspark.reference.decode import speculative_generate, target_generate
from sglang_dspark.reference.drafter import rope_cos_sin
from sglang_dspark.reference.sampling import SamplingParams

NEW_TOKENS = 200
PROMPTS = [[3, 17, 42, 5, 9], [60, 2, 2, 71, 33, 8, 90, 14, 27, 51, 6]]

TARGETS = {
    "gqa-hd64-tied": dict(num_heads=4, num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
    "mha-hd128-untied": dict(num_heads=4, num_kv_heads=4, head_dim=128, tie_word_embeddings=False),
    "gqa-hd128-tied": dict(num_heads=8, num_kv_heads=2, head_dim=128, tie_word_embeddings=True, seed=3),
    "mqa-hd64-untied-5layers": dict(num_heads=4, num_kv_heads=1, head_dim=64, tie_word_embeddings=False,
                                    num_layers=5, seed=4),
}
DRAFTERS = {
    "vanilla+conf-markov": dict(markov_head_type="vanilla"),
    "gated+conf-plain": dict(markov_head_type="gated", confidence_head_with_markov=False),
    "rnn+conf-markov": dict(markov_head_type="rnn", head_dim=64, num_key_value_heads=1),
    "dflash-rank0": dict(markov_rank=0),
    "vanilla-no-conf": dict(markov_head_type="vanilla", enable_confidence_head=False, num_key_value_heads=4),
}
# Every drafter with every gamma; targets rotate so each target meets several drafters and gammas.
CASES = [
    (drafter, gamma, list(TARGETS)[i % len(TARGETS)])
    for i, (drafter, gamma) in enumerate((d, g) for d in DRAFTERS for g in (1, 3, 7))
]


@pytest.fixture(scope="module")
def targets(tiny_target):
    return {name: tiny_target(**kwargs) for name, kwargs in TARGETS.items()}


@pytest.fixture(scope="module")
def greedy_reference(targets):
    """The targets' own greedy continuations, computed once per (target, prompt)."""
    cache: dict[tuple[str, int], list[int]] = {}

    def get(target_name: str, prompt_idx: int) -> list[int]:
        key = (target_name, prompt_idx)
        if key not in cache:
            cache[key] = target_generate(targets[target_name], PROMPTS[prompt_idx], NEW_TOKENS)
        return cache[key]

    return get


@pytest.mark.parametrize("drafter_name, gamma, target_name", CASES, ids=[f"{d}-g{g}-{t}" for d, g, t in CASES])
def test_greedy_speculative_equals_target(targets, greedy_reference, tiny_drafter, drafter_name, gamma, target_name):
    target = targets[target_name]
    drafter = tiny_drafter(target, **DRAFTERS[drafter_name])
    for idx, prompt in enumerate(PROMPTS):
        want = greedy_reference(target_name, idx)
        got = speculative_generate(target, drafter, prompt, NEW_TOKENS, gamma=gamma)
        mismatch = next((i for i, (a, b) in enumerate(zip(got.tokens, want)) if a != b), None)
        assert got.tokens == want, f"prompt {idx}: first mismatch at {mismatch}"
        steps = len(got.committed_per_step)
        assert got.proposed_per_position == [steps] * gamma
        assert sum(got.accepted_per_position) == sum(got.committed_per_step) - steps
        assert sum(got.committed_per_step) >= NEW_TOKENS - 1  # the prefill's bonus is the first token
        has_conf = drafter.confidence_head is not None
        assert len(got.confidence_logits) == (steps if has_conf else 0)
        assert all(c.shape == (gamma,) for c in got.confidence_logits)


def _rig_bigram(drafter, sequence: list[int], strength: float = 30.0) -> None:
    """Make a vanilla head of rank V a bigram table: each token's most frequent successor in ``sequence``
    gets ``+strength`` (B(prev) = W2 W1[prev] = W2[:, prev])."""
    successors = Counter(zip(sequence[:-1], sequence[1:]))
    head = drafter.markov_head
    with torch.no_grad():
        head.markov_w1.weight.copy_(torch.eye(drafter.config.vocab_size))
        head.markov_w2.weight.zero_()
        for (prev, nxt), _ in sorted(successors.items(), key=lambda item: item[1]):  # most frequent last wins
            head.markov_w2.weight[:, prev] = 0.0
            head.markov_w2.weight[nxt, prev] = strength


@pytest.mark.parametrize("gamma", [3, 7])
def test_multi_token_acceptance_is_lossless(targets, greedy_reference, tiny_drafter, gamma):
    """A drafter whose Markov head knows the target's transitions accepts many tokens per step; output is
    still exactly the target's."""
    name = "gqa-hd64-tied"
    target = targets[name]
    for idx, prompt in enumerate(PROMPTS):
        want = greedy_reference(name, idx)
        drafter = tiny_drafter(target, markov_rank=target.config.vocab_size)
        _rig_bigram(drafter, prompt[-1:] + want)
        got = speculative_generate(target, drafter, prompt, NEW_TOKENS, gamma=gamma)
        assert got.tokens == want
        assert got.mean_committed > 1.5, got.committed_per_step
        assert got.accepted_per_position[gamma - 1] > 0  # whole blocks accepted, bonus from p_gamma


def test_eos_stops_generation(targets, greedy_reference, tiny_drafter):
    name = "gqa-hd64-tied"
    want = greedy_reference(name, 0)
    eos = want[40]
    cut = want[: want.index(eos) + 1]
    drafter = tiny_drafter(targets[name], markov_rank=targets[name].config.vocab_size)
    _rig_bigram(drafter, PROMPTS[0][-1:] + want)
    assert speculative_generate(targets[name], drafter, PROMPTS[0], NEW_TOKENS, gamma=7, eos_token_id=eos).tokens == cut
    assert target_generate(targets[name], PROMPTS[0], NEW_TOKENS, eos_token_id=eos) == cut


def test_sampled_generation_runs_and_is_seeded(targets, tiny_drafter):
    target = targets["mha-hd128-untied"]
    drafter = tiny_drafter(target, markov_head_type="rnn")
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9)
    runs = [
        speculative_generate(target, drafter, PROMPTS[1], 60, gamma=4, sampling=params,
                             generator=torch.Generator().manual_seed(5))
        for _ in range(2)
    ]
    assert runs[0].tokens == runs[1].tokens and len(runs[0].tokens) == 60
    assert all(0 <= t < target.config.vocab_size for t in runs[0].tokens)


def test_gamma_above_block_size_is_rejected(targets, tiny_drafter):
    target = targets["gqa-hd64-tied"]
    with pytest.raises(ValueError, match=r"gamma must be in \[1, block_size=7\], found 8"):
        speculative_generate(target, tiny_drafter(target), PROMPTS[0], 10, gamma=8)


def test_final_target_layer_is_rejected(targets, tiny_drafter):
    target = targets["gqa-hd64-tied"]
    drafter = tiny_drafter(target, target_layer_ids=(0, target.config.num_hidden_layers - 1))
    with pytest.raises(ValueError, match="target_layer_ids"):
        speculative_generate(target, drafter, PROMPTS[0], 10, gamma=3)


# ---- building blocks ------------------------------------------------------------------------------------


def test_rope_matches_hf(targets):
    config = targets["mha-hd128-untied"].config
    positions = torch.arange(3, 40)
    cos_hf, sin_hf = Qwen3RotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions[None])
    cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_parameters["rope_theta"])
    torch.testing.assert_close(cos, cos_hf[0])
    torch.testing.assert_close(sin, sin_hf[0])


def test_layer_without_context_equals_hf_noncausal_qwen3_layer(targets, tiny_drafter):
    target = targets["gqa-hd64-tied"]
    drafter = tiny_drafter(target, num_hidden_layers=1, init_std=0.3)
    cfg = drafter.config
    hf_config = type(target.config)(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, vocab_size=cfg.vocab_size, num_hidden_layers=1,
    )
    hf_config._attn_implementation = "eager"
    hf_layer = Qwen3DecoderLayer(hf_config, layer_idx=0).eval()
    hf_layer.load_state_dict(drafter.layers[0].state_dict(), strict=True)
    hf_layer.self_attn.is_causal = False
    x = torch.randn(2, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(5)
    with torch.no_grad():
        want = hf_layer(x, attention_mask=None, position_embeddings=Qwen3RotaryEmbedding(hf_config)(x, positions[None]))
        got = drafter.backbone(x, drafter.new_context_cache(2))
    torch.testing.assert_close(got, drafter.norm(want), rtol=1e-4, atol=1e-5)


def test_block_attends_to_context_and_whole_block(targets, tiny_drafter):
    """Block slots at positions P..P+g-1 attend (non-causally, GQA) to context K/V of positions < P built from
    c = hidden_norm(fc(T)) through k_proj -> k_norm -> RoPE, and to every block slot."""
    target = targets["gqa-hd64-tied"]
    drafter = tiny_drafter(target, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, init_std=0.3)
    cfg, layer = drafter.config, drafter.layers[0]
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(2, 6, cfg.num_context_features, generator=gen)
    x = torch.randn(2, 4, cfg.hidden_size, generator=gen)
    rope = Qwen3RotaryEmbedding(target.config.__class__(head_dim=cfg.head_dim, rope_theta=cfg.rope_theta))
    cache = drafter.new_context_cache(2)
    drafter.extend_context(cache, features[:, :2], 0)  # context built incrementally: 2 rows, then 4
    drafter.extend_context(cache, features[:, 2:], 2)
    with torch.no_grad():
        got = layer(x, *rope_cos_sin(torch.arange(6, 10), cfg.head_dim, cfg.rope_theta), cache.keys[0], cache.values[0])
        attn, hd = layer.self_attn, cfg.head_dim
        c = drafter.hidden_norm(features @ drafter.fc.weight.T)
        xn = layer.input_layernorm(x)
        heads = lambda t, n: t.view(2, t.shape[1], n, hd).transpose(1, 2)  # noqa: E731
        q = attn.q_norm(heads(attn.q_proj(xn), 4).transpose(1, 2)).transpose(1, 2)
        kb = attn.k_norm(heads(attn.k_proj(xn), 2).transpose(1, 2)).transpose(1, 2)
        kc = attn.k_norm(heads(attn.k_proj(c), 2).transpose(1, 2)).transpose(1, 2)
        cos_c, sin_c = rope(x, torch.arange(0, 6)[None])
        cos_b, sin_b = rope(x, torch.arange(6, 10)[None])
        q, kb = apply_rotary_pos_emb(q, kb, cos_b, sin_b)
        kc, _ = apply_rotary_pos_emb(kc, kc, cos_c, sin_c)
        k = torch.cat([kc, kb], dim=2)
        v = torch.cat([heads(attn.v_proj(c), 2), heads(attn.v_proj(xn), 2)], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=True)
        h = x + attn.o_proj(out.transpose(1, 2).reshape(2, 4, -1))
        want = h + layer.mlp(layer.post_attention_layernorm(h))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert cache.length == 6

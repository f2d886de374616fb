"""Markov and confidence heads against hand computations (spec A.7, A.8), and the drafter's tensor names."""

from __future__ import annotations

import pytest
import torch

from sglang_dspark.reference.heads import (
    ConfidenceHead,
    GatedMarkovHead,
    RNNMarkovHead,
    VanillaMarkovHead,
    build_confidence_head,
    build_markov_head,
)
from sglang_dspark.reference.sampling import SamplingBatch, SamplingParams

V, R, D, BS = 11, 5, 8, 3


def _randomise(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


def test_vanilla_head_is_low_rank_bigram():
    head = VanillaMarkovHead(V, R)
    _randomise(head, 0)
    prev = torch.tensor([0, 7, 10])
    bias, state = head.step(prev, torch.randn(BS, D), None)
    w1, w2 = head.markov_w1.weight, head.markov_w2.weight  # [V, r] each
    expected = torch.stack([w2 @ w1[t] for t in prev.tolist()])
    torch.testing.assert_close(bias, expected)
    assert state is None
    # B = W1 W2^T as a full bigram table: row prev, column next.
    torch.testing.assert_close(bias, (w1 @ w2.T)[prev])


def test_gated_head_formula():
    head = GatedMarkovHead(V, R, D)
    _randomise(head, 1)
    prev, hidden = torch.tensor([2, 2, 9]), torch.randn(BS, D, generator=torch.Generator().manual_seed(5))
    bias, state = head.step(prev, hidden, None)
    wg, bg = head.gate_proj.weight, head.gate_proj.bias  # [r, d + r], [r]
    for b in range(BS):
        e = head.markov_w1.weight[prev[b]]
        gate = 1.0 / (1.0 + torch.exp(-(wg[:, :D] @ hidden[b] + wg[:, D:] @ e + bg)))  # hidden first
        torch.testing.assert_close(bias[b], head.markov_w2.weight @ (gate * e))
    assert state is None
    # Same previous token, different hidden -> different bias (the gate reads h_k).
    assert not torch.allclose(bias[0], bias[1])


def _rnn_by_hand(head: RNNMarkovHead, prevs: list[torch.Tensor], hiddens: list[torch.Tensor]):
    wj, bj = head.joint_proj.weight, head.joint_proj.bias  # [3r, 2r + d], [3r]
    s = torch.zeros(prevs[0].shape[0], R)
    biases, states = [], []
    for prev, h in zip(prevs, hiddens):
        e = head.markov_w1.weight[prev]
        a = s @ wj[:, :R].T + e @ wj[:, R : 2 * R].T + h @ wj[:, 2 * R :].T + bj  # z = [s ; e ; h]
        a_g, a_c, a_o = a[:, :R], a[:, R : 2 * R], a[:, 2 * R :]
        g = torch.sigmoid(a_g)
        biases.append(torch.tanh(a_o) @ head.markov_w2.weight.T)  # output branch from s_{k-1}
        s = g * s + (1 - g) * torch.tanh(a_c)
        states.append(s)
    return biases, states


def test_rnn_head_carries_state_across_the_block():
    head = RNNMarkovHead(V, R, D)
    _randomise(head, 2)
    gen = torch.Generator().manual_seed(3)
    prevs = [torch.randint(0, V, (BS,), generator=gen) for _ in range(4)]
    hiddens = [torch.randn(BS, D, generator=gen) for _ in range(4)]
    want_bias, want_state = _rnn_by_hand(head, prevs, hiddens)
    state = head.initial_state(BS, hiddens[0])
    assert torch.equal(state, torch.zeros(BS, R))
    for k in range(4):
        bias, state = head.step(prevs[k], hiddens[k], state)
        torch.testing.assert_close(bias, want_bias[k])
        torch.testing.assert_close(state, want_state[k])
    # The state matters: position 3 from a zero state gives a different bias than the carried one.
    zero_bias, _ = head.step(prevs[3], hiddens[3], head.initial_state(BS, hiddens[3]))
    assert not torch.allclose(zero_bias, want_bias[3])


@pytest.mark.parametrize(
    "rank, with_markov, extra",
    [(R, True, R), (R, False, 0), (0, True, 0), (0, False, 0)],
)
def test_confidence_head_input_width(tiny_target, tiny_drafter, rank, with_markov, extra):
    """d + r with Markov features, d without (and d when there is no Markov head at all)."""
    target = tiny_target(hidden_size=32, vocab_size=V + 5)
    drafter = tiny_drafter(target, markov_rank=rank, confidence_head_with_markov=with_markov)
    assert drafter.confidence_head.proj.in_features == 32 + extra
    assert tuple(drafter.confidence_head.proj.bias.shape) == (1,)


def test_confidence_head_formula_and_width_check():
    head = ConfidenceHead(D + R)
    _randomise(head, 4)
    h, e = torch.randn(BS, D), torch.randn(BS, R)
    torch.testing.assert_close(head(h, e), torch.cat([h, e], -1) @ head.proj.weight[0] + head.proj.bias[0])
    with pytest.raises(ValueError, match="expects 13 input features, found 8"):
        head(h, None)


def test_factories(tiny_target, tiny_drafter):
    target = tiny_target(hidden_size=32, vocab_size=V + 5)
    for kind, cls in (("vanilla", VanillaMarkovHead), ("gated", GatedMarkovHead), ("rnn", RNNMarkovHead)):
        assert type(build_markov_head(tiny_drafter(target, markov_head_type=kind).config)) is cls
    assert build_markov_head(tiny_drafter(target, markov_rank=0).config) is None
    assert build_confidence_head(tiny_drafter(target, enable_confidence_head=False).config) is None
    with pytest.raises(ValueError, match="markov_head_type"):
        build_markov_head(tiny_drafter(target).config.replace(markov_head_type="lstm"))


def _canonical_shapes(cfg) -> dict[str, tuple[int, ...]]:
    d, r, v, hd = cfg.hidden_size, cfg.markov_rank, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    names = {"fc.weight": (d, len(cfg.target_layer_ids) * d), "hidden_norm.weight": (d,), "norm.weight": (d,)}
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        names.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
            p + "mlp.gate_proj.weight": (cfg.intermediate_size, d),
            p + "mlp.up_proj.weight": (cfg.intermediate_size, d),
            p + "mlp.down_proj.weight": (d, cfg.intermediate_size),
        })
        if cfg.attention_bias:
            names.update({p + f"self_attn.{x}_proj.bias": (n,) for x, n in (("q", q), ("k", kv), ("v", kv), ("o", d))})
    if r > 0:
        names.update({"markov_head.markov_w1.weight": (v, r), "markov_head.markov_w2.weight": (v, r)})
        if cfg.markov_head_type == "gated":
            names.update({"markov_head.gate_proj.weight": (r, d + r), "markov_head.gate_proj.bias": (r,)})
        if cfg.markov_head_type == "rnn":
            names.update({"markov_head.joint_proj.weight": (3 * r, 2 * r + d), "markov_head.joint_proj.bias": (3 * r,)})
    if cfg.enable_confidence_head:
        width = d + (r if cfg.confidence_head_with_markov and r > 0 else 0)
        names.update({"confidence_head.proj.weight": (1, width), "confidence_head.proj.bias": (1,)})
    return names


@pytest.mark.parametrize(
    "overrides",
    [
        dict(markov_head_type="vanilla"),
        dict(markov_head_type="gated", confidence_head_with_markov=False),
        dict(markov_head_type="rnn"),
        dict(markov_rank=0),
        dict(enable_confidence_head=False),
        dict(attention_bias=True),
    ],
)
def test_drafter_state_dict_uses_canonical_names(tiny_target, tiny_drafter, overrides):
    target = tiny_target(hidden_size=32, vocab_size=40)
    drafter = tiny_drafter(target, **overrides)
    got = {k: tuple(v.shape) for k, v in drafter.state_dict().items()}
    assert got == _canonical_shapes(drafter.config)
    other = tiny_drafter(target, seed=99, **overrides)
    other.load_state_dict(drafter.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), drafter.state_dict().values()))


@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn"])
def test_propose_unrolls_heads_in_order(tiny_target, tiny_drafter, kind):
    """``propose`` = one backbone pass, then Z_k = U_k + B_k with x_{k-1} fed back (greedy), state reset per block,
    confidence from [h_k ; W1[x_{k-1}]]."""
    target = tiny_target(hidden_size=32, vocab_size=40, num_layers=3)
    drafter = tiny_drafter(target, markov_head_type=kind, init_std=0.5)
    embed, lm_head = target.get_input_embeddings().weight, target.get_output_embeddings().weight
    cache = drafter.new_context_cache(2)
    drafter.extend_context(cache, torch.randn(2, 5, drafter.config.num_context_features), 0)
    anchor, gamma = torch.tensor([3, 17]), 5
    greedy = SamplingBatch.repeat(SamplingParams(temperature=0.0), 2)
    proposal = drafter.propose(anchor, cache, embed, lm_head, gamma, greedy)

    with torch.no_grad():
        ids = torch.full((2, gamma), drafter.config.mask_token_id)
        ids[:, 0] = anchor
        hidden = drafter.backbone(embed[ids], cache)
        base = hidden @ lm_head.T
        head, conf = drafter.markov_head, drafter.confidence_head
        prev, state = anchor, torch.zeros(2, drafter.config.markov_rank)
        for k in range(gamma):
            if kind == "rnn":
                bias, state = head.step(prev, hidden[:, k], state)
            else:
                bias, _ = head.step(prev, hidden[:, k], None)
            z = base[:, k] + bias
            want_conf = conf(hidden[:, k], head.markov_w1.weight[prev])
            torch.testing.assert_close(proposal.confidence_logits[:, k], want_conf)
            prev = z.argmax(-1)
            assert torch.equal(proposal.tokens[:, k], prev)
            assert torch.equal(proposal.probs[:, k], torch.nn.functional.one_hot(prev, 40).float())
    # Not trivially constant: the block's drafts vary.
    assert proposal.tokens.unique().numel() > 1

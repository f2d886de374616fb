"""``sglang_dspark.accept`` (the SGLang path's sync-free sampling and acceptance) against the reference
(``sglang_dspark.reference``) and against exact distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from sglang_dspark import accept
from sglang_dspark.accept import (
    SimulatedAcceptance,
    TargetSampling,
    accept_drafts,
    commit_layout,
    draft_step,
    greedy_accept,
    inverse_cdf_sample,
    rejection_accept,
    sample_draft_block,
    target_probs,
    target_token_at,
)
from sglang_dspark.reference import accept as ref_accept
from sglang_dspark.reference import sampling as ref_sampling

TOP_K_ALL = 1 << 30  # SGLang's "no top-k"
P_MIN = 1e-3


def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square p-value of ``counts`` against ``probs``; zero-probability cells must be empty."""
    counts, probs = counts.astype(np.float64), probs.astype(np.float64)
    impossible = probs <= 1e-9
    assert counts[impossible].sum() == 0, "a token outside the support was drawn"
    counts, expected = counts[~impossible], probs[~impossible] / probs[~impossible].sum() * counts.sum()
    return float(chisquare(counts, expected).pvalue)


def _sampling(temperature, top_k, top_p) -> TargetSampling:
    top_k = torch.tensor(top_k)
    effective = torch.where(top_k <= 0, TOP_K_ALL, top_k)
    return TargetSampling(
        temperature=torch.tensor(temperature, dtype=torch.float32),
        top_k=top_k,
        top_p=torch.tensor(top_p, dtype=torch.float32),
        max_top_k=int(effective.max()),
        apply_top_k=bool((effective < TOP_K_ALL).any()),
        apply_top_p=bool((torch.tensor(top_p) < 1.0).any()),
    )


# ---- sampling primitives ---------------------------------------------------------------------------------


def test_inverse_cdf_sample_boundaries_and_zero_weights():
    weights = torch.tensor([[0.0, 2.0, 0.0, 2.0, 0.0]] * 4)  # unnormalised, zeros around the support
    u = torch.tensor([0.0, 0.4999, 0.5, 0.9999999])
    assert inverse_cdf_sample(weights, u).tolist() == [1, 1, 3, 3]
    many = inverse_cdf_sample(weights[:1].expand(1000, -1), torch.rand(1000, generator=torch.Generator().manual_seed(0)))
    assert set(many.tolist()) == {1, 3}


def test_draft_step_greedy_rows_argmax_sampled_rows_follow_q():
    n, vocab = 40_000, 7
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, vocab, generator=gen).expand(n, vocab)
    greedy = torch.arange(n) % 4 == 0
    inv_t = torch.full((n,), 1 / 0.8)
    tokens, probs = draft_step(logits, inv_t, greedy, torch.rand(n, generator=gen))
    q = torch.softmax(logits[0] / 0.8, -1)
    torch.testing.assert_close(probs, q.expand(n, vocab))  # the full softmax, also for greedy rows
    assert bool((tokens[greedy] == logits[0].argmax()).all())
    assert _chi2_pvalue(np.bincount(tokens[~greedy].numpy(), minlength=vocab), q.numpy()) > P_MIN


# ---- the block sampler vs the reference drafter ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn"])
@pytest.mark.parametrize("with_markov_features", [True, False])
def test_sample_draft_block_matches_reference_propose(tiny_target, tiny_drafter, kind, with_markov_features):
    target = tiny_target(vocab_size=64, hidden_size=32, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=32)
    drafter = tiny_drafter(target, markov_head_type=kind, markov_rank=8, init_std=0.3,
                           confidence_head_with_markov=with_markov_features)
    bs, gamma, gen = 5, 4, torch.Generator().manual_seed(3)
    cache = drafter.new_context_cache(bs)
    drafter.extend_context(cache, torch.randn(bs, 6, drafter.config.num_context_features, generator=gen), 0)
    anchor = torch.randint(0, 64, (bs,), generator=gen)
    embed, lm_head = target.model.embed_tokens.weight, target.lm_head.weight

    # The reference proposes from its own backbone; feed the same hidden states to the SGLang-path sampler.
    block_ids = torch.full((bs, gamma), drafter.config.mask_token_id)
    block_ids[:, 0] = anchor
    hidden = drafter.backbone(torch.nn.functional.embedding(block_ids, embed), cache)
    base = drafter.base_logits(hidden, lm_head)
    greedy_sb = ref_sampling.SamplingBatch.repeat(ref_sampling.SamplingParams(temperature=0.0), bs)
    ref = drafter.propose(anchor, cache, embed, lm_head, gamma, greedy_sb)
    ones = torch.ones(bs)
    mine = sample_draft_block(base, hidden, anchor, drafter.markov_head, drafter.confidence_head, ones,
                              torch.ones(bs, dtype=torch.bool), torch.rand(bs, gamma, generator=gen))
    assert torch.equal(mine.tokens, ref.tokens)
    torch.testing.assert_close(mine.confidence_logits, ref.confidence_logits)
    assert len(set(mine.tokens.flatten().tolist())) > 1  # a degenerate (constant) draft would prove little
    # The all-greedy mode (no draft distribution built) drafts the same tokens and confidences.
    fast = sample_draft_block(base, hidden, anchor, drafter.markov_head, drafter.confidence_head, None, None, None,
                              all_greedy=True)
    assert fast.probs is None and torch.equal(fast.tokens, ref.tokens)
    torch.testing.assert_close(fast.confidence_logits, ref.confidence_logits)

    # Sampled rows: q_1 depends only on the anchor, so it must match the reference's exactly.
    t = 0.7
    hot_sb = ref_sampling.SamplingBatch.repeat(ref_sampling.SamplingParams(temperature=t), bs)
    ref_hot = drafter.propose(anchor, cache, embed, lm_head, gamma, hot_sb, torch.Generator().manual_seed(0))
    mine_hot = sample_draft_block(base, hidden, anchor, drafter.markov_head, drafter.confidence_head,
                                  torch.full((bs,), 1 / t), torch.zeros(bs, dtype=torch.bool),
                                  torch.rand(bs, gamma, generator=gen))
    torch.testing.assert_close(mine_hot.probs[:, 0], ref_hot.probs[:, 0])
    # Later positions: q_k is the softmax of the logits corrected with the token actually drawn before.
    for k in range(1, gamma):
        assert bool((mine_hot.probs[:, k].gather(-1, mine_hot.tokens[:, k : k + 1]) > 0).all())


# ---- target distributions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [
        ([0.7, 1.0, 1.3, 0.5], [0, 0, 0, 0], [1.0, 0.9, 0.5, 0.8]),  # top-p only (full sort)
        ([0.7, 1.0, 1.3, 0.5], [3, 5, 1, 4], [1.0, 1.0, 1.0, 1.0]),  # top-k only, bounded by max_top_k
        ([0.7, 1.0, 1.3, 0.5], [3, 0, 8, 2], [0.6, 0.9, 1.0, 0.3]),  # both; one row without top-k
        ([0.9, 1.1, 1.0, 1.0], [0, 0, 0, 0], [1.0, 1.0, 1.0, 1.0]),  # plain softmax
    ],
)
def test_target_probs_matches_reference(temperature, top_k, top_p):
    logits = torch.randn(4, 3, 20, generator=torch.Generator().manual_seed(5)) * 2
    ref = ref_sampling.target_probs(
        logits,
        ref_sampling.SamplingBatch(torch.tensor(temperature), torch.tensor(top_k), torch.tensor(top_p)),
    )
    mine = target_probs(logits.reshape(12, 20), _sampling(temperature, top_k, top_p).repeat(3)).view(4, 3, 20)
    torch.testing.assert_close(mine, ref)
    sglang_style = [k if k > 0 else TOP_K_ALL for k in top_k]  # SGLang's "disabled" is 1 << 30, not 0
    mine = target_probs(logits.reshape(12, 20), _sampling(temperature, sglang_style, top_p).repeat(3)).view(4, 3, 20)
    torch.testing.assert_close(mine, ref)


def test_target_probs_min_p_follows_sglang_order():
    """min-p after top-k/top-p: keep p >= min_p * max p of what is left, renormalise (SGLang's sampler)."""
    logits = torch.randn(6, 30, generator=torch.Generator().manual_seed(7)) * 2
    min_p = torch.tensor([0.0, 0.05, 0.2, 0.5, 0.9, 1.0])
    base = _sampling([0.8] * 6, [10] * 6, [0.9] * 6)
    got = target_probs(logits, TargetSampling(**{**base.__dict__, "min_p": min_p, "apply_min_p": True}))
    before = target_probs(logits, base)
    want = before * (before >= before.max(dim=-1, keepdim=True).values * min_p[:, None])
    want = want / want.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(got, want)
    assert torch.equal(got[0], before[0]) and int((got[-1] > 0).sum()) == 1  # min_p 0: no-op; 1: the top token
    assert bool(((got > 0).sum(-1) <= (before > 0).sum(-1)).all())


# ---- acceptance ------------------------------------------------------------------------------------------


def _drafts_with_prefix_matches(top1: torch.Tensor, matches: list[int], vocab: int) -> torch.Tensor:
    """Drafts equal to the target argmax for the first ``matches[b]`` positions, different afterwards."""
    drafts = (top1[:, :-1] + 1) % vocab
    for b, m in enumerate(matches):
        drafts[b, :m] = top1[b, :m]
    return drafts


def test_greedy_accept_matches_reference():
    bs, gamma, vocab = 5, 4, 30
    logits = torch.randn(bs, gamma + 1, vocab, generator=torch.Generator().manual_seed(6))
    top1 = logits.argmax(-1)
    drafts = _drafts_with_prefix_matches(top1, [0, 1, 2, 4, 3], vocab)
    accepted, bonus = greedy_accept(drafts, logits)
    assert accepted.tolist() == [0, 1, 2, 4, 3]
    assert bonus.tolist() == [int(top1[b, a]) for b, a in enumerate(accepted.tolist())]
    one_hot = torch.nn.functional.one_hot(top1, vocab).float()
    ref = ref_accept.accept_drafts(drafts, one_hot, torch.rand(bs, gamma, vocab), torch.ones(bs, dtype=torch.bool))
    assert torch.equal(accepted, ref.accepted) and torch.equal(bonus, ref.bonus)


def test_verified_caps_act_as_a_shorter_block_per_request():
    """Capped at ``v`` drafts, request ``b`` gets what a block of its first ``v`` drafts would get from the same
    uniforms: greedy and rejection sampling, ``v`` from 0 (bonus only) to gamma."""
    bs, gamma, vocab = 64, 5, 7
    gen = torch.Generator().manual_seed(21)
    logits = torch.randn(bs, gamma + 1, vocab, generator=gen)
    q = torch.softmax(torch.randn(bs, gamma, vocab, generator=gen), -1)
    greedy = torch.rand(bs, generator=gen) < 0.5
    top1 = logits.argmax(-1)
    drafts = torch.where(torch.rand(bs, gamma, generator=gen) < 0.8, top1[:, :gamma],
                         torch.randint(0, vocab, (bs, gamma), generator=gen))
    coins, bonus_u = torch.rand(bs, gamma, generator=gen), torch.rand(bs, generator=gen)
    verified = torch.arange(bs) % (gamma + 1)
    sampling = accept.TargetSampling(temperature=torch.full((bs,), 0.8), top_k=torch.zeros(bs, dtype=torch.int64),
                                     top_p=torch.ones(bs), max_top_k=0, apply_top_k=False, apply_top_p=False)
    got = accept_drafts(drafts, logits, q, greedy, sampling, coins, bonus_u, verified)
    for b in range(bs):
        v = int(verified[b])
        one = slice(b, b + 1)
        sub = accept.TargetSampling(temperature=sampling.temperature[one], top_k=sampling.top_k[one],
                                    top_p=sampling.top_p[one], max_top_k=0, apply_top_k=False, apply_top_p=False)
        if v:
            want = accept_drafts(drafts[one, :v], logits[one, :v + 1], q[one, :v], greedy[one], sub, coins[one, :v],
                                 bonus_u[one])
        else:  # nothing verified: no draft accepted, the bonus is the target's own token at the anchor
            zero = torch.zeros(1, dtype=torch.int64)
            want = zero, accept.target_token_at(logits[one, :1], zero, greedy[one], sub, bonus_u[one])
        assert (int(got[0][b]), int(got[1][b])) == (int(want[0]), int(want[1])), b
    assert set(got[0].tolist()) - {0}  # some drafts were accepted


def _random_pq(bs: int, gamma: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(bs, gamma + 1, vocab, generator=gen) * 1.5, -1)
    q = torch.softmax(torch.randn(bs, gamma, vocab, generator=gen) * 1.5, -1)
    return p, q


def test_rejection_accept_same_decisions_as_reference_for_the_same_coins():
    bs, gamma, vocab, seed = 400, 5, 6, 7
    p, q = _random_pq(bs, gamma, vocab, seed)
    drafts = torch.multinomial(q.reshape(-1, vocab), 1, generator=torch.Generator().manual_seed(8)).view(bs, gamma)
    # The reference draws its coins first: torch.rand((bs, gamma)) from its generator.
    coins = torch.rand((bs, gamma), generator=torch.Generator().manual_seed(9))
    ref = ref_accept.accept_drafts(drafts, p, q, torch.zeros(bs, dtype=torch.bool), torch.Generator().manual_seed(9))
    accepted, bonus = rejection_accept(drafts, p, q, coins, torch.rand(bs))
    assert torch.equal(accepted, ref.accepted)
    assert 0 < int((accepted == 0).sum()) < bs and int((accepted == gamma).sum()) >= 0
    # The bonus lies in the support of the residual (or of p_gamma after a full accept).
    rows = torch.arange(bs)
    q_pad = torch.cat([q, torch.zeros(bs, 1, vocab)], dim=1)
    residual = (p[rows, accepted] - q_pad[rows, accepted]).clamp_min(0)
    assert bool((residual.gather(-1, bonus[:, None]) > 0).all())


@pytest.mark.parametrize("gamma", [1, 3])
def test_rejection_accept_is_exact(gamma):
    """Context-free p_j, q_j: the emitted k-th token (given that it exists) must follow p_{k-1} exactly,
    and P(a >= 1) must be sum_x min(p_0, q_0). Any number of verified drafts: scheduled verification passes
    the first W - 1 drafts (gamma = 1: one draft, the probe step)."""
    n, vocab = 120_000, 5
    p, q = _random_pq(1, gamma, vocab, seed=10)
    gen = torch.Generator().manual_seed(11)
    drafts = torch.stack(
        [torch.multinomial(q[0, k], n, replacement=True, generator=gen) for k in range(gamma)], dim=1
    )
    accepted, bonus = rejection_accept(drafts, p.expand(n, -1, -1), q.expand(n, -1, -1),
                                       torch.rand(n, gamma, generator=gen), torch.rand(n, generator=gen))
    emitted = torch.cat([drafts, torch.zeros(n, 1, dtype=torch.int64)], dim=1)
    emitted.scatter_(1, accepted[:, None], bonus[:, None])
    for k in range(gamma + 1):
        rows = accepted >= k  # the (k+1)-th emitted token exists iff the first k drafts were accepted
        counts = np.bincount(emitted[rows, k].numpy(), minlength=vocab)
        assert _chi2_pvalue(counts, p[0, k].numpy()) > P_MIN, f"emitted token {k + 1}"
    want = torch.minimum(p[0, 0], q[0, 0]).sum().item()
    assert abs((accepted >= 1).float().mean().item() - want) < 0.01


def test_rejection_residual_fallback_to_p():
    """Residual mass 0 (p <= q everywhere on a rejected row): the bonus is drawn from p_a itself."""
    n, vocab = 2000, 4
    q = torch.tensor([0.7, 0.1, 0.1, 0.1]).expand(n, 1, vocab)
    p_small = torch.tensor([0.35, 0.05, 0.05, 0.05])
    accepted, bonus = rejection_accept(torch.zeros(n, 1, dtype=torch.int64), torch.stack([p_small, p_small]).expand(n, 2, vocab),
                                       q, torch.rand(n, 1, generator=torch.Generator().manual_seed(12)), torch.rand(n))
    fallback = bonus[accepted == 0]
    assert fallback.numel() > 0 and (fallback == 0).float().mean().item() > 0.6


def test_accept_drafts_mixes_greedy_and_sampled_rows():
    bs, gamma, vocab = 8, 3, 10
    gen = torch.Generator().manual_seed(13)
    logits = torch.randn(bs, gamma + 1, vocab, generator=gen) * 2
    q = torch.softmax(torch.randn(bs, gamma, vocab, generator=gen), -1)
    drafts = _drafts_with_prefix_matches(logits.argmax(-1), [2, 0, 3, 1, 2, 0, 3, 1], vocab)
    greedy = torch.tensor([True, False] * 4)
    sampling = _sampling([1.0, 0.8] * 4, [1, 4] * 4, [1.0, 0.9] * 4)
    coins, bonus_u = torch.rand(bs, gamma, generator=gen), torch.rand(bs, generator=gen)
    accepted, bonus = accept_drafts(drafts, logits, q, greedy, sampling, coins, bonus_u)
    g_acc, g_bonus = greedy_accept(drafts, logits)
    probs = target_probs(logits.reshape(-1, vocab), sampling.repeat(gamma + 1)).view(bs, gamma + 1, vocab)
    s_acc, s_bonus = rejection_accept(drafts, probs, q, coins, bonus_u)
    assert torch.equal(accepted, torch.where(greedy, g_acc, s_acc))
    assert torch.equal(bonus, torch.where(greedy, g_bonus, s_bonus))
    assert accepted[greedy].tolist() == [2, 3, 2, 3]
    # An all-greedy batch needs no probabilities at all.
    assert [t.tolist() for t in accept_drafts(drafts, logits, q, torch.ones(bs, dtype=torch.bool), None, coins, bonus_u)] \
        == [g_acc.tolist(), g_bonus.tolist()]


def test_commit_layout():
    drafts = torch.tensor([[5, 6, 7], [8, 9, 10]])
    layout = commit_layout(drafts, torch.tensor([1, 3]), torch.tensor([42, 43]), torch.tensor([10, 20]))
    assert layout.commit_lens.dtype == torch.int32 and layout.commit_lens.tolist() == [2, 4]
    assert layout.out_tokens.tolist() == [[5, 42, 7, 0], [8, 9, 10, 43]]
    assert layout.new_seq_lens.tolist() == [12, 24] and layout.new_seq_lens.dtype == torch.int64


def test_target_token_at():
    bs, gamma, vocab = 6, 3, 8
    logits = torch.randn(bs, gamma + 1, vocab, generator=torch.Generator().manual_seed(14))
    accepted = torch.tensor([0, 1, 3, 2, 0, 3])
    greedy = torch.tensor([True, True, True, False, False, False])
    sampling = _sampling([1.0] * bs, [1, 1, 1, 2, 2, 2], [1.0] * bs)
    tokens = target_token_at(logits, accepted, greedy, sampling, torch.rand(bs))
    rows = torch.arange(bs)
    assert tokens[:3].tolist() == logits[rows, accepted].argmax(-1)[:3].tolist()
    top2 = logits[rows, accepted].topk(2, dim=-1).indices
    assert all(int(t) in top2[b].tolist() for b, t in enumerate(tokens) if b >= 3)
    assert torch.equal(target_token_at(logits, accepted, greedy, None, torch.rand(bs)), logits[rows, accepted].argmax(-1))
    # A plain step (width 1, nothing accepted): the same tokens from the one row, greedy and sampled alike.
    plain, zero = logits[:, :1], torch.zeros(bs, dtype=torch.int64)
    u = torch.rand(bs, generator=torch.Generator().manual_seed(3))
    assert torch.equal(target_token_at(plain, zero, greedy, None, u), logits[:, 0].argmax(-1))
    assert torch.equal(target_token_at(plain, zero, greedy, sampling, u), target_token_at(logits, zero, greedy, sampling, u))


# ---- simulated acceptance ------------------------------------------------------------------------------


def test_simulated_acceptance_off_and_constant():
    assert SimulatedAcceptance.from_env({}, 7, "cpu") is None
    assert SimulatedAcceptance.from_env({accept.SIMULATE_ACC_LEN_ENV: "-1"}, 7, "cpu") is None
    sim = SimulatedAcceptance.from_env({accept.SIMULATE_ACC_LEN_ENV: "3"}, 7, "cpu")
    u = torch.rand(1000)
    u[0] = 1.0 - 2 ** -24  # the largest torch.rand value
    assert set(sim.accepted(u).tolist()) == {2}
    assert sim.mean_accept_length == 3.0
    full = SimulatedAcceptance.from_env({accept.SIMULATE_ACC_LEN_ENV: "8"}, 7, "cpu")
    assert set(full.accepted(u).tolist()) == {7}


def test_simulated_acceptance_fractional_mean():
    sim = SimulatedAcceptance.from_env({accept.SIMULATE_ACC_LEN_ENV: "2.25"}, 7, "cpu")
    a = sim.accepted(torch.rand(100_000, generator=torch.Generator().manual_seed(15)))
    assert set(a.tolist()) == {1, 2}
    assert abs(a.float().mean().item() + 1 - 2.25) < 0.01


def test_simulated_acceptance_profile_is_unconditional_per_position():
    profile = "0.605,0.341,0.186,0.099,0.052,0.027,0.014"
    sim = SimulatedAcceptance.from_env({accept.SIMULATE_ACC_PROFILE_ENV: profile}, 7, "cpu")
    a = sim.accepted(torch.rand(200_000, generator=torch.Generator().manual_seed(16)))
    want = [float(x) for x in profile.split(",")]
    got = [(a >= k + 1).float().mean().item() for k in range(7)]
    assert max(abs(g - w) for g, w in zip(got, want)) < 0.005
    assert abs(sim.mean_accept_length - (1 + sum(want))) < 1e-9
    short = SimulatedAcceptance.from_env({accept.SIMULATE_ACC_PROFILE_ENV: "1,1"}, 4, "cpu")
    assert set(short.accepted(torch.rand(100)).tolist()) == {2}  # positions beyond the list: never


@pytest.mark.parametrize(
    "env, message",
    [
        ({accept.SIMULATE_ACC_LEN_ENV: "0.5"}, r"\[1, gamma \+ 1 = 8\]"),
        ({accept.SIMULATE_ACC_LEN_ENV: "9"}, r"\[1, gamma \+ 1 = 8\]"),
        ({accept.SIMULATE_ACC_LEN_ENV: "three"}, "expected a number"),
        ({accept.SIMULATE_ACC_PROFILE_ENV: "0.3,0.5"}, "non-increasing"),
        ({accept.SIMULATE_ACC_PROFILE_ENV: "1.2"}, r"in \[0, 1\]"),
        ({accept.SIMULATE_ACC_PROFILE_ENV: ",".join(["0.1"] * 8)}, "at most gamma = 7"),
        ({accept.SIMULATE_ACC_PROFILE_ENV: "0.5,x"}, "comma-separated"),
        ({accept.SIMULATE_ACC_LEN_ENV: "2", accept.SIMULATE_ACC_PROFILE_ENV: "0.5"}, "found both"),
    ],
)
def test_simulated_acceptance_errors_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message) as info:
        SimulatedAcceptance.from_env(env, 7, "cpu")
    assert "SGLANG_" in str(info.value)

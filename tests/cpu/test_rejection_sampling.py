"""Target probability processing, the acceptance rule, and exactness of speculative sampling.

The exactness tests run many independent trials from one prefix as a batch through the real
``decode.speculative_step`` / ``decode.commit`` code and compare the emitted tokens with the target's own
distribution (chi-square, scipy).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from sglang_dspark.reference import decode
from sglang_dspark.reference.accept import AcceptResult, accept_drafts
from sglang_dspark.reference.sampling import (
    SamplingBatch,
    SamplingParams,
    draft_probs,
    sample_from_probs,
    target_probs,
    top_k_renorm,
    top_p_renorm,
)

# ---- probability processing ------------------------------------------------------------------------


def test_top_k_and_top_p_renorm_by_hand():
    p = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.3, 0.2]])
    top2 = torch.tensor([[0, 4 / 7, 0, 3 / 7], [0.25, 0.25, 0.3, 0.2]])  # second row: top_k 0 = off
    torch.testing.assert_close(top_k_renorm(p, torch.tensor([2, 0])), top2)
    # top_p 0.6: sorted 0.4, 0.3 reaches 0.7 >= 0.6 -> keep {1, 3}; top_p 0.25: the largest (0.3) suffices.
    want = torch.tensor([[0, 4 / 7, 0, 3 / 7], [0, 0, 1, 0]])
    torch.testing.assert_close(top_p_renorm(p, torch.tensor([0.6, 0.25])), want)
    # Mass exactly reached by a prefix: 0.4 + 0.3 = 0.7 -> the third token is not kept.
    torch.testing.assert_close(top_p_renorm(p[:1], torch.tensor([0.7])), torch.tensor([[0, 4 / 7, 0, 3 / 7]]))


def test_target_probs_order_temperature_topk_topp():
    logits = torch.tensor([[[1.0, 2.0, 0.5, 3.0, -1.0]]])
    sb = SamplingBatch.stack([SamplingParams(temperature=0.5, top_k=3, top_p=0.9)])
    p = torch.softmax(logits[0, 0] / 0.5, -1)
    p = torch.where(p >= p.topk(3).values[-1], p, 0.0)
    p = p / p.sum()  # top-k renorm, then top-p on the renormalised distribution:
    order = p.argsort(descending=True)
    keep = (p[order].cumsum(0) - p[order]) < 0.9
    want = torch.zeros_like(p)
    want[order[keep]] = p[order[keep]]
    torch.testing.assert_close(target_probs(logits, sb)[0, 0], want / want.sum())
    assert int((target_probs(logits, sb) > 0).sum()) == 2


def test_greedy_rows_are_one_hot_and_draft_side_is_plain_softmax():
    logits = torch.tensor([[0.3, 1.0, 0.2], [0.3, 1.0, 0.2], [0.3, 1.0, 0.2]])
    sb = SamplingBatch.stack(
        [SamplingParams(0.0), SamplingParams(1.0, top_k=1), SamplingParams(2.0, top_k=2, top_p=0.5)]
    )
    assert sb.greedy_mask().tolist() == [True, True, False]
    hot = torch.tensor([0.0, 1.0, 0.0])
    tp, dp = target_probs(logits, sb), draft_probs(logits, sb)
    assert torch.equal(tp[0], hot) and torch.equal(tp[1], hot) and torch.equal(dp[0], hot)
    torch.testing.assert_close(dp[2], torch.softmax(logits[2] / 2.0, -1))  # no top-k / top-p on the draft


# ---- the acceptance rule -----------------------------------------------------------------------------


def _one_hot(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(tokens), vocab).float()


def test_greedy_acceptance_and_bonus():
    vocab = 6
    target = torch.stack([_one_hot([1, 2, 3, 4], vocab), _one_hot([1, 5, 3, 0], vocab), _one_hot([4, 2, 3, 5], vocab)])
    drafts = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    res = accept_drafts(drafts, target, torch.rand(3, 3, vocab), torch.ones(3, dtype=torch.bool))
    assert res.accepted.tolist() == [3, 1, 0]
    assert res.bonus.tolist() == [4, 5, 4]


def test_mixed_batch_and_full_accept_bonus():
    vocab, gen = 5, torch.Generator().manual_seed(0)
    drafts = torch.tensor([[2, 2], [2, 2]])
    # Non-one-hot target rows: a greedy row takes the argmax (token 0 here), a sampled row with p == q accepts.
    p = torch.tensor([0.4, 0.1, 0.3, 0.1, 0.1])
    target = p.expand(2, 3, vocab).clone()
    target[:, 2] = _one_hot([3], vocab)  # p_gamma
    res = accept_drafts(drafts, target, p.expand(2, 2, vocab).clone(), torch.tensor([True, False]), gen)
    assert res.accepted.tolist() == [0, 2]
    assert res.bonus.tolist() == [0, 3]  # greedy: argmax p_0; all accepted: y ~ p_gamma


def test_rejection_then_residual_and_fallback():
    vocab, gen, n = 4, torch.Generator().manual_seed(1), 4000
    drafts = torch.zeros(n, 1, dtype=torch.int64)
    q = torch.tensor([0.7, 0.1, 0.1, 0.1])
    p = torch.tensor([0.35, 0.45, 0.1, 0.1])
    target = torch.stack([p, p]).expand(n, 2, vocab)
    res = accept_drafts(drafts, target, q.expand(n, 1, vocab), torch.zeros(n, dtype=torch.bool), gen)
    assert abs(res.accepted.float().mean().item() - 0.5) < 0.03  # min(1, 0.35 / 0.7)
    rejected = res.bonus[res.accepted == 0]
    assert set(rejected.tolist()) == {1}  # residual max(0, p - q) = [0, 0.35, 0, 0]
    # p <= q everywhere (not a distribution): residual mass 0 -> bonus falls back to p_0.
    p_small = torch.tensor([0.35, 0.05, 0.05, 0.05])
    res = accept_drafts(drafts, torch.stack([p_small, p_small]).expand(n, 2, vocab), q.expand(n, 1, vocab),
                        torch.zeros(n, dtype=torch.bool), gen)
    fallback = res.bonus[res.accepted == 0]
    assert fallback.numel() > 0 and bool((fallback == 0).float().mean() > 0.6)


def test_accept_shape_error_names_the_file():
    with pytest.raises(ValueError, match="accept.py"):
        drafts, greedy = torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, dtype=torch.bool)
        accept_drafts(drafts, torch.rand(2, 3, 5), torch.rand(2, 3, 5), greedy)  # target needs gamma + 1 rows


# ---- exactness of speculative sampling through the real step code ---------------------------------

VOCAB, TRIALS, GAMMA, P_MIN = 16, 20_000, 3, 1e-3
PROMPT = [1, 5, 9, 2, 11, 7]


@pytest.fixture(scope="module")
def v16_target(tiny_target):
    return tiny_target(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=32,
                       initializer_range=0.25, seed=7)


def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square p-value of ``counts`` against ``probs``; zero-probability cells must be empty and
    cells expecting fewer than 5 draws are pooled."""
    counts, probs = counts.ravel().astype(np.float64), probs.ravel().astype(np.float64)
    impossible = probs <= 1e-9
    assert counts[impossible].sum() == 0, "a token outside the target's support was emitted"
    counts, expected = counts[~impossible], probs[~impossible] / probs[~impossible].sum() * counts.sum()
    small = expected < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    return float(chisquare(counts, expected).pvalue)


def _exact_distributions(target, anchor: int, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """p(t1) [V] and p(t1, t2) [V, V] after PROMPT + [anchor], from full target forwards."""
    with torch.no_grad():
        prefix = torch.tensor([PROMPT + [anchor]])
        p1 = target_probs(target(prefix).logits[:, -1], SamplingBatch.repeat(params, 1))[0]
        seqs = torch.cat([prefix.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], dim=1)
        p2 = target_probs(target(seqs).logits[:, -1], SamplingBatch.repeat(params, VOCAB))
    return p1.numpy(), (p1[:, None] * p2).numpy()


def _first_two_tokens(target, drafter, params: SamplingParams, seed: int):
    """Run TRIALS independent speculative continuations of one prefill; return (anchor, first tokens,
    second tokens, accepted counts of the first step), all emitted by speculative steps."""
    gen = torch.Generator().manual_seed(seed)
    state = decode.prefill(target, drafter, torch.tensor([PROMPT]), SamplingBatch.repeat(params, 1), gen)
    batch = decode.repeat_state(state, TRIALS)
    step = decode.speculative_step(target, drafter, batch, GAMMA, gen)
    a = step.accepted
    first = torch.where(a > 0, step.draft_tokens[:, 0], step.bonus)
    second = torch.where(a > 1, step.draft_tokens[:, 1], step.bonus)
    # Rows that accepted nothing emitted one token; their second comes from the next step.
    for rows, sub in decode.commit(drafter, batch, step):
        if int(a[rows[0]]) == 0:
            nxt = decode.speculative_step(target, drafter, sub, GAMMA, gen)
            second[rows] = torch.where(nxt.accepted > 0, nxt.draft_tokens[:, 0], nxt.bonus)
    return int(state.anchor[0]), first.numpy(), second.numpy(), a


CASES = [
    ("t0.7", SamplingParams(temperature=0.7), "vanilla"),
    ("t1.0", SamplingParams(temperature=1.0), "rnn"),
    ("topk", SamplingParams(temperature=1.0, top_k=5), "gated"),
    ("topp", SamplingParams(temperature=0.8, top_p=0.8), "vanilla"),
]


@pytest.mark.parametrize("name, params, kind", CASES, ids=[c[0] for c in CASES])
def test_speculative_sampling_matches_target_distribution(v16_target, tiny_drafter, name, params, kind):
    drafter = tiny_drafter(v16_target, markov_head_type=kind, markov_rank=4, init_std=0.3, seed=11)
    anchor, first, second, accepted = _first_two_tokens(v16_target, drafter, params, seed=123)
    # Both paths are exercised: rejections at position 0 and accepted drafts.
    assert 0.05 < (accepted == 0).float().mean().item() < 0.95
    assert (accepted >= 2).float().mean().item() > 0.01
    p1, p12 = _exact_distributions(v16_target, anchor, params)
    c1 = np.bincount(first, minlength=VOCAB)
    c12 = np.bincount(first * VOCAB + second, minlength=VOCAB * VOCAB)
    assert _chi2_pvalue(c1, p1) > P_MIN
    assert _chi2_pvalue(c12, p12) > P_MIN


def _bonus_from_target(draft_tokens, target_probs_, draft_probs_, greedy_mask, generator=None) -> AcceptResult:
    """A WRONG rule: the right acceptance decisions, but the bonus after a rejection is drawn from p, not
    from the residual max(0, p - q)."""
    res = accept_drafts(draft_tokens, target_probs_, draft_probs_, greedy_mask, generator)
    p_a = target_probs_[torch.arange(draft_tokens.shape[0]), res.accepted]
    return AcceptResult(res.accepted, sample_from_probs(p_a, generator))


def test_wrong_bonus_rule_is_detected(v16_target, tiny_drafter, monkeypatch):
    params = SamplingParams(temperature=1.0)
    drafter = tiny_drafter(v16_target, markov_head_type="vanilla", markov_rank=4, init_std=0.3, seed=11)
    monkeypatch.setattr(decode, "accept_drafts", _bonus_from_target)
    anchor, first, _, _ = _first_two_tokens(v16_target, drafter, params, seed=123)
    p1, _ = _exact_distributions(v16_target, anchor, params)
    assert _chi2_pvalue(np.bincount(first, minlength=VOCAB), p1) < P_MIN

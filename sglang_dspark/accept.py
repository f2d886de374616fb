"""Draft-token sampling and chain acceptance for the SGLang path: batched, sync-free, CUDA-graph-safe.

The math is the one of ``sglang_dspark.reference`` (the oracle); this module only changes how it runs:
no host synchronisation (no ``.item()``, no data-dependent shapes or branches), all randomness passed in
as uniform tensors drawn by the caller, and sampling by inverse CDF, so every function here can run inside
a captured CUDA graph and gives the same result for the same uniforms.

Per request ``b`` with anchor ``x_0`` and draft positions ``k = 1..gamma`` (block slot ``k - 1``):

* draft: ``Z_k = U_k + B_k(x_{k-1})`` (base logits plus the Markov bias),
  ``q_k = softmax(Z_k / T)`` over the full vocabulary; ``x_k = argmax Z_k`` for a greedy request, else
  ``x_k ~ q_k``. ``q_k`` is kept for the acceptance test.
* target: ``p_j`` (``j = 0..gamma``) predicts the token after ``x_j``; ``p = softmax(logits / T)`` ->
  top-k renorm -> top-p renorm.
* greedy request: accept ``x_{j+1}`` while ``x_{j+1} == argmax logits_j``; ``a`` = number accepted;
  bonus ``y = argmax logits_a``.
* sampled request: accept ``x_{j+1}`` iff ``u_j * q_j(x_{j+1}) < p_j(x_{j+1})`` (probability
  ``min(1, p/q)``), stop at the first rejection; bonus ``y ~ normalize(max(0, p_a - q_a))`` after a
  rejection (``y ~ p_a`` when that residual mass is ``<= 1e-8``), ``y ~ p_gamma`` after a full accept.

The request emits ``x_1..x_a, y``: ``commit_lens = a + 1`` tokens, new sequence length ``P + a + 1``.

Simulated acceptance (benchmarking without a trained drafter): ``SGLANG_SIMULATE_ACC_LEN=L`` makes every
request accept ``L - 1`` drafts per step (stochastically rounded when ``L`` is fractional, so the mean
accept length is ``L``); ``SGLANG_DSPARK_SIMULATE_ACC_PROFILE=c_1,c_2,...`` accepts draft position ``k``
with unconditional probability ``c_k`` (non-increasing; one uniform per request and step, so
``P(a >= k) = c_k``). The bonus is then the target's own token after the accepted drafts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from sglang_dspark.reference.heads import ConfidenceHead, MarkovHead

logger = logging.getLogger("sglang_dspark")

RESIDUAL_MASS_EPS = 1e-8
SIMULATE_ACC_LEN_ENV = "SGLANG_SIMULATE_ACC_LEN"
SIMULATE_ACC_PROFILE_ENV = "SGLANG_DSPARK_SIMULATE_ACC_PROFILE"


# ---- sampling ----------------------------------------------------------------------------------------


def inverse_cdf_sample(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row from non-negative (not necessarily normalised) weights.

    weights: float ``[N, V]``; u: uniforms in ``[0, 1)``, ``[N]`` -> int64 ``[N]``. Token ``i`` is chosen
    when ``cdf[i-1] <= u * total < cdf[i]``, so zero-weight tokens are never chosen.
    """
    cdf = weights.float().cumsum(dim=-1)
    target = u.float().unsqueeze(-1) * cdf[:, -1:]
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return index.clamp_(max=weights.shape[-1] - 1)


def draft_step(
    logits: torch.Tensor, inv_temperature: torch.Tensor, greedy: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One draft position: corrected logits ``Z`` float32 ``[bs, V]``, ``1/T`` ``[bs]``, greedy mask bool
    ``[bs]``, uniforms ``[bs]`` -> (tokens int64 ``[bs]``, ``q = softmax(Z / T)`` float32 ``[bs, V]``).

    Greedy rows take ``argmax Z``; the others sample ``q``. ``q`` is the full softmax for every row.
    """
    probs = torch.softmax(logits * inv_temperature.unsqueeze(-1), dim=-1)
    tokens = torch.where(greedy, logits.argmax(dim=-1), inverse_cdf_sample(probs, u))
    return tokens, probs


@dataclass(frozen=True)
class DraftBlock:
    """The drafter's output for one block."""

    tokens: torch.Tensor  # int64 [bs, gamma]: x_1..x_gamma
    probs: torch.Tensor | None  # float32 [bs, gamma, V]: q_k = softmax(Z_k / T); None for an all-greedy block
    confidence_logits: torch.Tensor | None  # float32 [bs, gamma]; None without a confidence head


def sample_draft_block(
    base_logits: torch.Tensor,
    hidden: torch.Tensor,
    anchor: torch.Tensor,
    markov_head: MarkovHead | None,
    confidence_head: ConfidenceHead | None,
    inv_temperature: torch.Tensor,
    greedy: torch.Tensor,
    uniforms: torch.Tensor,
    all_greedy: bool = False,
) -> DraftBlock:
    """Sample a block left to right with the Markov correction and score it with the confidence head.

    base_logits ``U`` ``[bs, gamma, V]`` (any float dtype; each position is taken to float32);
    hidden ``H`` ``[bs, gamma, d]`` (final-normed backbone output); anchor int64 ``[bs]``; ``1/T`` ``[bs]``; greedy bool ``[bs]``; uniforms ``[bs, gamma]``.
    The confidence head reads ``[h_k ; W1[x_{k-1}]]`` when its input is wider than ``d``, else ``h_k``.
    ``all_greedy`` (every row greedy; ``greedy``, ``1/T`` and ``uniforms`` are then unused): tokens are
    ``argmax Z_k`` and no draft distribution is built (``probs`` is None; greedy acceptance never reads it).
    """
    bs, gamma, _ = base_logits.shape
    use_markov_features = (
        confidence_head is not None
        and markov_head is not None
        and confidence_head.proj.in_features > hidden.shape[-1]
    )
    state = None if markov_head is None else markov_head.initial_state(bs, hidden)
    prev = anchor
    tokens, probs, confidence = [], [], []
    for k in range(gamma):
        h_k = hidden[:, k]
        logits = base_logits[:, k].float()
        if markov_head is not None:
            bias, state = markov_head.step(prev, h_k, state)
            logits = logits + bias.float()
        if confidence_head is not None:
            features = markov_head.token_features(prev) if use_markov_features else None
            confidence.append(confidence_head(h_k, features).float())
        if all_greedy:
            prev = logits.argmax(dim=-1)
        else:
            prev, q = draft_step(logits, inv_temperature, greedy, uniforms[:, k])
            probs.append(q)
        tokens.append(prev)
    return DraftBlock(
        tokens=torch.stack(tokens, dim=1),
        probs=torch.stack(probs, dim=1) if probs else None,
        confidence_logits=torch.stack(confidence, dim=1) if confidence else None,
    )


# ---- target distributions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetSampling:
    """Per-request sampling parameters of a batch (SGLang's ``SamplingBatchInfo`` fields) plus the
    host-side facts that keep ``target_probs`` sync-free."""

    temperature: torch.Tensor  # float [bs] (or [bs, 1])
    top_k: torch.Tensor  # int [bs]; <= 0 or >= V keeps every token
    top_p: torch.Tensor  # float [bs]; >= 1 keeps every token
    max_top_k: int  # host int >= the top_k of every row that needs one (<= 0 or >= V: no bound)
    apply_top_k: bool  # some row needs top-k (rows whose result is unused, e.g. greedy ones, may be left out)
    apply_top_p: bool  # some row needs top-p (same)
    min_p: torch.Tensor | None = None  # float [bs]; 0 keeps every token
    apply_min_p: bool = False  # some row needs min-p (same)

    def repeat(self, n: int) -> "TargetSampling":
        """The same parameters for ``n`` consecutive rows per request (``[bs]`` -> ``[bs * n]``)."""
        return TargetSampling(
            temperature=self.temperature.reshape(-1).repeat_interleave(n),
            top_k=self.top_k.reshape(-1).repeat_interleave(n),
            top_p=self.top_p.reshape(-1).repeat_interleave(n),
            max_top_k=self.max_top_k,
            apply_top_k=self.apply_top_k,
            apply_top_p=self.apply_top_p,
            min_p=None if self.min_p is None else self.min_p.reshape(-1).repeat_interleave(n),
            apply_min_p=self.apply_min_p,
        )


def target_probs(logits: torch.Tensor, sampling: TargetSampling) -> torch.Tensor:
    """``softmax(logits / T)`` -> top-k renorm -> top-p renorm -> min-p renorm: logits ``[N, V]`` -> float32
    ``[N, V]`` (SGLang's sampler order).

    Top-k keeps the ``top_k[n]`` most likely tokens; top-p then keeps the smallest prefix of the sorted
    renormalised row whose mass reaches ``top_p[n]`` (at least one token); min-p then keeps the tokens whose
    probability is at least ``min_p[n]`` times the largest. Only the ``max_top_k`` largest entries of a row
    are sorted when top-k bounds every row.
    """
    vocab = logits.shape[-1]
    temperature = sampling.temperature.reshape(-1, 1).float()
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if not sampling.apply_top_k and not sampling.apply_top_p and not sampling.apply_min_p:
        return probs
    bounded = sampling.apply_top_k and 0 < sampling.max_top_k < vocab
    values, order = probs.topk(sampling.max_top_k if bounded else vocab, dim=-1)  # sorted, descending
    if sampling.apply_top_k:
        top_k = sampling.top_k.reshape(-1, 1)
        top_k = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
        ranks = torch.arange(values.shape[-1], device=logits.device)
        values = values * (ranks < top_k)
        values = values / values.sum(dim=-1, keepdim=True)
    if sampling.apply_top_p:
        mass_before = values.cumsum(dim=-1) - values
        keep = mass_before < sampling.top_p.reshape(-1, 1).float()
        keep[:, 0] = True
        values = values * keep
        values = values / values.sum(dim=-1, keepdim=True)
    if sampling.apply_min_p:
        values = values * (values >= values[:, :1] * sampling.min_p.reshape(-1, 1).float())
        values = values / values.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, order, values)


# ---- acceptance ----------------------------------------------------------------------------------------


def _leading_true(mask: torch.Tensor) -> torch.Tensor:
    """Length of the all-true prefix of each row: bool ``[bs, gamma]`` -> int64 ``[bs]``."""
    return mask.long().cumprod(dim=-1).sum(dim=-1)


def greedy_accept(drafts: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """drafts int64 ``[bs, gamma]``, target logits ``[bs, gamma + 1, V]`` -> (accepted ``a`` int64 ``[bs]``,
    bonus ``argmax logits_a`` int64 ``[bs]``)."""
    return greedy_accept_top1(drafts, target_logits.argmax(dim=-1))


def greedy_accept_top1(
    drafts: torch.Tensor, top1: torch.Tensor, verified: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``greedy_accept`` from the target's argmax tokens int64 ``[bs, gamma + 1]``; ``verified`` int64 ``[bs]``
    caps the drafts verified per request (default: all ``gamma``)."""
    match = drafts == top1[:, :-1]
    if verified is not None:
        match &= torch.arange(drafts.shape[1], device=drafts.device) < verified[:, None]
    accepted = _leading_true(match)
    return accepted, top1.gather(1, accepted.unsqueeze(1)).squeeze(1)


def rejection_accept(
    drafts: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    coins: torch.Tensor,
    bonus_u: torch.Tensor,
    verified: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact chain speculative sampling.

    drafts int64 ``[bs, gamma]``; target_probs ``p`` ``[bs, gamma + 1, V]``; draft_probs ``q``
    ``[bs, gamma, V]``; coins ``[bs, gamma]`` and bonus_u ``[bs]`` uniforms in ``[0, 1)``; ``verified`` int64
    ``[bs]``: drafts verified per request ``v`` (default all ``gamma``; drafts past ``v`` are never accepted and
    after ``v`` accepted the bonus is drawn from ``p_v``, as if the block had ``v`` drafts)
    -> (accepted int64 ``[bs]``, bonus int64 ``[bs]``).
    """
    bs, gamma = drafts.shape
    index = drafts.unsqueeze(-1)
    p_x = target_probs[:, :gamma].gather(-1, index).squeeze(-1)
    q_x = draft_probs.gather(-1, index).squeeze(-1)
    passed = coins * q_x < p_x
    if verified is not None:
        passed &= torch.arange(gamma, device=drafts.device) < verified[:, None]
    accepted = _leading_true(passed)
    rows = torch.arange(bs, device=drafts.device)
    p_a = target_probs[rows, accepted].float()
    rejected = (accepted < (gamma if verified is None else verified)).unsqueeze(-1)
    q_a = draft_probs[rows, accepted.clamp(max=gamma - 1)].float() * rejected
    residual = (p_a - q_a).clamp_min(0.0)
    usable = residual.sum(dim=-1, keepdim=True) > RESIDUAL_MASS_EPS
    bonus = inverse_cdf_sample(torch.where(usable, residual, p_a), bonus_u)
    return accepted, bonus


def accept_drafts(
    drafts: torch.Tensor,
    target_logits: torch.Tensor,
    draft_probs: torch.Tensor,
    greedy: torch.Tensor,
    sampling: TargetSampling | None,
    coins: torch.Tensor,
    bonus_u: torch.Tensor,
    verified: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy rows by matching, the others by rejection sampling, in one batch.

    drafts ``[bs, gamma]``; target logits ``[bs, gamma + 1, V]``; draft probs ``[bs, gamma, V]``; greedy
    bool ``[bs]``; ``sampling`` None means an all-greedy batch (no probabilities are built); coins
    ``[bs, gamma]``, bonus_u ``[bs]``; ``verified`` int64 ``[bs]`` drafts verified per request (default all)
    -> (accepted int64 ``[bs]``, bonus int64 ``[bs]``).
    """
    greedy_accepted, greedy_bonus = greedy_accept_top1(drafts, target_logits.argmax(dim=-1), verified)
    if sampling is None:
        return greedy_accepted, greedy_bonus
    bs, width, vocab = target_logits.shape
    probs = target_probs(target_logits.reshape(bs * width, vocab), sampling.repeat(width))
    accepted, bonus = rejection_accept(drafts, probs.view(bs, width, vocab), draft_probs, coins, bonus_u, verified)
    return torch.where(greedy, greedy_accepted, accepted), torch.where(greedy, greedy_bonus, bonus)


def target_token_at(
    target_logits: torch.Tensor,
    accepted: torch.Tensor,
    greedy: torch.Tensor,
    sampling: TargetSampling | None,
    u: torch.Tensor,
) -> torch.Tensor:
    """The target's own token after ``accepted`` drafts (plain steps, simulated acceptance): argmax of
    ``logits_a`` for greedy rows, a sample of ``p_a`` otherwise. logits ``[bs, W, V]`` (``W``: the step's verify
    width, ``accepted < W``) -> ``[bs]``."""
    if target_logits.shape[1] == 1:  # a plain step (nothing drafted, accepted = 0): a view, no copy of the logits
        logits = target_logits[:, 0]
    else:
        rows = torch.arange(target_logits.shape[0], device=target_logits.device)
        logits = target_logits[rows, accepted]
    argmax = logits.argmax(dim=-1)
    if sampling is None:
        return argmax
    return torch.where(greedy, argmax, inverse_cdf_sample(target_probs(logits, sampling), u))


@dataclass(frozen=True)
class CommitLayout:
    """What one verify step commits, in the layout SGLang's spec-v2 result processing expects."""

    commit_lens: torch.Tensor  # int32 [bs]: a + 1 (accepted drafts plus the bonus)
    out_tokens: torch.Tensor  # int64 [bs, gamma + 1]: x_1..x_a, y at column a, then don't-care
    new_seq_lens: torch.Tensor  # [bs], dtype of prefix_lens: P + a + 1


def commit_layout(
    drafts: torch.Tensor, accepted: torch.Tensor, bonus: torch.Tensor, prefix_lens: torch.Tensor
) -> CommitLayout:
    """drafts ``[bs, gamma]``, accepted/bonus ``[bs]``, prefix_lens ``P`` ``[bs]`` -> ``CommitLayout``."""
    bs, gamma = drafts.shape
    out = torch.zeros((bs, gamma + 1), dtype=torch.int64, device=drafts.device)
    out[:, :gamma] = drafts
    out.scatter_(1, accepted.unsqueeze(1), bonus.to(torch.int64).unsqueeze(1))
    return CommitLayout(
        commit_lens=(accepted + 1).to(torch.int32),
        out_tokens=out,
        new_seq_lens=prefix_lens + (accepted + 1).to(prefix_lens.dtype),
    )


# ---- simulated acceptance ------------------------------------------------------------------------------


class SimulatedAcceptance:
    """Accepted-draft counts drawn without looking at the drafts (see the module docstring)."""

    def __init__(
        self, gamma: int, device: torch.device | str, mean_length: float | None = None,
        profile: tuple[float, ...] | None = None,
    ) -> None:
        if (mean_length is None) == (profile is None):
            raise ValueError("accept.py: SimulatedAcceptance takes exactly one of mean_length and profile")
        self.gamma = gamma
        self.mean_length = mean_length
        self.profile = profile
        self._profile = None
        if profile is not None:
            padded = list(profile) + [0.0] * (gamma - len(profile))
            self._profile = torch.tensor(padded, dtype=torch.float32, device=device)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str], gamma: int, device: torch.device | str
    ) -> "SimulatedAcceptance | None":
        """Read ``SGLANG_SIMULATE_ACC_LEN`` / ``SGLANG_DSPARK_SIMULATE_ACC_PROFILE``; None when neither is
        set (an ACC_LEN <= 0 counts as unset, as in SGLang)."""
        length_text = environ.get(SIMULATE_ACC_LEN_ENV, "").strip()
        profile_text = environ.get(SIMULATE_ACC_PROFILE_ENV, "").strip()
        mean_length = None
        if length_text:
            try:
                mean_length = float(length_text)
            except ValueError:
                raise ValueError(
                    f"{SIMULATE_ACC_LEN_ENV}: expected a number (accept length, bonus included), "
                    f"found {length_text!r}"
                ) from None
            if mean_length <= 0:
                mean_length = None
            elif not 1.0 <= mean_length <= gamma + 1:
                raise ValueError(
                    f"{SIMULATE_ACC_LEN_ENV}: expected an accept length in [1, gamma + 1 = {gamma + 1}] "
                    f"(it counts the bonus token), found {mean_length}"
                )
        profile = cls._parse_profile(profile_text, gamma) if profile_text else None
        if mean_length is not None and profile is not None:
            raise ValueError(
                f"{SIMULATE_ACC_LEN_ENV}={length_text} and {SIMULATE_ACC_PROFILE_ENV}={profile_text}: "
                "expected at most one simulated-acceptance setting, found both"
            )
        if mean_length is None and profile is None:
            return None
        sim = cls(gamma, device, mean_length=mean_length, profile=profile)
        logger.warning(
            "DSPARK simulated acceptance is ON (%s): outputs are NOT the target's; for benchmarking only.",
            f"{SIMULATE_ACC_LEN_ENV}={mean_length}" if profile is None else f"{SIMULATE_ACC_PROFILE_ENV}={list(profile)}",
        )
        return sim

    @staticmethod
    def _parse_profile(text: str, gamma: int) -> tuple[float, ...]:
        try:
            profile = tuple(float(x) for x in text.split(","))
        except ValueError:
            raise ValueError(
                f"{SIMULATE_ACC_PROFILE_ENV}: expected comma-separated probabilities (e.g. 0.6,0.34,0.19), "
                f"found {text!r}"
            ) from None
        problems = []
        if len(profile) > gamma:
            problems.append(f"at most gamma = {gamma} entries, found {len(profile)}")
        if any(not 0.0 <= c <= 1.0 for c in profile):
            problems.append(f"every entry in [0, 1], found {list(profile)}")
        if any(b > a for a, b in zip(profile, profile[1:])):
            problems.append(
                f"non-increasing entries (P(position k accepted) includes all earlier positions), found {list(profile)}"
            )
        if problems:
            raise ValueError(f"{SIMULATE_ACC_PROFILE_ENV}: expected " + "; ".join(problems))
        return profile

    @property
    def mean_accept_length(self) -> float:
        """Expected accept length (bonus included) per step."""
        if self.mean_length is not None:
            return self.mean_length
        return 1.0 + sum(self.profile)

    def accepted(self, u: torch.Tensor) -> torch.Tensor:
        """Uniforms ``[bs]`` -> accepted draft counts int64 ``[bs]`` in ``0..gamma``."""
        if self._profile is not None:
            return (u.unsqueeze(-1) < self._profile).sum(dim=-1)
        whole = math.floor(self.mean_length - 1.0)
        fraction = self.mean_length - 1.0 - whole
        return (whole + (u < fraction).long()).clamp_(0, self.gamma)

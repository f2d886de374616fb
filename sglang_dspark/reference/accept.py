"""Batched chain acceptance: greedy matching and exact speculative (rejection) sampling.

For request ``b`` with drafts ``x_1..x_gamma`` (``draft_tokens[b, j] = x_{j+1}``), target
distributions ``p_0..p_gamma`` (``p_j`` predicts the token after ``x_j``; ``x_0`` is the anchor) and
draft distributions ``q_0..q_{gamma-1}`` (``q_j`` is the distribution ``x_{j+1}`` was drawn from):

* greedy request: accept ``x_{j+1}`` while ``x_{j+1} == argmax p_j``; ``a`` = number accepted;
  bonus ``y = argmax p_a``.
* sampled request: for ``j = 0..gamma-1`` draw ``u_j ~ U[0, 1)`` and accept ``x_{j+1}`` iff
  ``u_j * q_j(x_{j+1}) < p_j(x_{j+1})`` (probability ``min(1, p_j(x)/q_j(x))``); stop at the first
  rejection; ``a`` = number accepted. If ``a < gamma`` the bonus is
  ``y ~ normalize(max(0, p_a - q_a))``, falling back to ``y ~ p_a`` when that residual mass is
  ``<= 1e-8``; if ``a == gamma`` the bonus is ``y ~ p_gamma``.

The request then emits ``x_1..x_a, y`` (``a + 1`` tokens). Sampled acceptance leaves the emitted
tokens distributed exactly as if sampled from the target one at a time.

Random numbers: one ``[bs, gamma]`` uniform draw, then one multinomial draw per row, both from
``generator`` in that order, whatever the greedy mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_dspark.reference.sampling import sample_from_probs

RESIDUAL_MASS_EPS = 1e-8


@dataclass(frozen=True)
class AcceptResult:
    accepted: torch.Tensor  # int64 [bs]: a, number of accepted drafts
    bonus: torch.Tensor  # int64 [bs]: y, the token emitted after the accepted drafts


def _leading_true(mask: torch.Tensor) -> torch.Tensor:
    """Length of the all-true prefix of each row: bool ``[bs, gamma]`` -> int64 ``[bs]``."""
    return mask.long().cumprod(dim=-1).sum(dim=-1)


def accept_drafts(
    draft_tokens: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    greedy_mask: torch.Tensor,
    generator: torch.Generator | None = None,
) -> AcceptResult:
    """Apply the acceptance rule of this module's docstring to a batch.

    draft_tokens: int64 ``[bs, gamma]``; target_probs: ``[bs, gamma + 1, V]``;
    draft_probs: ``[bs, gamma, V]``; greedy_mask: bool ``[bs]``.
    Returns ``AcceptResult`` with ``accepted`` and ``bonus``, both int64 ``[bs]``.
    """
    bs, gamma = draft_tokens.shape
    if target_probs.shape[:2] != (bs, gamma + 1) or draft_probs.shape[:2] != (bs, gamma):
        raise ValueError(
            f"accept.py: expected target_probs [{bs}, {gamma + 1}, V] and draft_probs [{bs}, {gamma}, V] "
            f"for draft_tokens [{bs}, {gamma}], found {tuple(target_probs.shape)} and {tuple(draft_probs.shape)}"
        )
    target_probs = target_probs.float()
    draft_probs = draft_probs.float()
    rows = torch.arange(bs, device=draft_tokens.device)
    greedy_mask = greedy_mask.to(draft_tokens.device)

    # Greedy: leading matches with the target argmax.
    greedy_ok = draft_tokens == target_probs[:, :gamma].argmax(dim=-1)
    # Sampled: u * q(x) < p(x) accepts with probability min(1, p(x) / q(x)).
    p_x = target_probs[:, :gamma].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
    q_x = draft_probs.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
    u = torch.rand((bs, gamma), generator=generator, device=draft_tokens.device)
    sampled_ok = u * q_x < p_x
    accepted = torch.where(greedy_mask, _leading_true(greedy_ok), _leading_true(sampled_ok))

    # Bonus distribution: residual after a rejection, p_gamma after a full accept.
    p_a = target_probs[rows, accepted]
    q_padded = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)
    residual = (p_a - q_padded[rows, accepted]).clamp_min(0.0)
    residual_mass = residual.sum(dim=-1, keepdim=True)
    has_residual = residual_mass > RESIDUAL_MASS_EPS
    bonus_probs = torch.where(has_residual, residual / residual_mass.clamp_min(RESIDUAL_MASS_EPS), p_a)
    sampled_bonus = sample_from_probs(bonus_probs, generator)
    bonus = torch.where(greedy_mask, p_a.argmax(dim=-1), sampled_bonus)
    return AcceptResult(accepted=accepted, bonus=bonus)

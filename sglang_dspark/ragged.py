"""Ragged verification (experimental, ``SGLANG_DSPARK_RAGGED_VERIFY=1``): per-request verify lengths inside a
step's token budget.

Scheduled verification picks one width ``W`` per step on the host (``verify_width.WidthPlanner``), which fixes
the verify forward at ``bs * W`` tokens (its CUDA graph). Ragged verification keeps that budget but spends it
unevenly: after drafting, the ``bs * (W - 1)`` drafts with the highest calibrated prefix survival (over all
requests and positions) are verified, so request ``b`` verifies its first ``L_b`` drafts (``0 <= L_b <=
gamma``, ``sum L_b = bs (W - 1)``). Survival falls along a request's block, so the chosen drafts are each
request's prefix. The lengths depend on the drafts and the draft model only, never on the target, so the
verification stays exact (verifying fewer drafts is drafting fewer).

Layout: request ``b``'s ``1 + L_b`` rows (bonus, then its drafts) are packed one request after another into
the ``bs * W`` rows of the width-``W`` graph; attention gets the ragged ``qo_indptr`` on the device
(``RaggedVerifyInput``) while FlashInfer's host plan keeps ``W`` rows per request (one query tile per request
holds up to ``gamma + 1`` rows; the sync-free plan splits no KV). The target's outputs are gathered back to the
``[bs, gamma + 1]`` window (slots past ``L_b`` repeat row ``L_b``), where the usual acceptance runs over all
``gamma`` drafts and ``cap`` cuts it at ``L_b``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sglang_dspark.accept import TargetSampling, target_token_at

RAGGED_VERIFY_ENV = "SGLANG_DSPARK_RAGGED_VERIFY"


def ragged_lengths(survival: torch.Tensor, drafts: int) -> torch.Tensor:
    """survival float ``[bs, gamma]`` (non-increasing along each row), ``drafts`` to verify in all (``0..bs *
    gamma``) -> ``L`` int64 ``[bs]``: how many of the ``drafts`` highest survivals fall in each request's row.
    Counting (not taking positions) keeps each choice a prefix even where survivals tie."""
    bs, gamma = survival.shape
    chosen = survival.reshape(-1).topk(drafts, sorted=False).indices // gamma
    return torch.zeros((bs,), dtype=torch.int64, device=survival.device).scatter_add_(
        0, chosen, torch.ones_like(chosen)
    )


@dataclass(frozen=True)
class RaggedLayout:
    """Where each request's rows go in the packed verify forward."""

    order: torch.Tensor  # int64 [bs * W]: window slot (b * (gamma + 1) + j) of each packed row
    qo_indptr: torch.Tensor  # int32 [bs + 1]: first packed row of each request
    rows: torch.Tensor  # int32 [bs]: 1 + L_b
    window_rows: torch.Tensor  # int64 [bs, gamma + 1]: packed row of window slot j (j > L_b: row L_b)


def ragged_layout(lengths: torch.Tensor, gamma: int, width: int) -> RaggedLayout:
    """lengths ``L`` int64 ``[bs]`` with ``sum L = bs (width - 1)`` -> ``RaggedLayout`` of the ``bs * width``
    packed rows. Static shapes only (no host sync): a stable sort brings the verified window slots to the front,
    in window order."""
    bs = lengths.shape[0]
    slots = torch.arange(gamma + 1, device=lengths.device)
    skipped = slots[None, :] > lengths[:, None]  # [bs, gamma + 1]
    rows = lengths + 1
    qo_indptr = torch.zeros((bs + 1,), dtype=torch.int64, device=lengths.device)
    qo_indptr[1:] = torch.cumsum(rows, 0)
    return RaggedLayout(
        order=torch.sort(skipped.reshape(-1).to(torch.int8), stable=True).indices[: bs * width],
        qo_indptr=qo_indptr.to(torch.int32),
        rows=rows.to(torch.int32),
        window_rows=qo_indptr[:-1, None] + torch.minimum(slots[None, :], lengths[:, None]),
    )


def cap(
    accepted: torch.Tensor,
    bonus: torch.Tensor,
    lengths: torch.Tensor,
    logits: torch.Tensor,
    greedy: torch.Tensor,
    sampling: Optional[TargetSampling],
    bonus_u: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The outcome of verifying only the first ``L_b`` drafts, from the outcome over all ``gamma`` (accepted,
    bonus int64 ``[bs]``) computed on the window logits ``[bs, gamma + 1, V]``: a first rejection before
    ``L_b`` stands as it is; otherwise ``L_b`` drafts are accepted and the bonus is the target's own token
    at row ``L_b`` (argmax, or a sample of ``p`` with ``bonus_u``, a draw none of the kept decisions used)."""
    capped = accepted >= lengths
    own = target_token_at(logits, lengths, greedy, sampling, bonus_u)
    return torch.where(capped, lengths, accepted), torch.where(capped, own, bonus)

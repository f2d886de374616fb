"""Confidence-scheduled verification: how many drafts each request verifies this step (spec D).

Per request ``b`` and draft position ``k = 1..gamma`` the confidence head gives a logit ``c_{b,k}``;
``sigmoid(c_{b,k} / T_k)`` (``T_k`` optional STS temperatures) is the *conditional* probability that draft
``k`` is accepted given drafts ``1..k-1`` were (spec A.8). The survival
``s_{b,k} = prod_{j<=k} sigmoid(c_{b,j} / T_j)`` is the probability that drafts ``1..k`` are all accepted;
it is non-increasing in ``k``.

Request ``b`` verifying ``L_b`` drafts (``0..gamma``) puts ``L_b + 1`` tokens into the target's verify
forward (the anchor and ``L_b`` drafts) and commits ``1 + sum_{k<=L_b} s_{b,k}`` tokens in expectation (the
bonus token plus accepted drafts). With ``T = sum_b (L_b + 1)`` the step objective is::

    theta(L) = (bs + sum_b sum_{k<=L_b} s_{b,k}) / (draft_ms + verify_ms(T))      [tokens / ms]

Since ``s`` is non-increasing per request, the best set of ``m`` admitted (request, position) pairs is the
top ``m`` survivals of the whole batch, and it is prefix-shaped per request. So one sort, one cumulative
sum and one evaluation of ``theta`` for every ``m`` give the plan. Ties rank by position, then request
(a request's ``k`` always before its ``k + 1``, and equal survivals are spread over requests).

Two searches over ``m``:

* ``"causal"`` (default; the paper's Algorithm 1): stop at the first ``m`` where admitting the next
  candidate does not raise ``theta``. Whether draft ``k`` of request ``b`` is verified then depends only on
  survivals that rank at or above ``s_{b,k}``, never on ``s_{b,k+1..}``, which the confidence head computes
  from ``x_{b,k}`` itself: the schedule does not look at the token it admits, so rejection sampling stays
  lossless (spec D.1). Optimal when ``theta`` is unimodal in ``m``.
* ``"global"``: the argmax over all ``m`` (exact optimum, steps over cost cliffs). It looks at later
  survivals to decide the budget, so it is only lossless for greedy requests (any verify length is) or
  when the budget comes from older confidences (spec D.2): compute it with ``plan_verify_budget`` on the
  confidences of a previous step and allocate it with ``allocate_verify_lengths`` on the current ones.

CUDA-graph buckets: with ``buckets`` (allowed total token counts, ascending) the verify forward is padded
up to the next bucket anyway, so the cost is evaluated at the bucketed total and the padding is filled with
the next-best candidates (padding is not wasted). Totals above the last bucket are costed as they are.

Everything here is graph-safe: no ``.item()``/``.tolist()``, no branches on tensor values, output shapes
depend only on ``bs``, ``gamma``, ``min_len`` and ``max_len`` (Python ints).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch

from sglang_dspark.cost_profile import CostTensors

Search = Literal["causal", "global"]


class VerifyPlan(NamedTuple):
    lengths: torch.Tensor  # int64 [bs]: drafts verified per request, min_len..max_len (tokens: lengths + 1)
    total_tokens: torch.Tensor  # int64 []: sum(lengths + 1)
    expected_tokens: torch.Tensor  # float32 []: bs + sum of the admitted survivals
    step_ms: torch.Tensor  # float32 []: draft_ms + verify_ms(bucketed total_tokens)


def survival_from_logits(confidence_logits: torch.Tensor, temperatures: torch.Tensor | None = None) -> torch.Tensor:
    """``s_{b,k} = prod_{j<=k} sigmoid(c_{b,j} / T_j)``: logits ``[bs, gamma]`` (any float), optional STS
    temperatures ``[gamma]`` -> float32 ``[bs, gamma]``, non-increasing along ``gamma``."""
    logits = confidence_logits.float()
    if temperatures is not None:
        logits = logits / temperatures.float()
    return torch.sigmoid(logits).cumprod(dim=-1)


def round_up_to_buckets(total_tokens: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """The smallest bucket ``>= total_tokens`` (any shape, int64), or ``total_tokens`` itself above the
    last bucket. ``buckets``: int64 ``[n]`` ascending."""
    index = torch.searchsorted(buckets, total_tokens).clamp(max=buckets.numel() - 1)
    # .take, not [index]: indexing with a 0-dim tensor would copy it to the host
    bucket = buckets.take(index)
    return torch.where(bucket >= total_tokens, bucket, total_tokens)


def _check_lengths(gamma: int, min_len: int, max_len: int | None) -> int:
    max_len = gamma if max_len is None else max_len
    if not 0 <= min_len <= max_len <= gamma:
        raise ValueError(f"verify_schedule: need 0 <= min_len <= max_len <= gamma={gamma}, got {min_len}, {max_len}")
    return max_len


def _ranked(survival: torch.Tensor, min_len: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank all ``bs * gamma`` candidates: forced ones (position ``<= min_len``) first, then by survival
    descending, excluded ones (position ``> max_len``) last; ties by position, then request.

    Returns (order int64 ``[bs * gamma]``: candidate indices into the position-major flattening
    ``survival.t().reshape(-1)``, best first; values float32 ``[bs * gamma]``: their survivals).
    """
    bs, gamma = survival.shape
    flat = survival.t().reshape(-1)  # position-major: index = (k - 1) * bs + b
    position = torch.arange(gamma, device=survival.device)[:, None].expand(gamma, bs).reshape(-1)
    key = torch.where(position < min_len, 2.0, torch.where(position >= max_len, -1.0, flat))
    order = torch.sort(key, descending=True, stable=True).indices
    return order, flat[order]


def _take_top(order: torch.Tensor, m: torch.Tensor, bs: int, gamma: int) -> torch.Tensor:
    """Lengths int64 ``[bs]``: per request, how many of the first ``m`` candidates of ``order`` are its."""
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return (rank < m).view(gamma, bs).sum(dim=0)


def _search(
    values: torch.Tensor,
    bs: int,
    min_len: int,
    max_len: int,
    cost: CostTensors,
    draft_ms: float | torch.Tensor | None,
    buckets: torch.Tensor | None,
    search: Search,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best number ``m`` of admitted drafts given ranked survivals ``values`` ``[bs * gamma]``.

    Returns (m int64 [], expected tokens float32 [], step ms float32 [])."""
    if search not in ("causal", "global"):
        raise ValueError(f"verify_schedule: search must be 'causal' or 'global', got {search!r}")
    forced, candidates = bs * min_len, bs * max_len
    device = values.device
    gains = torch.cat([values.new_zeros(1), values[:candidates].cumsum(0)])  # [candidates + 1]
    counts = torch.arange(forced, candidates + 1, device=device)  # admitted drafts m
    totals = counts + bs
    billed = totals if buckets is None else round_up_to_buckets(totals, buckets)
    if draft_ms is None:
        draft_ms = cost.draft_ms(torch.full((), bs, dtype=torch.float32, device=device))
    step_ms = draft_ms + cost.verify_ms(billed)
    theta = (bs + gains[forced:]) / step_ms
    if search == "global":
        best = torch.argmax(theta)
    else:  # first m whose next candidate does not improve theta (the last m if every one does)
        stops = torch.cat([theta[1:] <= theta[:-1], torch.ones(1, dtype=torch.bool, device=device)])
        best = torch.argmax(stops.to(torch.int32))
    m = counts.take(best)
    if buckets is not None:  # the forward is padded to the bucket anyway: fill it with the next candidates
        m = torch.minimum(round_up_to_buckets(m + bs, buckets) - bs, torch.full_like(m, candidates))
    return m, bs + gains.take(m), step_ms.take(best)


def _as_buckets(buckets: torch.Tensor | Sequence[int] | None, device: torch.device) -> torch.Tensor | None:
    if buckets is None or isinstance(buckets, torch.Tensor):
        return buckets
    return torch.tensor(sorted(buckets), dtype=torch.int64, device=device)


def plan_verify_budget(
    survival: torch.Tensor,
    cost: CostTensors,
    draft_ms: float | torch.Tensor | None = None,
    min_len: int = 0,
    max_len: int | None = None,
    *,
    buckets: torch.Tensor | Sequence[int] | None = None,
    search: Search = "causal",
) -> torch.Tensor:
    """Total drafts to verify for a batch with survivals ``[bs, gamma]`` -> int64 ``[]`` in
    ``bs * min_len .. bs * max_len`` (tokens: budget + bs). For the lagged-budget scheme: run it on the
    survivals of an earlier step (rows of requests that are new since: survival 1), copy the result to the
    host without blocking, and pass it to ``allocate_verify_lengths`` with the current survivals."""
    bs, gamma = survival.shape
    max_len = _check_lengths(gamma, min_len, max_len)
    _, values = _ranked(survival, min_len, max_len)
    buckets = _as_buckets(buckets, survival.device)
    return _search(values, bs, min_len, max_len, cost, draft_ms, buckets, search)[0]


def allocate_verify_lengths(
    survival: torch.Tensor, budget: int | torch.Tensor, min_len: int = 0, max_len: int | None = None
) -> torch.Tensor:
    """Give ``budget`` drafts (clamped to ``bs * min_len .. bs * max_len``) to the top survivals.

    survival float ``[bs, gamma]``; budget int or int64 ``[]`` (on the device inside a CUDA graph: a Python
    int is baked into a captured graph) -> lengths int64 ``[bs]`` in
    ``min_len..max_len``, summing to the clamped budget. Prefix-shaped: request ``b`` gets its first
    ``lengths[b]`` drafts. Whether draft ``k`` is selected depends only on survivals ranked above it."""
    bs, gamma = survival.shape
    max_len = _check_lengths(gamma, min_len, max_len)
    order, _ = _ranked(survival, min_len, max_len)
    if isinstance(budget, torch.Tensor):
        budget = budget.to(device=survival.device, dtype=torch.int64)
    else:  # a fill, not a host-to-device copy
        budget = torch.full((), int(budget), dtype=torch.int64, device=survival.device)
    budget = budget.clamp(bs * min_len, bs * max_len)
    return _take_top(order, budget, bs, gamma)


def plan_verify_lengths(
    confidence_logits: torch.Tensor,
    cost: CostTensors,
    draft_ms: float | torch.Tensor | None = None,
    min_len: int = 0,
    max_len: int | None = None,
    *,
    temperatures: torch.Tensor | None = None,
    buckets: torch.Tensor | Sequence[int] | None = None,
    search: Search = "causal",
) -> VerifyPlan:
    """Verify lengths maximising expected committed tokens per ms for this step's confidences.

    confidence_logits float ``[bs, gamma]`` (``DraftBlock.confidence_logits``); cost: ``CostProfile.tensors``
    on the same device; draft_ms: ms of this step's draft pass (float or float32 ``[]``; None: from the
    profile's draft curve at ``bs``); ``min_len``/``max_len``: bounds on every request's length
    (``min_len = max_len = gamma`` forces full verification); temperatures: STS ``[gamma]`` or None;
    buckets: allowed verify totals (pass a device tensor inside a CUDA graph; a list is copied to the
    device); search: ``"causal"`` (lossless with sampling) or ``"global"`` (see the module docstring).
    """
    bs, gamma = confidence_logits.shape
    max_len = _check_lengths(gamma, min_len, max_len)
    survival = survival_from_logits(confidence_logits, temperatures)
    order, values = _ranked(survival, min_len, max_len)
    buckets = _as_buckets(buckets, survival.device)
    m, expected, step_ms = _search(values, bs, min_len, max_len, cost, draft_ms, buckets, search)
    return VerifyPlan(_take_top(order, m, bs, gamma), m + bs, expected, step_ms)

"""Probability processing for the target and the drafter, as SGLang applies it.

Target side (per request): ``p = softmax(logits / temperature)``, then top-k renormalisation, then
top-p renormalisation of the top-k-renormalised distribution. A request is *greedy* when
``temperature == 0`` or ``top_k == 1``; its "distribution" is the one-hot of ``argmax(logits)``, so
the greedy and sampled acceptance rules see the same tensors.

Draft side: ``q = softmax(Z / temperature)`` over the full vocabulary (no top-k / top-p), or the
one-hot of ``argmax(Z)`` for greedy requests.

Conventions: ``top_k <= 0`` or ``top_k >= V`` disables top-k; ``top_p >= 1`` disables top-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters of one request."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


@dataclass(frozen=True)
class SamplingBatch:
    """Per-request sampling parameters of a batch: each field is ``[bs]``."""

    temperature: torch.Tensor  # float32 [bs]
    top_k: torch.Tensor  # int64 [bs]
    top_p: torch.Tensor  # float32 [bs]

    @staticmethod
    def stack(params: list[SamplingParams]) -> "SamplingBatch":
        return SamplingBatch(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32),
        )

    @staticmethod
    def repeat(params: SamplingParams, bs: int) -> "SamplingBatch":
        return SamplingBatch.stack([params] * bs)

    @property
    def batch_size(self) -> int:
        return int(self.temperature.shape[0])

    def greedy_mask(self) -> torch.Tensor:
        """``[bs]`` bool: requests decoded greedily (temperature 0 or top_k 1)."""
        return (self.temperature <= 0.0) | (self.top_k == 1)

    def select(self, rows: torch.Tensor) -> "SamplingBatch":
        """The parameters of batch ``rows`` (int64 ``[n]``, any device)."""
        rows = rows.to(self.temperature.device)
        return SamplingBatch(self.temperature[rows], self.top_k[rows], self.top_p[rows])


def _expand_rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-request ``[bs]`` tensor over the middle dims of ``like`` ``[bs, ..., V]``."""
    return values.view(values.shape[0], *([1] * (like.dim() - 1))).to(like.device)


def _one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` -> one-hot of the argmax, float32 ``[..., V]``."""
    out = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    return out.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)


def top_k_renorm(probs: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep the ``top_k[b]`` most likely tokens of each row and renormalise.

    probs: ``[bs, ..., V]``; top_k: ``[bs]`` (``<= 0`` or ``>= V`` keeps everything).
    """
    vocab = probs.shape[-1]
    k = torch.where((top_k <= 0) | (top_k > vocab), torch.full_like(top_k, vocab), top_k)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=probs.device)
    sorted_probs = sorted_probs * (ranks < _expand_rows(k, probs))
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def top_p_renorm(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest prefix of each sorted row whose mass reaches ``top_p[b]`` (at least one token).

    probs: ``[bs, ..., V]``; top_p: ``[bs]`` (``>= 1`` keeps everything).
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep = mass_before < _expand_rows(top_p, probs)
    keep[..., 0] = True
    sorted_probs = sorted_probs * keep
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def target_probs(logits: torch.Tensor, sampling: SamplingBatch) -> torch.Tensor:
    """Target distributions: logits ``[bs, ..., V]`` -> float32 probs ``[bs, ..., V]``.

    Sampled rows: softmax(logits / T) -> top-k renorm -> top-p renorm. Greedy rows: one-hot argmax.
    """
    logits = logits.float()
    greedy = _expand_rows(sampling.greedy_mask(), logits)
    temperature = torch.where(sampling.temperature > 0, sampling.temperature, 1.0)
    probs = torch.softmax(logits / _expand_rows(temperature, logits), dim=-1)
    if bool(((sampling.top_k > 0) & (sampling.top_k < logits.shape[-1])).any()):
        probs = top_k_renorm(probs, sampling.top_k)
    if bool((sampling.top_p < 1.0).any()):
        probs = top_p_renorm(probs, sampling.top_p)
    return torch.where(greedy, _one_hot_argmax(logits), probs)


def draft_probs(logits: torch.Tensor, sampling: SamplingBatch) -> torch.Tensor:
    """Draft distributions: corrected logits Z ``[bs, ..., V]`` -> float32 q ``[bs, ..., V]``.

    Sampled rows: softmax(Z / T) over the full vocabulary. Greedy rows: one-hot argmax.
    """
    logits = logits.float()
    greedy = _expand_rows(sampling.greedy_mask(), logits)
    temperature = torch.where(sampling.temperature > 0, sampling.temperature, 1.0)
    probs = torch.softmax(logits / _expand_rows(temperature, logits), dim=-1)
    return torch.where(greedy, _one_hot_argmax(logits), probs)


def sample_from_probs(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row: probs ``[N, V]`` -> int64 ``[N]``."""
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def choose_tokens(
    logits: torch.Tensor,
    probs: torch.Tensor,
    sampling: SamplingBatch,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Greedy rows take ``argmax(logits)``, the others sample ``probs``.

    logits, probs: ``[bs, V]`` -> int64 ``[bs]``. No random numbers are drawn for an all-greedy batch.
    """
    greedy = sampling.greedy_mask().to(logits.device)
    argmax = logits.argmax(dim=-1)
    if bool(greedy.all()):
        return argmax
    return torch.where(greedy, argmax, sample_from_probs(probs, generator))


def sample_target(
    logits: torch.Tensor, sampling: SamplingBatch, generator: torch.Generator | None
) -> torch.Tensor:
    """Sample the next token from target logits ``[bs, V]`` -> ``[bs]`` (SGLang's processing)."""
    return choose_tokens(logits, target_probs(logits, sampling), sampling, generator)

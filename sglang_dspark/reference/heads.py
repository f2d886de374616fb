"""DSpark sequential heads: the Markov logit-bias heads and the confidence head (spec A.7, A.8).

Notation: draft position ``k = 1..gamma`` reads the final-normed backbone hidden ``h_k`` ``[bs, d]``
(block slot ``k - 1``) and the previous token ``x_{k-1}`` (``x_0`` = the anchor), with
``e_k = W1[x_{k-1}]`` ``[bs, r]``. A Markov head returns the bias ``B_k`` ``[bs, V]`` added to the base
logits ``U_k``; the corrected logits are ``Z_k = U_k + B_k``.

Tensor names (a checkpoint loads into these with ``strict=True``):
``markov_head.markov_w1.weight [V, r]``, ``markov_head.markov_w2.weight [V, r]``,
gated ``markov_head.gate_proj.{weight [r, d + r], bias [r]}``,
rnn ``markov_head.joint_proj.{weight [3r, 2r + d], bias [3r]}``,
``confidence_head.proj.{weight [1, d (+ r)], bias [1]}``.
"""

from __future__ import annotations

import torch
from torch import nn

from sglang_dspark.config import MARKOV_HEAD_TYPES, DSparkConfig


class MarkovHead(nn.Module):
    """Low-rank bigram tables shared by every Markov head: ``W1`` (Embedding V -> r), ``W2`` (r -> V)."""

    def __init__(self, vocab_size: int, rank: int) -> None:
        super().__init__()
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, vocab_size, bias=False)

    @property
    def rank(self) -> int:
        return self.markov_w1.embedding_dim

    def token_features(self, prev_tokens: torch.Tensor) -> torch.Tensor:
        """``e_k = W1[x_{k-1}]``: int64 ``[bs]`` -> ``[bs, r]``."""
        return self.markov_w1(prev_tokens)

    def initial_state(self, batch_size: int, like: torch.Tensor) -> torch.Tensor | None:
        """Recurrent state at the start of a block (``None`` for stateless heads)."""
        return None

    def step(
        self, prev_tokens: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One draft position: prev_tokens ``[bs]``, hidden ``h_k`` ``[bs, d]``, state ``[bs, r]`` or None
        -> (bias ``B_k`` ``[bs, V]``, next state)."""
        raise NotImplementedError(f"{type(self).__name__} must implement step()")


class VanillaMarkovHead(MarkovHead):
    """``B_k = W2 e_k`` (a rank-r bigram ``W2 W1^T``)."""

    def step(
        self, prev_tokens: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.markov_w2(self.token_features(prev_tokens)), None


class GatedMarkovHead(MarkovHead):
    """``g_k = sigmoid(W_g [h_k ; e_k] + b_g)``, ``B_k = W2 (g_k * e_k)``."""

    def __init__(self, vocab_size: int, rank: int, hidden_size: int) -> None:
        super().__init__(vocab_size, rank)
        self.gate_proj = nn.Linear(hidden_size + rank, rank, bias=True)

    def step(
        self, prev_tokens: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        e = self.token_features(prev_tokens)
        gate = torch.sigmoid(self.gate_proj(torch.cat([hidden, e], dim=-1)))
        return self.markov_w2(gate * e), None


class RNNMarkovHead(MarkovHead):
    """Gated recurrence carried across the block (state reset to 0 per block).

    ``z_k = [s_{k-1} ; e_k ; h_k]``, ``[a_g, a_c, a_o] = split3(W_j z_k + b_j)``,
    ``s_k = sigmoid(a_g) * s_{k-1} + (1 - sigmoid(a_g)) * tanh(a_c)``, ``B_k = W2 tanh(a_o)``
    (the output branch uses ``z_k``, i.e. ``s_{k-1}``, not ``s_k``).
    """

    def __init__(self, vocab_size: int, rank: int, hidden_size: int) -> None:
        super().__init__(vocab_size, rank)
        self.joint_proj = nn.Linear(2 * rank + hidden_size, 3 * rank, bias=True)

    def initial_state(self, batch_size: int, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros(batch_size, self.rank, dtype=like.dtype, device=like.device)

    def step(
        self, prev_tokens: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        e = self.token_features(prev_tokens)
        a_gate, a_cand, a_out = self.joint_proj(torch.cat([state, e, hidden], dim=-1)).chunk(3, dim=-1)
        gate = torch.sigmoid(a_gate)
        next_state = gate * state + (1.0 - gate) * torch.tanh(a_cand)
        return self.markov_w2(torch.tanh(a_out)), next_state


class ConfidenceHead(nn.Module):
    """Acceptance-rate predictor: ``c_k = proj([h_k ; e_k])`` (or ``proj(h_k)``), a logit per position."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, 1, bias=True)

    def forward(self, hidden: torch.Tensor, token_features: torch.Tensor | None) -> torch.Tensor:
        """hidden ``[..., d]``, token_features ``[..., r]`` or None -> confidence logits ``[...]``."""
        x = hidden if token_features is None else torch.cat([hidden, token_features], dim=-1)
        if x.shape[-1] != self.proj.in_features:
            raise ValueError(
                f"heads.py: confidence_head.proj expects {self.proj.in_features} input features, "
                f"found {x.shape[-1]} (hidden {hidden.shape[-1]}"
                f"{'' if token_features is None else f' + markov {token_features.shape[-1]}'})"
            )
        return self.proj(x).squeeze(-1)


def build_markov_head(config: DSparkConfig) -> MarkovHead | None:
    """The Markov head of ``config`` (None when ``markov_rank == 0``: no bias, the DFlash ablation)."""
    if config.markov_rank == 0:
        return None
    if config.markov_head_type not in MARKOV_HEAD_TYPES:
        raise ValueError(
            f"heads.py: markov_head_type must be one of {MARKOV_HEAD_TYPES}, found {config.markov_head_type!r}"
        )
    vocab, rank, hidden = config.vocab_size, config.markov_rank, config.hidden_size
    if config.markov_head_type == "vanilla":
        return VanillaMarkovHead(vocab, rank)
    if config.markov_head_type == "gated":
        return GatedMarkovHead(vocab, rank, hidden)
    return RNNMarkovHead(vocab, rank, hidden)


def build_confidence_head(config: DSparkConfig) -> ConfidenceHead | None:
    """The confidence head of ``config`` (None when ``enable_confidence_head`` is false)."""
    if not config.enable_confidence_head:
        return None
    return ConfidenceHead(config.confidence_in_features)

"""The DSpark drafter in plain PyTorch (spec sections A and C): the oracle the SGLang model is tested against.

One block of ``gamma`` slots ``[anchor, mask x (gamma - 1)]`` at positions ``P..P+gamma-1`` runs through
the non-causal backbone in ONE pass; every slot attends to the cached draft context (positions ``< P``)
and to all block slots. The Markov head then samples the block left to right; the confidence head
scores each position.

Draft context: for each committed position ``p`` with captured target features ``T_p`` ``[S*d]``,
``c_p = hidden_norm(fc(T_p))``; each layer caches ``K_p = RoPE_p(k_norm(k_proj(c_p)))`` and
``V_p = v_proj(c_p)`` in a ``ContextKVCache``. The target's embedding and lm_head weights are passed in,
they are not part of this module.

``state_dict()`` keys are the canonical DeepSpec names (``fc.weight``, ``hidden_norm.weight``,
``norm.weight``, ``layers.{i}.*``, ``markov_head.*``, ``confidence_head.*``), so a checkpoint loads with
``load_state_dict(strict=True)``. Math runs in the module's dtype with RMSNorm, RoPE and the attention
softmax in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sglang_dspark.config import DSparkConfig
from sglang_dspark.reference.heads import build_confidence_head, build_markov_head
from sglang_dspark.reference.sampling import SamplingBatch, choose_tokens, draft_probs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox RoPE tables: positions int64 ``[n]`` -> (cos, sin), each float32 ``[n, head_dim]``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :].to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x ``[bs, n, heads, head_dim]``, cos/sin ``[n, head_dim]`` -> same shape as x."""
    x32 = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x32 * cos + rotated * sin).to(x.dtype)


class ContextKVCache:
    """Per-layer draft context K/V of committed positions ``0..P-1``.

    ``keys[l]``, ``values[l]``: ``[bs, P, num_kv_heads, head_dim]`` (keys are normed and rotated). Only
    committed positions are ever appended; block K/V never enter the cache.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys = keys
        self.values = values

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[1])

    @property
    def batch_size(self) -> int:
        return int(self.keys[0].shape[0])

    def append(self, new_keys: list[torch.Tensor], new_values: list[torch.Tensor]) -> None:
        """Append rows ``[bs, n, kv_heads, head_dim]`` per layer."""
        self.keys = [torch.cat([k, nk], dim=1) for k, nk in zip(self.keys, new_keys)]
        self.values = [torch.cat([v, nv], dim=1) for v, nv in zip(self.values, new_values)]

    def select(self, rows: torch.Tensor | None) -> "ContextKVCache":
        """A cache holding the given batch rows (int64 ``[n]``, repeats allowed; None = all rows)."""
        if rows is None:
            return ContextKVCache(list(self.keys), list(self.values))
        return ContextKVCache([k[rows] for k in self.keys], [v[rows] for v in self.values])


class DSparkAttention(nn.Module):
    """Qwen3 attention with q/k RMSNorm and neox RoPE, non-causal over [context ; block] (GQA)."""

    def __init__(self, config: DSparkConfig) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"drafter.py: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        self.head_dim = hd
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=config.attention_bias)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def key_value(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[bs, n, d]`` -> (K ``[bs, n, kv_heads, hd]`` normed + rotated, V ``[bs, n, kv_heads, hd]``)."""
        bs, n, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(bs, n, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(bs, n, self.num_kv_heads, self.head_dim)
        return apply_rope(k, cos, sin), v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        context_k: torch.Tensor,
        context_v: torch.Tensor,
    ) -> torch.Tensor:
        """x ``[bs, g, d]`` (normed block), cos/sin ``[g, hd]``, context K/V ``[bs, P, kv_heads, hd]``
        -> ``[bs, g, d]``."""
        bs, g, _ = x.shape
        group = self.num_heads // self.num_kv_heads
        q = apply_rope(self.q_norm(self.q_proj(x).view(bs, g, self.num_heads, self.head_dim)), cos, sin)
        block_k, block_v = self.key_value(x, cos, sin)
        k = torch.cat([context_k, block_k], dim=1).float()  # [bs, P+g, kv, hd]
        v = torch.cat([context_v, block_v], dim=1).float()
        q = q.float().view(bs, g, self.num_kv_heads, group, self.head_dim)  # head h -> kv head h // group
        scores = torch.einsum("bqkgd,bskd->bkgqs", q, k) / math.sqrt(self.head_dim)
        out = torch.einsum("bkgqs,bskd->bqkgd", torch.softmax(scores, dim=-1), v)
        return self.o_proj(out.reshape(bs, g, self.num_heads * self.head_dim).to(x.dtype))


class DSparkMLP(nn.Module):
    def __init__(self, config: DSparkConfig) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"drafter.py: hidden_act must be 'silu', found {config.hidden_act!r}")
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DSparkDecoderLayer(nn.Module):
    def __init__(self, config: DSparkConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DSparkAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DSparkMLP(config)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        context_k: torch.Tensor,
        context_v: torch.Tensor,
    ) -> torch.Tensor:
        """h ``[bs, g, d]``, cos/sin ``[g, hd]``, context K/V ``[bs, P, kv_heads, hd]`` -> ``[bs, g, d]``."""
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, context_k, context_v)
        return h + self.mlp(self.post_attention_layernorm(h))


@dataclass(frozen=True)
class DraftProposal:
    tokens: torch.Tensor  # int64 [bs, gamma]: x_1..x_gamma
    probs: torch.Tensor  # float32 [bs, gamma, V]: q_k each x_k was drawn from (one-hot for greedy rows)
    confidence_logits: torch.Tensor | None  # float32 [bs, gamma]; None without a confidence head


class DSparkDrafter(nn.Module):
    """DSpark block drafter (backbone + Markov head + confidence head) with random init."""

    def __init__(
        self,
        config: DSparkConfig,
        dtype: torch.dtype = torch.float32,
        init_std: float = 0.02,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.fc = nn.Linear(config.num_context_features, d, bias=False)
        self.hidden_norm = RMSNorm(d, config.rms_norm_eps)
        self.layers = nn.ModuleList(DSparkDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.markov_head = build_markov_head(config)
        self.confidence_head = build_confidence_head(config)
        self._init_weights(init_std, generator)
        self.to(dtype)

    def _init_weights(self, std: float, generator: torch.Generator | None) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    # ---- draft context -------------------------------------------------------------------------

    def new_context_cache(self, batch_size: int) -> ContextKVCache:
        """An empty context cache (P = 0) for ``batch_size`` requests."""
        c = self.config
        empty = torch.zeros(
            batch_size, 0, c.num_key_value_heads, c.head_dim, dtype=self.dtype, device=self.fc.weight.device
        )
        n = c.num_hidden_layers
        return ContextKVCache([empty] * n, [empty] * n)

    def project_context(self, features: torch.Tensor) -> torch.Tensor:
        """``c = hidden_norm(fc(T))``: captured target features ``[bs, n, S*d]`` -> ``[bs, n, d]``."""
        if features.shape[-1] != self.config.num_context_features:
            raise ValueError(
                f"drafter.py: context features must have S*d = {self.config.num_context_features} "
                f"columns (target_layer_ids {list(self.config.target_layer_ids)}), found {features.shape[-1]}"
            )
        return self.hidden_norm(self.fc(features.to(self.dtype)))

    @torch.no_grad()
    def extend_context(self, cache: ContextKVCache, features: torch.Tensor, start: int) -> None:
        """Append the K/V of committed positions ``start..start+n-1`` (features ``[bs, n, S*d]``) to ``cache``."""
        if start != cache.length:
            raise ValueError(f"drafter.py: context rows must be appended at P = {cache.length}, found start {start}")
        c = self.project_context(features)
        positions = torch.arange(start, start + c.shape[1], device=c.device)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        kvs = [layer.self_attn.key_value(c, cos, sin) for layer in self.layers]
        cache.append([k for k, _ in kvs], [v for _, v in kvs])

    # ---- block ----------------------------------------------------------------------------------

    def backbone(self, block_embeds: torch.Tensor, cache: ContextKVCache) -> torch.Tensor:
        """One non-causal pass over the block at positions ``P..P+g-1`` (``P = cache.length``).

        block_embeds ``[bs, g, d]`` -> final-normed hidden states H ``[bs, g, d]``.
        """
        g = block_embeds.shape[1]
        positions = torch.arange(cache.length, cache.length + g, device=block_embeds.device)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        h = block_embeds.to(self.dtype)
        for layer, k, v in zip(self.layers, cache.keys, cache.values):
            h = layer(h, cos, sin, k, v)
        return self.norm(h)

    def base_logits(self, hidden: torch.Tensor, lm_head_weight: torch.Tensor) -> torch.Tensor:
        """``U = H W_lm^T``: hidden ``[..., d]``, target lm_head ``[V, d]`` -> float32 ``[..., V]``."""
        return (hidden @ lm_head_weight.to(self.dtype).T).float()

    @torch.no_grad()
    def propose(
        self,
        anchor: torch.Tensor,
        cache: ContextKVCache,
        embed_weight: torch.Tensor,
        lm_head_weight: torch.Tensor,
        gamma: int,
        sampling: SamplingBatch,
        generator: torch.Generator | None = None,
    ) -> DraftProposal:
        """Draft one block for each request.

        anchor int64 ``[bs]`` (the pending bonus token at position P), cache with P rows,
        target embed/lm_head ``[V, d]``. ONE backbone pass over ``[anchor, mask x (gamma-1)]``, then
        sequential sampling ``Z_k = U_k + B_k``, ``x_k = argmax Z_k`` (greedy) or ``x_k ~ softmax(Z_k / T)``.
        """
        c = self.config
        if not 1 <= gamma <= c.block_size:
            raise ValueError(f"drafter.py: gamma must be in [1, block_size={c.block_size}], found {gamma}")
        for name, weight in (("embed_tokens", embed_weight), ("lm_head", lm_head_weight)):
            if tuple(weight.shape) != (c.vocab_size, c.hidden_size):
                raise ValueError(
                    f"drafter.py: target {name}.weight must be [{c.vocab_size}, {c.hidden_size}], "
                    f"found {tuple(weight.shape)}"
                )
        bs = anchor.shape[0]
        block_ids = torch.full((bs, gamma), c.mask_token_id, dtype=torch.int64, device=anchor.device)
        block_ids[:, 0] = anchor
        hidden = self.backbone(F.embedding(block_ids, embed_weight), cache)  # [bs, g, d]
        base = self.base_logits(hidden, lm_head_weight)  # [bs, g, V]

        use_markov_features = self.confidence_head is not None and c.confidence_in_features > c.hidden_size
        state = None if self.markov_head is None else self.markov_head.initial_state(bs, hidden)
        prev = anchor
        tokens, probs, confidence = [], [], []
        for k in range(gamma):
            h_k = hidden[:, k]
            logits = base[:, k]
            if self.markov_head is not None:
                bias, state = self.markov_head.step(prev, h_k, state)
                logits = logits + bias.float()
            if self.confidence_head is not None:
                features = self.markov_head.token_features(prev) if use_markov_features else None
                confidence.append(self.confidence_head(h_k, features).float())
            q = draft_probs(logits, sampling)
            prev = choose_tokens(logits, q, sampling, generator)
            tokens.append(prev)
            probs.append(q)
        return DraftProposal(
            tokens=torch.stack(tokens, dim=1),
            probs=torch.stack(probs, dim=1),
            confidence_logits=torch.stack(confidence, dim=1) if confidence else None,
        )

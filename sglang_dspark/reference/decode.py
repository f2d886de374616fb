"""Speculative decoding with a DSpark drafter and a Hugging Face ``Qwen3ForCausalLM`` target (spec C).

State of a batch of requests (``SpecState``): all rows have the same number ``P`` of committed tokens
(their contents may differ). Committed tokens have target KV (HF ``DynamicCache``) and draft context K/V
(``ContextKVCache``); the pending bonus token ``x_0`` (the anchor, position ``P``) has neither.

One step (``speculative_step``): the drafter proposes ``x_1..x_gamma`` (one backbone pass + sequential
Markov sampling), the target verifies ``[x_0, x_1..x_gamma]`` at positions ``P..P+gamma`` in one forward
(capturing the ``target_layer_ids`` hidden states, layer id ``i`` = HF ``hidden_states[i + 1]``), and
``accept.accept_drafts`` decides ``a`` and the bonus ``y``. ``commit`` then keeps target KV for positions
``P..P+a``, appends draft context for those positions from the verify features, and makes ``y`` the new
anchor: ``P <- P + a + 1``. Rows that accepted different counts end with different lengths, so ``commit``
returns one state per distinct ``a``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from sglang_dspark.reference.accept import accept_drafts
from sglang_dspark.reference.drafter import ContextKVCache, DSparkDrafter
from sglang_dspark.reference.sampling import SamplingBatch, SamplingParams, sample_target, target_probs

logger = logging.getLogger("sglang_dspark")


@dataclass
class SpecState:
    """A batch of requests with ``length`` = P committed tokens each."""

    target_cache: DynamicCache  # target KV of positions 0..P-1, [bs] rows
    draft_cache: ContextKVCache  # draft context K/V of positions 0..P-1, [bs] rows
    anchor: torch.Tensor  # int64 [bs]: pending bonus token x_0 at position P
    length: int  # P
    sampling: SamplingBatch

    @property
    def batch_size(self) -> int:
        return int(self.anchor.shape[0])


@dataclass(frozen=True)
class StepOutput:
    draft_tokens: torch.Tensor  # int64 [bs, gamma]
    accepted: torch.Tensor  # int64 [bs]: a
    bonus: torch.Tensor  # int64 [bs]: y
    confidence_logits: torch.Tensor | None  # float32 [bs, gamma]
    verify_features: torch.Tensor  # [bs, gamma + 1, S*d]: captured target features of positions P..P+gamma

    def emitted(self, row: int) -> list[int]:
        """Tokens request ``row`` emits this step: ``x_1..x_a, y``."""
        a = int(self.accepted[row])
        return self.draft_tokens[row, :a].tolist() + [int(self.bonus[row])]


@dataclass
class SpecDecodeResult:
    tokens: list[int]  # emitted tokens, starting with the prefill's bonus token
    committed_per_step: list[int]  # a + 1 per speculative step (bonus included)
    accepted_per_position: list[int]  # [gamma]: steps whose draft at this position was accepted
    proposed_per_position: list[int]  # [gamma]: steps that proposed a draft at this position
    confidence_logits: list[torch.Tensor] = field(default_factory=list)  # one [gamma] per step, if any

    @property
    def mean_committed(self) -> float:
        return sum(self.committed_per_step) / max(len(self.committed_per_step), 1)


def _check_pair(target: PreTrainedModel, drafter: DSparkDrafter) -> None:
    cfg, tcfg = drafter.config, target.config
    if cfg.hidden_size != tcfg.hidden_size or cfg.vocab_size != tcfg.vocab_size:
        raise ValueError(
            f"decode.py: drafter hidden_size/vocab_size {cfg.hidden_size}/{cfg.vocab_size} must equal the "
            f"target's {tcfg.hidden_size}/{tcfg.vocab_size}"
        )
    last = tcfg.num_hidden_layers - 1
    bad = [i for i in cfg.target_layer_ids if not 0 <= i < last]
    if bad:
        raise ValueError(
            f"decode.py: target_layer_ids {list(cfg.target_layer_ids)} must lie in [0, {last}) for a "
            f"{tcfg.num_hidden_layers}-layer target (the last layer's HF output is final-normed); found {bad}"
        )


def capture_features(hidden_states: tuple[torch.Tensor, ...], layer_ids: tuple[int, ...]) -> torch.Tensor:
    """Concatenate the outputs of decoder layers ``layer_ids`` (HF ``hidden_states[i + 1]``): -> ``[bs, n, S*d]``."""
    return torch.cat([hidden_states[i + 1] for i in layer_ids], dim=-1)


def _target_forward(target: PreTrainedModel, input_ids: torch.Tensor, cache: DynamicCache):
    return target(input_ids=input_ids, past_key_values=cache, use_cache=True, output_hidden_states=True)


def _select_target_cache(cache: DynamicCache, rows: torch.Tensor | None, length: int) -> DynamicCache:
    """A new cache with batch ``rows`` (None = all) and the first ``length`` positions of ``cache``."""
    layers = []
    for layer in cache.layers:
        k, v = layer.keys[..., :length, :], layer.values[..., :length, :]
        layers.append((k, v) if rows is None else (k[rows], v[rows]))
    return DynamicCache(ddp_cache_data=layers)


@torch.no_grad()
def prefill(
    target: PreTrainedModel,
    drafter: DSparkDrafter,
    prompt_ids: torch.Tensor,
    sampling: SamplingBatch,
    generator: torch.Generator | None = None,
) -> SpecState:
    """Target forward over prompts ``[bs, n]`` (same length), bonus sampled from the last logits,
    draft context K/V for all ``n`` prompt positions."""
    _check_pair(target, drafter)
    cache = DynamicCache(config=target.config)
    out = _target_forward(target, prompt_ids, cache)
    anchor = sample_target(out.logits[:, -1], sampling, generator)
    draft_cache = drafter.new_context_cache(prompt_ids.shape[0])
    drafter.extend_context(draft_cache, capture_features(out.hidden_states, drafter.config.target_layer_ids), 0)
    return SpecState(cache, draft_cache, anchor, prompt_ids.shape[1], sampling)


def repeat_state(state: SpecState, n: int) -> SpecState:
    """``n`` independent copies of a one-request state (e.g. many trials from one prefix)."""
    if state.batch_size != 1:
        raise ValueError(f"decode.py: repeat_state needs a one-request state, found batch size {state.batch_size}")
    rows = torch.zeros(n, dtype=torch.int64, device=state.anchor.device)
    return SpecState(
        target_cache=_select_target_cache(state.target_cache, rows, state.length),
        draft_cache=state.draft_cache.select(rows),
        anchor=state.anchor[rows],
        length=state.length,
        sampling=state.sampling.select(rows),
    )


@torch.no_grad()
def speculative_step(
    target: PreTrainedModel,
    drafter: DSparkDrafter,
    state: SpecState,
    gamma: int,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """Draft a block of ``gamma`` tokens per request, verify ``gamma + 1`` positions, accept.

    Appends ``gamma + 1`` positions to ``state.target_cache``; ``commit`` crops them to the accepted prefix.
    """
    proposal = drafter.propose(
        state.anchor,
        state.draft_cache,
        target.get_input_embeddings().weight,
        target.get_output_embeddings().weight,
        gamma,
        state.sampling,
        generator,
    )
    verify_ids = torch.cat([state.anchor[:, None], proposal.tokens], dim=1)  # [bs, gamma+1]
    out = _target_forward(target, verify_ids, state.target_cache)
    result = accept_drafts(
        proposal.tokens,
        target_probs(out.logits, state.sampling),
        proposal.probs,
        state.sampling.greedy_mask(),
        generator,
    )
    return StepOutput(
        draft_tokens=proposal.tokens,
        accepted=result.accepted,
        bonus=result.bonus,
        confidence_logits=proposal.confidence_logits,
        verify_features=capture_features(out.hidden_states, drafter.config.target_layer_ids),
    )


@torch.no_grad()
def commit(drafter: DSparkDrafter, state: SpecState, step: StepOutput) -> list[tuple[torch.Tensor, SpecState]]:
    """Commit each request's accepted prefix; returns ``(rows, state)`` per distinct accepted count.

    ``rows`` int64 ``[n]`` index ``state``'s batch; each returned state has ``P + a + 1`` committed tokens
    (target KV cropped, draft context for positions ``P..P+a`` appended) and the bonus as anchor.
    """
    groups = []
    for a in torch.unique(step.accepted).tolist():
        rows = torch.nonzero(step.accepted == a).squeeze(-1)
        select = None if rows.numel() == state.batch_size else rows
        length = state.length + a + 1
        draft_cache = state.draft_cache.select(select)
        features = step.verify_features if select is None else step.verify_features[select]
        drafter.extend_context(draft_cache, features[:, : a + 1], state.length)
        new_state = SpecState(
            target_cache=_select_target_cache(state.target_cache, select, length),
            draft_cache=draft_cache,
            anchor=step.bonus[rows],
            length=length,
            sampling=state.sampling.select(rows),
        )
        groups.append((rows, new_state))
    return groups


def _as_prompt(prompt_ids: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A 1-D token list -> int64 ``[1, n]`` on ``device``."""
    prompt = torch.as_tensor(prompt_ids, dtype=torch.int64, device=device)
    if prompt.dim() != 1 or prompt.numel() == 0:
        raise ValueError(f"decode.py: prompt_ids must be a non-empty 1-D token list, found shape {tuple(prompt.shape)}")
    return prompt[None]


def _truncate(tokens: list[int], budget: int, eos_token_id: int | None) -> tuple[list[int], bool]:
    """Cut ``tokens`` at ``budget`` and after the first eos; returns (tokens, stop)."""
    if eos_token_id is not None and eos_token_id in tokens:
        tokens = tokens[: tokens.index(eos_token_id) + 1]
        return tokens[:budget], True
    return tokens[:budget], len(tokens) >= budget


@torch.no_grad()
def speculative_generate(
    target: PreTrainedModel,
    drafter: DSparkDrafter,
    prompt_ids: list[int] | torch.Tensor,
    max_new_tokens: int,
    gamma: int | None = None,
    sampling: SamplingParams = SamplingParams(),
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
    on_tokens: Callable[[int], None] | None = None,
) -> SpecDecodeResult:
    """Generate up to ``max_new_tokens`` tokens for one prompt with DSpark speculative decoding.

    ``gamma`` defaults to the drafter's ``block_size``; it may be smaller (a block of ``gamma`` slots).
    ``on_tokens(n)`` is called with the number of tokens each step emitted (e.g. a progress bar).
    """
    gamma = drafter.config.block_size if gamma is None else gamma
    prompt = _as_prompt(prompt_ids, target.device)
    state = prefill(target, drafter, prompt, SamplingBatch.repeat(sampling, 1), generator)
    tokens, stop = _truncate([int(state.anchor[0])], max_new_tokens, eos_token_id)
    result = SpecDecodeResult(tokens, [], [0] * gamma, [0] * gamma)
    if on_tokens is not None:
        on_tokens(len(tokens))
    while not stop:
        step = speculative_step(target, drafter, state, gamma, generator)
        a = int(step.accepted[0])
        result.committed_per_step.append(a + 1)
        for j in range(gamma):
            result.proposed_per_position[j] += 1
            result.accepted_per_position[j] += int(j < a)
        if step.confidence_logits is not None:
            result.confidence_logits.append(step.confidence_logits[0])
        emitted, stop = _truncate(step.emitted(0), max_new_tokens - len(result.tokens), eos_token_id)
        result.tokens.extend(emitted)
        if on_tokens is not None:
            on_tokens(len(emitted))
        if not stop:
            ((_, state),) = commit(drafter, state, step)
    logger.debug(
        "speculative_generate: %d tokens in %d steps (%.2f per step)",
        len(result.tokens), len(result.committed_per_step), result.mean_committed,
    )
    return result


@torch.no_grad()
def target_generate(
    target: PreTrainedModel,
    prompt_ids: list[int] | torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
    on_tokens: Callable[[int], None] | None = None,
) -> list[int]:
    """The target's own output: one token per forward, sampled with ``sampling.sample_target``;
    ``on_tokens(1)`` after each token."""
    batch = SamplingBatch.repeat(sampling, 1)
    cache = DynamicCache(config=target.config)
    input_ids = _as_prompt(prompt_ids, target.device)
    tokens: list[int] = []
    while len(tokens) < max_new_tokens:
        logits = target(input_ids=input_ids, past_key_values=cache, use_cache=True).logits
        token = sample_target(logits[:, -1], batch, generator)
        tokens.append(int(token[0]))
        if on_tokens is not None:
            on_tokens(1)
        if eos_token_id is not None and tokens[-1] == eos_token_id:
            break
        input_ids = token[:, None]
    return tokens

"""DSpark drafter training (spec section E) on top of the reference ``DSparkDrafter``'s own submodules.

``multi_anchor_hidden`` runs MANY blocks of one sequence in ONE pass with the block mask of spec E:
the ``gamma`` slots of the block anchored at ``p`` (tokens ``[x_p, mask x (gamma-1)]``, positions
``p..p+gamma-1``) attend to the context positions ``< p`` and to the slots of their own block, nothing
else. It uses the drafter's parameters unchanged (``fc``, ``hidden_norm``, ``layers.*``, ``norm``), so
a trained state_dict loads into ``DSparkDrafter`` as is; ``tests/cpu/test_tiny_pair.py`` checks it
against the reference single-block path (``extend_context`` + ``backbone``).

``draft_loss``: teacher-forced Markov prev tokens ``[x_p, labels[:-1]]``, position weights
``w_k = exp(-k / decay)``, ``0.1 * CE + 0.9 * ||q - p||_1 + 1.0 * BCE(conf, stopgrad(1 - ||q - p||_1 / 2))``
with ``q = softmax(Z)``, ``p = softmax(target logits)`` at temperature 1.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from sglang_dspark.reference.decode import capture_features
from sglang_dspark.reference.drafter import DSparkDrafter, apply_rope, rope_cos_sin

from benchmark.tiny.schedule import Schedule

CE_WEIGHT, L1_WEIGHT, CONF_WEIGHT = 0.1, 0.9, 1.0


def block_attention_mask(anchors: torch.Tensor, seq_len: int, gamma: int) -> torch.Tensor:
    """bool ``[A*gamma, seq_len + A*gamma]`` (True = may attend): block of anchor ``p`` sees context
    keys ``< p`` and the keys of its own block."""
    num = anchors.numel()
    block_of_query = torch.arange(num, device=anchors.device).repeat_interleave(gamma)  # [A*g]
    ctx = torch.arange(seq_len, device=anchors.device)[None, :] < anchors[block_of_query][:, None]
    own = block_of_query[:, None] == block_of_query[None, :]
    return torch.cat([ctx, own], dim=1)


def multi_anchor_hidden(
    drafter: DSparkDrafter,
    features: torch.Tensor,
    tokens: torch.Tensor,
    anchors: torch.Tensor,
    embed_weight: torch.Tensor,
) -> torch.Tensor:
    """Final-normed drafter hidden states of every anchored block.

    features ``[bs, T, S*d]`` (target layer outputs of all positions), tokens int64 ``[bs, T]``,
    anchors int64 ``[A]`` (the same positions for every row, each ``<= T - gamma``), target embedding
    ``[V, d]`` -> ``[bs, A, gamma, d]``.
    """
    cfg = drafter.config
    g, hd = cfg.block_size, cfg.head_dim
    bs, seq_len = tokens.shape
    num = anchors.numel()
    device = tokens.device
    slots = torch.arange(g, device=device)

    ctx = drafter.project_context(features)  # [bs, T, d]
    cos_c, sin_c = rope_cos_sin(torch.arange(seq_len, device=device), hd, cfg.rope_theta)
    block_pos = (anchors[:, None] + slots[None, :]).reshape(-1)  # [A*g]
    cos_b, sin_b = rope_cos_sin(block_pos, hd, cfg.rope_theta)
    block_ids = torch.full((bs, num, g), cfg.mask_token_id, dtype=torch.int64, device=device)
    block_ids[:, :, 0] = tokens[:, anchors]
    h = F.embedding(block_ids.reshape(bs, num * g), embed_weight.detach()).to(ctx.dtype)
    mask = block_attention_mask(anchors, seq_len, g)[None, None]  # [1, 1, A*g, T + A*g]

    for layer in drafter.layers:
        attn = layer.self_attn
        group = attn.num_heads // attn.num_kv_heads
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(bs, num * g, attn.num_heads, hd)
        q = apply_rope(attn.q_norm(q), cos_b, sin_b)
        k_ctx, v_ctx = attn.key_value(ctx, cos_c, sin_c)
        k_blk, v_blk = attn.key_value(x, cos_b, sin_b)
        k = torch.cat([k_ctx, k_blk], dim=1).repeat_interleave(group, dim=2)
        v = torch.cat([v_ctx, v_blk], dim=1).repeat_interleave(group, dim=2)
        dtype = v.dtype
        out = F.scaled_dot_product_attention(
            q.to(dtype).transpose(1, 2), k.to(dtype).transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )  # [bs, heads, A*g, hd]
        h = h + attn.o_proj(out.transpose(1, 2).reshape(bs, num * g, attn.num_heads * hd))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return drafter.norm(h).view(bs, num, g, -1)


def sample_anchors(seq_len: int, gamma: int, count: int, gen: torch.Generator, min_anchor: int = 1) -> torch.Tensor:
    """``count`` distinct sorted anchor positions in ``[min_anchor, seq_len - 1 - gamma]`` (labels
    ``p+1..p+gamma`` inside the sequence)."""
    high = seq_len - 1 - gamma
    if high < min_anchor:
        raise ValueError(f"draft_train.py: sequences of {seq_len} tokens leave no anchor for gamma {gamma}")
    choices = torch.randperm(high - min_anchor + 1, generator=gen)[: min(count, high - min_anchor + 1)]
    return torch.sort(choices + min_anchor).values


def block_targets(
    tokens: torch.Tensor, target_logits: torch.Tensor, anchors: torch.Tensor, gamma: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prev ``[bs, A, g]`` = x_{p+k}, labels ``[bs, A, g]`` = x_{p+k+1}, target logits at p+k ``[bs, A, g, V]``)."""
    pos = anchors[:, None] + torch.arange(gamma, device=tokens.device)[None, :]  # [A, g]
    return tokens[:, pos], tokens[:, pos + 1], target_logits[:, pos]


def draft_loss(
    drafter: DSparkDrafter,
    hidden: torch.Tensor,
    prev: torch.Tensor,
    labels: torch.Tensor,
    target_logits: torch.Tensor,
    lm_head_weight: torch.Tensor,
    decay: float,
    use_markov: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Spec E loss for hidden ``[bs, A, g, d]``, prev / labels int64 ``[bs, A, g]``, target logits
    ``[bs, A, g, V]``; returns (total loss, detached metrics incl. ``tau_prob`` and the teacher-forced
    greedy acceptance length ``tau_greedy``, both bonus included). ``use_markov=False`` scores the
    same drafter with its Markov head switched off (the DFlash ablation; no confidence term)."""
    g = hidden.shape[2]
    weights = torch.exp(-torch.arange(g, device=hidden.device, dtype=torch.float32) / decay)  # [g]
    norm = weights.sum() * hidden.shape[0] * hidden.shape[1]
    logits = (hidden @ lm_head_weight.detach().to(hidden.dtype).T).float()  # U [bs, A, g, V]
    token_features = None
    if use_markov and drafter.markov_head is not None:
        token_features = drafter.markov_head.token_features(prev)
        logits = logits + drafter.markov_head.markov_w2(token_features).float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none").view(labels.shape)
    q = torch.softmax(logits, dim=-1)
    p = torch.softmax(target_logits.float(), dim=-1)
    tv = (q - p).abs().sum(dim=-1)  # [bs, A, g] in [0, 2]
    accept_prob = (1.0 - 0.5 * tv).detach().clamp(0.0, 1.0)
    loss_ce = (ce * weights).sum() / norm
    loss_l1 = (tv * weights).sum() / norm
    total = CE_WEIGHT * loss_ce + L1_WEIGHT * loss_l1
    metrics = {"ce": loss_ce.detach(), "l1": loss_l1.detach()}
    if drafter.confidence_head is not None and use_markov:
        with_markov = drafter.config.confidence_in_features > drafter.config.hidden_size
        conf = drafter.confidence_head(hidden, token_features if with_markov else None)
        bce = F.binary_cross_entropy_with_logits(conf.float(), accept_prob, reduction="none")
        loss_conf = (bce * weights).sum() / norm
        total = total + CONF_WEIGHT * loss_conf
        metrics["conf"] = loss_conf.detach()
    greedy_match = (logits.argmax(-1) == target_logits.argmax(-1)).float()
    metrics["tau_prob"] = (1.0 + torch.cumprod(accept_prob, dim=-1).sum(-1)).mean()
    metrics["tau_greedy"] = (1.0 + torch.cumprod(greedy_match, dim=-1).sum(-1)).mean()
    metrics["accept_pos_greedy"] = torch.cumprod(greedy_match, dim=-1).mean(dim=(0, 1))
    metrics["total"] = total.detach()
    return total, metrics


class TargetFeatures:
    """Frozen target producing what the drafter trains on: captured layer outputs and final logits."""

    def __init__(self, target, layer_ids: tuple[int, ...]) -> None:
        self.target = target
        self.layer_ids = layer_ids

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens ``[bs, T]`` -> (features ``[bs, T, S*d]``, logits ``[bs, T, V]``)."""
        out = self.target(input_ids=tokens, output_hidden_states=True)
        return capture_features(out.hidden_states, self.layer_ids), out.logits


def train_drafter(
    drafter: DSparkDrafter,
    teacher: TargetFeatures,
    sequences: torch.Tensor,
    schedule: Schedule,
    batch: int,
    anchors_per_seq: int,
    lr: float,
    decay: float,
    seed: int,
    log,
) -> dict:
    """AdamW on random batches of ``sequences`` ``[N, T]`` (fp32 master, bf16 autocast on CUDA)."""
    device = sequences.device
    embed = teacher.target.get_input_embeddings().weight
    lm_head = teacher.target.get_output_embeddings().weight
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                            fused=device.type == "cuda")
    gamma = drafter.config.block_size
    drafter.train()
    history = []
    step, start = 0, time.monotonic()
    while not schedule.done(step):
        scale = schedule.lr_scale(step)
        for group in opt.param_groups:
            group["lr"] = lr * scale
        rows = torch.randint(0, sequences.shape[0], (batch,), generator=gen).to(device)
        tokens = sequences[rows]
        anchors = sample_anchors(tokens.shape[1], gamma, anchors_per_seq, gen).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            features, target_logits = teacher(tokens)
            prev, labels, block_logits = block_targets(tokens, target_logits, anchors, gamma)
            hidden = multi_anchor_hidden(drafter, features, tokens, anchors, embed)
            loss, metrics = draft_loss(drafter, hidden, prev, labels, block_logits, lm_head, decay)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % schedule.log_every == 0 or step >= schedule.total_steps:
            row = {k: round(float(v), 4) for k, v in metrics.items() if v.dim() == 0}
            if not math.isfinite(row["total"]):
                raise FloatingPointError(f"draft_train.py: training loss became {row['total']} at step {step}")
            schedule.check(step)
            row.update(step=step, lr=lr * scale, s=round(time.monotonic() - start, 1))
            history.append(row)
            log(f"draft step {step}/{schedule.total_steps} loss {row['total']:.4f} ce {row['ce']:.3f} "
                f"l1 {row['l1']:.3f} conf {row.get('conf', float('nan')):.3f} tau_prob {row['tau_prob']:.2f} "
                f"tau_greedy(tf) {row['tau_greedy']:.2f} ({time.monotonic() - start:.0f}s)")
    return {
        "steps": step,
        "planned_steps": schedule.planned_steps,
        "stopped_by": schedule.stopped_by(step),
        "blocks_seen": step * batch * anchors_per_seq,
        "seconds": round(time.monotonic() - start, 1),
        "history": history,
    }


@torch.no_grad()
def evaluate_drafter(
    drafter: DSparkDrafter,
    teacher: TargetFeatures,
    sequences: torch.Tensor,
    batch: int,
    anchors_per_seq: int,
    decay: float,
    seed: int,
    use_markov: bool = True,
) -> dict:
    """Teacher-forced held-out metrics (loss terms, tau_prob, greedy tau and per-position acceptance)."""
    device = sequences.device
    embed = teacher.target.get_input_embeddings().weight
    lm_head = teacher.target.get_output_embeddings().weight
    gen = torch.Generator().manual_seed(seed)
    gamma = drafter.config.block_size
    drafter.eval()
    sums: dict[str, torch.Tensor] = {}
    batches = 0
    for i in range(0, sequences.shape[0], batch):
        tokens = sequences[i : i + batch]
        anchors = sample_anchors(tokens.shape[1], gamma, anchors_per_seq, gen).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            features, target_logits = teacher(tokens)
            prev, labels, block_logits = block_targets(tokens, target_logits, anchors, gamma)
            hidden = multi_anchor_hidden(drafter, features, tokens, anchors, embed)
            _, metrics = draft_loss(drafter, hidden, prev, labels, block_logits, lm_head, decay, use_markov)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v.float().cpu()
        batches += 1
    drafter.train()
    out = {k: (v / batches) for k, v in sums.items()}
    return {k: (round(float(v), 4) if v.dim() == 0 else [round(float(x), 4) for x in v]) for k, v in out.items()}

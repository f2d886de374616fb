"""The tiny Qwen3 target: config, packed-token batches, training loop, held-out loss, sampling.

Attention is shaped like Qwen3-8B's (head_dim 128, GQA group 4: 4 query heads over 1 KV head) so the
FlashInfer kernels SGLang compiles for Qwen3-8B serve it as well; embeddings are tied.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import Qwen3Config, Qwen3ForCausalLM, StaticCache

from benchmark.tiny.schedule import Schedule


@dataclass(frozen=True)
class TargetShape:
    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 128
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0


def build_config(shape: TargetShape, eos_token_id: int) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        rope_parameters={"rope_theta": shape.rope_theta, "rope_type": "default"},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=None,  # a pad id would make embed_tokens skip eos's gradient (nn.Embedding padding_idx)
        architectures=["Qwen3ForCausalLM"],
    )


def build_model(config: Qwen3Config, seed: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    return model


def count_params(model: torch.nn.Module) -> int:
    """Unique parameters (tied tables counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def random_windows(stream: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` windows of ``length`` tokens at uniform random offsets of a 1-D ``stream`` -> ``[batch, length]``."""
    if stream.numel() <= length:
        raise ValueError(f"target.py: token stream of {stream.numel()} tokens is shorter than a window of {length}")
    starts = torch.randint(0, stream.numel() - length, (batch,), generator=gen, device="cpu").to(stream.device)
    return stream[starts[:, None] + torch.arange(length, device=stream.device)[None, :]]


def lm_loss(model: Qwen3ForCausalLM, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of windows ``[bs, n]`` (predicting positions 1..n-1)."""
    logits = model(input_ids=windows[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


@torch.no_grad()
def heldout_loss(model: Qwen3ForCausalLM, stream: torch.Tensor, length: int, batch: int, max_windows: int) -> float:
    """Mean cross-entropy over non-overlapping windows of ``length + 1`` tokens of ``stream``."""
    n = min((stream.numel() - 1) // length, max_windows)
    if n == 0:
        raise ValueError(f"target.py: held-out stream of {stream.numel()} tokens is shorter than one window")
    starts = torch.arange(n, device=stream.device) * length
    total, count = 0.0, 0
    model.eval()
    for i in range(0, n, batch):
        s = starts[i : i + batch]
        windows = stream[s[:, None] + torch.arange(length + 1, device=stream.device)[None, :]]
        with autocast(stream.device):
            total += float(lm_loss(model, windows)) * s.numel()
        count += s.numel()
    model.train()
    return total / count


def autocast(device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_target(
    model: Qwen3ForCausalLM,
    stream: torch.Tensor,
    schedule: Schedule,
    batch: int,
    length: int,
    lr: float,
    seed: int,
    log,
) -> dict:
    """AdamW (fp32 master, bf16 autocast on CUDA) on random windows of ``stream``; returns a report."""
    device = stream.device
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda",
    )
    model.train()
    history = []
    step, smoothed, start = 0, None, time.monotonic()
    while not schedule.done(step):
        scale = schedule.lr_scale(step)
        for group in opt.param_groups:
            group["lr"] = lr * scale
        windows = random_windows(stream, batch, length + 1, gen)
        with autocast(device):
            loss = lm_loss(model, windows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % schedule.log_every == 0 or step >= schedule.total_steps:
            value = float(loss.detach())
            schedule.check(step)
            if not math.isfinite(value):
                raise FloatingPointError(f"target.py: training loss became {value} at step {step}")
            smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
            history.append({"step": step, "loss": round(value, 4), "lr": lr * scale, "s": round(time.monotonic() - start, 1)})
            log(f"target step {step}/{schedule.total_steps} loss {value:.4f} lr {lr * scale:.2e} "
                f"({time.monotonic() - start:.0f}s)")
    return {
        "steps": step,
        "planned_steps": schedule.planned_steps,
        "stopped_by": schedule.stopped_by(step),
        "tokens_seen": step * batch * length,
        "final_train_loss": history[-1]["loss"] if history else None,
        "seconds": round(time.monotonic() - start, 1),
        "history": history,
    }


@torch.no_grad()
def sample_continuations(
    model: Qwen3ForCausalLM,
    prompts: torch.Tensor,
    new_tokens: int,
    temperatures: torch.Tensor,
    gen: torch.Generator,
) -> torch.Tensor:
    """Continue prompts ``[bs, n]`` by ``new_tokens`` tokens with per-row temperature ``[bs]``
    (0 = greedy); returns ``[bs, n + new_tokens]``. One KV-cached target forward per token, with a
    preallocated ``StaticCache`` (a growing cache would copy all of it at every token)."""
    n = prompts.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=n + new_tokens)
    positions = torch.arange(n + new_tokens, device=prompts.device)
    out = model(input_ids=prompts, past_key_values=cache, use_cache=True, cache_position=positions[:n])
    seqs = [prompts]
    logits = out.logits[:, -1].float()
    greedy = temperatures <= 0
    temp = torch.where(greedy, torch.ones_like(temperatures), temperatures)[:, None]
    for i in range(new_tokens):
        probs = torch.softmax(logits / temp, dim=-1)
        # exponential race = multinomial sampling, reproducible with an explicit generator
        noise = torch.empty_like(probs).exponential_(1.0, generator=gen)
        sampled = torch.argmax(probs / noise, dim=-1)
        token = torch.where(greedy, torch.argmax(logits, dim=-1), sampled)
        seqs.append(token[:, None])
        if i + 1 < new_tokens:
            out = model(input_ids=token[:, None], past_key_values=cache, use_cache=True,
                        cache_position=positions[n + i : n + i + 1])
            logits = out.logits[:, -1].float()
    return torch.cat(seqs, dim=1)

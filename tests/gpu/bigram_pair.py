"""A random target/draft pair with a known answer, for the GPU smoke tests.

Target: a random Qwen3 with Qwen3-8B's widths (hidden 4096, 32/8 heads of 128, MLP 12288, so the
shipped FlashInfer / JIT kernel cache applies), 4 layers and a 16384-token vocabulary. Its lm_head is its
embedding table permuted, ``lm_head[f(t)] = embed[t]``, and its layers are small next to the embeddings,
so its greedy next token after ``t`` is ``f(t)`` with a logit margin of thousands: a bigram chain that no
kernel's rounding can flip, and softmax(logits / T) is one-hot at any sane temperature.

Drafts: DSpark checkpoints of matching shape whose Markov head implements a bigram ``g``: ``perfect``
(``g = f``) and ``half`` (``g = f`` on a random half of the vocabulary, another permutation), with a random backbone whose
output is scaled down (final norm weight 0.01) so the Markov bias decides every draft token. So the
drafts, the accepted counts per step and the outputs are all known in advance (see ``expected_steps``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sglang_dspark.checkpoint import random_draft_weights, save_draft
from sglang_dspark.config import DSparkConfig

VOCAB = 16384
HIDDEN = 4096
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
INTERMEDIATE = 12288
TARGET_LAYERS = 4
TARGET_LAYER_IDS = (1, 2)
DRAFT_LAYERS = 2
MARKOV_RANK = 128
GAMMA = 7
ROPE_THETA = 1_000_000.0
MAX_POSITIONS = 8192
MASK_TOKEN = VOCAB - 1
EOS_TOKEN = VOCAB - 2


@dataclass(frozen=True)
class BigramPair:
    root: Path
    target: Path
    drafts: dict[str, Path]  # variant name -> draft dir
    f: list[int]  # the target's greedy successor of each token
    g: dict[str, list[int]]  # variant name -> the draft's successor of each token


def _target_weights(f: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    def mat(rows: int, cols: int) -> torch.Tensor:  # std 0.5 / sqrt(fan_in): layer outputs ~ half their input
        return torch.randn(rows, cols, generator=gen) * (0.5 / cols**0.5)

    embed = torch.randn(VOCAB, HIDDEN, generator=gen)
    lm_head = torch.empty_like(embed)
    lm_head[f] = embed  # lm_head[f(t)] = embed[t]: the logit of f(t) is |embed[t]|^2 ~ 4096
    weights = {"model.embed_tokens.weight": embed, "lm_head.weight": lm_head, "model.norm.weight": torch.ones(HIDDEN)}
    for i in range(TARGET_LAYERS):
        p = f"model.layers.{i}."
        weights.update({
            p + "input_layernorm.weight": torch.ones(HIDDEN),
            p + "post_attention_layernorm.weight": torch.ones(HIDDEN),
            p + "self_attn.q_proj.weight": mat(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": mat(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": mat(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": mat(HIDDEN, HEADS * HEAD_DIM),
            p + "self_attn.q_norm.weight": torch.ones(HEAD_DIM),
            p + "self_attn.k_norm.weight": torch.ones(HEAD_DIM),
            p + "mlp.gate_proj.weight": mat(INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": mat(INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": mat(HIDDEN, INTERMEDIATE),
        })
    return weights


def _write_target(root: Path, f: torch.Tensor, gen: torch.Generator) -> Path:
    from safetensors.torch import save_file
    from transformers import Qwen3Config

    target = root / "target"
    target.mkdir(parents=True, exist_ok=True)
    Qwen3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=TARGET_LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=MAX_POSITIONS,
        rope_theta=ROPE_THETA, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0, eos_token_id=EOS_TOKEN,
        architectures=["Qwen3ForCausalLM"],
    ).save_pretrained(target)
    weights = {n: t.to(torch.bfloat16).contiguous() for n, t in _target_weights(f, gen).items()}
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def draft_config(markov_head_type: str) -> DSparkConfig:
    return DSparkConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=DRAFT_LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=VOCAB,
        rms_norm_eps=1e-6, rope_theta=ROPE_THETA, max_position_embeddings=MAX_POSITIONS, block_size=GAMMA,
        mask_token_id=MASK_TOKEN, target_layer_ids=TARGET_LAYER_IDS, num_target_layers=TARGET_LAYERS,
        markov_rank=MARKOV_RANK, markov_head_type=markov_head_type, enable_confidence_head=True,
        confidence_head_with_markov=True,
    )


def _markov_bigram(config: DSparkConfig, g: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Markov weights whose bias after token t peaks at g(t) with a margin of ~100 (codes C[t] in R^r)."""
    r, d, scale = config.markov_rank, config.hidden_size, 2.0
    codes = torch.randn(VOCAB, r, generator=gen)
    w2 = torch.empty(VOCAB, r)
    if config.markov_head_type == "rnn":
        # a_out = 8 e_k -> tanh(a_out) ~ sign(C[t]); gate/candidate rows are zero, so the state stays ~0.
        joint = torch.zeros(3 * r, 2 * r + d)
        joint[2 * r :, r : 2 * r] = 8.0 * torch.eye(r)
        w2[g] = scale * torch.tanh(8.0 * codes)
        return {"markov_head.markov_w1.weight": codes, "markov_head.markov_w2.weight": w2,
                "markov_head.joint_proj.weight": joint, "markov_head.joint_proj.bias": torch.zeros(3 * r)}
    w2[g] = codes  # B[j] = W2[j] . W1[t] is largest at j = g(t)
    weights = {"markov_head.markov_w1.weight": scale * codes, "markov_head.markov_w2.weight": w2}
    if config.markov_head_type == "gated":  # gate = sigmoid(10) ~ 1
        weights["markov_head.gate_proj.weight"] = torch.zeros(r, d + r)
        weights["markov_head.gate_proj.bias"] = torch.full((r,), 10.0)
    return weights


def _write_draft(
    root: Path, name: str, markov_head_type: str, g: torch.Tensor, backbone: dict[str, torch.Tensor], seed: int
) -> Path:
    config = draft_config(markov_head_type)
    weights = {**backbone, **_markov_bigram(config, g, torch.Generator().manual_seed(seed))}
    weights = {n: t.to(torch.bfloat16) for n, t in weights.items()}
    return save_draft(root / f"draft-{name}", config, weights, "deepspec", overwrite=True)


def build(root: str | Path, seed: int = 0) -> BigramPair:
    """Write the target and the ``perfect`` (vanilla head), ``half`` (rnn head) and ``half-gated`` drafts."""
    root = Path(root)
    gen = torch.Generator().manual_seed(seed)
    f = torch.randperm(VOCAB, generator=gen)
    target = _write_target(root, f, gen)
    # half = f o sigma, sigma a permutation moving a random half of the tokens (a cyclic shift among
    # them): still a permutation (every W2 row is one token's code), and half(t) == f(t) iff t stays.
    moved = torch.nonzero(torch.rand(VOCAB, generator=gen) < 0.5).squeeze(1)
    sigma = torch.arange(VOCAB)
    sigma[moved] = moved.roll(1)
    half = f[sigma]
    variants = {"perfect": ("vanilla", f), "half": ("rnn", half), "half-gated": ("gated", half)}
    # One random backbone (and confidence head) for all drafts; its output is scaled down by the final
    # norm so the backbone's logits stay ~1, far below the Markov bias.
    backbone = {n: t for n, t in random_draft_weights(draft_config("vanilla"), seed=seed + 1).items()
                if not n.startswith("markov_head.")}
    backbone["norm.weight"] = torch.full((HIDDEN,), 0.01)
    drafts = {
        name: _write_draft(root, name, kind, g, backbone, seed=seed + 10 * (i + 1))
        for i, (name, (kind, g)) in enumerate(variants.items())
    }
    (root / "bigrams.json").write_text(json.dumps({"f": f.tolist(), "g": {n: v[1].tolist() for n, v in variants.items()}}))
    return BigramPair(root, target, drafts, f.tolist(), {n: v[1].tolist() for n, v in variants.items()})


def chain(f: list[int], start: int, n: int) -> list[int]:
    """``start, f(start), f(f(start)), ...`` (``n`` tokens)."""
    out = [start]
    while len(out) < n:
        out.append(f[out[-1]])
    return out


def expected_steps(f: list[int], g: list[int], first: int, n_out: int, gamma: int = GAMMA) -> int:
    """Verify steps a request needs to emit ``n_out`` tokens (the first one comes from the prefill) when
    drafts follow ``g`` and the target follows ``f``: a draft is accepted while ``g(t) == f(t)``."""
    emitted, anchor, steps = 1, first, 0
    while emitted < n_out:
        t, accepted = anchor, 0
        while accepted < gamma and g[t] == f[t]:
            t, accepted = f[t], accepted + 1
        emitted += accepted + 1
        anchor = f[t]
        steps += 1
    return steps

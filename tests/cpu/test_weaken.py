"""``benchmark/tiny/weaken.py``: the weak drafter of issue 6's GPU test (noise on the backbone weights).

The acceptance test runs the reference loop on the tiny pair (2 prompts x 32 new tokens, greedy, a few seconds):
the drafter weakened with the default noise commits about one token per verify step where the original commits
several, and the source checkpoint is left byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmark.tiny import weaken as weaken_mod  # noqa: E402
from benchmark.tiny.weaken import CALIBRATING_SHIFT, DEFAULT_NOISE, NOTE_FILE, noised, weaken  # noqa: E402

TARGET_DIR = REPO / "tests" / "fixtures" / "tiny-qwen3"
DRAFT_DIR = REPO / "tests" / "fixtures" / "tiny-qwen3-dspark"
WEAK_MAX_ACCEPT = 1.3  # committed tokens per verify step of the weakened drafter (CPU: 1.05 on 32 x 128)
ORIGINAL_MIN_ACCEPT = 2.5  # the trained drafter on the same prompts (CPU: 4.86 on 32 x 128)

needs_fixtures = pytest.mark.skipif(
    not (TARGET_DIR.is_dir() and DRAFT_DIR.is_dir()),
    reason="tiny pair fixtures not present (tests/fixtures/tiny-qwen3, tests/fixtures/tiny-qwen3-dspark)",
)


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def greedy_accept_length(draft_dir: Path, n_prompts: int = 2, max_new_tokens: int = 32) -> float:
    """Mean committed tokens per verify step of the reference loop (fp32, CPU, greedy) on the first
    ``n_prompts`` HumanEval code blocks."""
    from benchmark.tiny.evaluate import acceptance, load_pair, load_prompts

    pair = load_pair(TARGET_DIR, draft_dir)
    prompts = load_prompts(TARGET_DIR)["humaneval"][:n_prompts]
    return acceptance(pair, pair.drafter, prompts, max_new_tokens, temperature=0.0, seed=0)["mean_accept_len"]


@needs_fixtures
def test_default_noise_makes_acceptance_near_one_and_leaves_the_source(tmp_path):
    before = digests(DRAFT_DIR)
    out = tmp_path / "weak"
    note = weaken(DRAFT_DIR, out, seed=0)
    assert digests(DRAFT_DIR) == before

    assert note["noise"] == DEFAULT_NOISE and note["seed"] == 0 and not note["heads_noised"]
    assert json.loads((out / NOTE_FILE).read_text())["noised"] == note["noised"]
    assert (out / "config.json").read_bytes() == (DRAFT_DIR / "config.json").read_bytes()
    src, new = load_file(str(DRAFT_DIR / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(src) == set(new)
    for name, tensor in src.items():
        assert new[name].dtype == tensor.dtype and new[name].shape == tensor.shape
        if name.startswith(("markov_head.", "confidence_head.")):
            assert torch.equal(new[name], tensor), name
            assert name in note["unchanged"]
        else:
            assert name in note["noised"], name
            assert not torch.equal(new[name], tensor), name
    assert len(note["noised"]) == 25  # fc, hidden_norm, norm and 11 tensors per layer x 2

    weak, original = greedy_accept_length(out), greedy_accept_length(DRAFT_DIR)
    assert weak <= WEAK_MAX_ACCEPT, f"weakened drafter still commits {weak} tokens per verify step"
    assert original >= ORIGINAL_MIN_ACCEPT and weak < original


def test_noise_scales_with_the_tensor_std_and_is_reproducible():
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    a, b = noised(w, 2.0, gen()), noised(w, 2.0, gen())
    assert torch.equal(a, b)
    ratio = float((a - w).std() / w.std())
    assert 1.9 < ratio < 2.1, ratio
    assert not torch.equal(noised(w, 2.0, torch.Generator().manual_seed(4)), a)
    assert torch.equal(noised(w, 0.0, gen()), w)
    assert noised(torch.tensor([1.5]), 2.0, gen()) is None  # one element: no std to scale to
    assert noised(torch.ones(8), 2.0, gen()) is None  # constant: std 0
    half = noised(w.to(torch.bfloat16), 1.0, gen())
    assert half.dtype == torch.bfloat16 and half.shape == w.shape


@needs_fixtures
def test_seed_heads_and_confidence_shift(tmp_path):
    def weights(name: str, seed: int) -> dict[str, torch.Tensor]:
        weaken(DRAFT_DIR, tmp_path / name, noise=1.0, seed=seed)
        return load_file(str(tmp_path / name / "model.safetensors"))

    a, b, c = weights("a", 1), weights("b", 1), weights("c", 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc.weight"], c["fc.weight"])

    src = load_file(str(DRAFT_DIR / "model.safetensors"))
    note = weaken(DRAFT_DIR, tmp_path / "h", noise=1.0, heads=True, confidence_shift=CALIBRATING_SHIFT)
    h = load_file(str(tmp_path / "h" / "model.safetensors"))
    assert note["heads_noised"] and note["confidence_shift"] == CALIBRATING_SHIFT
    assert "markov_head.markov_w1.weight" in note["noised"] and "confidence_head.proj.weight" in note["noised"]
    assert not torch.equal(h["markov_head.markov_w1.weight"], src["markov_head.markov_w1.weight"])
    shifted = float(h["confidence_head.proj.bias"][0]) - float(src["confidence_head.proj.bias"][0])
    assert abs(shifted - CALIBRATING_SHIFT) < 0.05, shifted  # bf16 rounding of the shifted bias


@needs_fixtures
def test_refusals_and_cli(tmp_path, capsys):
    out = tmp_path / "weak"
    out.mkdir()
    with pytest.raises(FileExistsError, match="exists"):
        weaken(DRAFT_DIR, out)
    with pytest.raises(ValueError, match="must not be"):
        weaken(DRAFT_DIR, DRAFT_DIR / "sub")
    with pytest.raises(ValueError, match="--noise must be >= 0"):
        weaken(DRAFT_DIR, tmp_path / "neg", noise=-1.0)
    with pytest.raises(FileNotFoundError, match="config.json"):
        weaken(tmp_path, tmp_path / "x")
    assert not (DRAFT_DIR / "sub").exists()

    assert weaken_mod.main([str(DRAFT_DIR), str(out), "--noise", "0.5", "--seed", "7", "--overwrite"]) == 0
    note = json.loads((out / NOTE_FILE).read_text())
    assert note["noise"] == 0.5 and note["seed"] == 7 and note["confidence_shift"] == 0.0
    assert "25 tensors noised" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        weaken_mod.main([str(DRAFT_DIR), str(out)])
    assert exc.value.code == 1

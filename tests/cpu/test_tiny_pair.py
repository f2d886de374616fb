"""The tiny trained pair (``benchmark/tiny``): its training forward, and the committed fixtures.

Always run: the batched multi-anchor training forward equals the reference single-block forward; the
spec-E loss reaches every trainable drafter tensor; a few training steps on a random target lower the
loss and the result round-trips through ``save_draft`` / ``load_draft``; the held-out split is by name.

Run when ``tests/fixtures/tiny-qwen3`` and ``tests/fixtures/tiny-qwen3-dspark`` exist (made by
``benchmark/tiny/train.py`` on the GPU machine): the files load with transformers and ``load_draft``,
fit in 10 MB, greedy speculative decoding reproduces the target's greedy output, and greedy acceptance
on a fixed prompt subset stays within the band below.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmark.tiny.data import is_heldout, split_sources, SourceFile  # noqa: E402
from benchmark.tiny.draft_train import (  # noqa: E402
    TargetFeatures,
    block_attention_mask,
    block_targets,
    draft_loss,
    multi_anchor_hidden,
    sample_anchors,
    train_drafter,
)
from benchmark.tiny.schedule import Schedule  # noqa: E402
from sglang_dspark.checkpoint import load_draft, save_draft  # noqa: E402
from sglang_dspark.reference.drafter import DSparkDrafter  # noqa: E402

TARGET_DIR = REPO / "tests" / "fixtures" / "tiny-qwen3"
DRAFT_DIR = REPO / "tests" / "fixtures" / "tiny-qwen3-dspark"
FIXTURE_BYTES_LIMIT = 10_000_000
# Stated band for greedy acceptance length on the test subset (see benchmark/tiny/README.md):
ACCEPT_FLOOR = 2.0  # below this the fixture is too weak to exercise multi-token acceptance
ACCEPT_TOLERANCE = 0.1  # allowed drift from the value recorded in eval_report.json by evaluate.py

needs_fixtures = pytest.mark.skipif(
    not (TARGET_DIR.is_dir() and DRAFT_DIR.is_dir()),
    reason=f"tiny pair fixtures not present ({TARGET_DIR.relative_to(REPO)}, {DRAFT_DIR.relative_to(REPO)}); "
    "make them with benchmark/tiny/train.py on the GPU machine (see benchmark/tiny/README.md)",
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny matmuls here run fastest on one thread (and do not fight parallel test processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- training forward ----------------------------------------------------------------------------


def _single_block(drafter: DSparkDrafter, features, tokens, anchor: int, embed) -> torch.Tensor:
    """Reference path: context cache of positions < anchor, then one block backbone pass -> [bs, g, d]."""
    cfg = drafter.config
    cache = drafter.new_context_cache(tokens.shape[0])
    if anchor > 0:
        drafter.extend_context(cache, features[:, :anchor], 0)
    ids = torch.full((tokens.shape[0], cfg.block_size), cfg.mask_token_id, dtype=torch.int64)
    ids[:, 0] = tokens[:, anchor]
    return drafter.backbone(F.embedding(ids, embed), cache)


def test_block_mask_shape_and_visibility():
    anchors = torch.tensor([0, 2, 5])
    mask = block_attention_mask(anchors, seq_len=8, gamma=3)
    assert mask.shape == (9, 8 + 9)
    # block of anchor 2 (queries 3..5): context keys 0, 1 only; block keys 3..5 only
    assert mask[3, :8].tolist() == [True, True] + [False] * 6
    assert mask[4, 8:].tolist() == [False] * 3 + [True] * 3 + [False] * 3
    # anchor 0 sees no context at all, only its own block
    assert not mask[0, :8].any() and mask[0, 8:11].all()


@pytest.mark.parametrize("layers,kv_heads", [(1, 1), (2, 2)])
def test_multi_anchor_forward_matches_reference_single_block(tiny_target, tiny_drafter, layers, kv_heads):
    target = tiny_target(num_layers=4)
    drafter = tiny_drafter(target, num_hidden_layers=layers, num_key_value_heads=kv_heads, target_layer_ids=(0, 1, 2))
    gen = torch.Generator().manual_seed(0)
    bs, seq_len = 2, 40
    tokens = torch.randint(0, target.config.vocab_size - 1, (bs, seq_len), generator=gen)
    features, _ = TargetFeatures(target, drafter.config.target_layer_ids)(tokens)
    embed = target.get_input_embeddings().weight
    anchors = torch.tensor([0, 1, 9, 20, seq_len - 1 - drafter.config.block_size])
    with torch.no_grad():
        batched = multi_anchor_hidden(drafter, features, tokens, anchors, embed)
        for i, p in enumerate(anchors.tolist()):
            torch.testing.assert_close(batched[:, i], _single_block(drafter, features, tokens, p, embed),
                                       rtol=1e-4, atol=1e-4)


def test_draft_loss_reaches_every_trainable_tensor(tiny_target, tiny_drafter):
    target = tiny_target(num_layers=4)
    drafter = tiny_drafter(target, target_layer_ids=(0, 2)).train()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, target.config.vocab_size - 1, (2, 32), generator=gen)
    teacher = TargetFeatures(target, drafter.config.target_layer_ids)
    features, logits = teacher(tokens)
    anchors = sample_anchors(32, drafter.config.block_size, 6, gen)
    prev, labels, block_logits = block_targets(tokens, logits, anchors, drafter.config.block_size)
    assert torch.equal(prev[:, :, 1:], labels[:, :, :-1])  # teacher forcing: prev = [x_p, labels[:-1]]
    hidden = multi_anchor_hidden(drafter, features, tokens, anchors, target.get_input_embeddings().weight)
    loss, metrics = draft_loss(drafter, hidden, prev, labels, block_logits, target.get_output_embeddings().weight, 4.0)
    loss.backward()
    no_grad = [n for n, p in drafter.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert 1.0 <= float(metrics["tau_prob"]) <= 1.0 + drafter.config.block_size
    assert target.get_input_embeddings().weight.grad is None  # the target's tables stay frozen


def test_train_drafter_lowers_loss_and_round_trips(tiny_target, tiny_drafter, tmp_path):
    target = tiny_target(num_layers=4)
    target.requires_grad_(False)
    drafter = tiny_drafter(target, target_layer_ids=(0, 1, 2), init_std=0.02).train()
    teacher = TargetFeatures(target, drafter.config.target_layer_ids)
    gen = torch.Generator().manual_seed(2)
    # a repetitive "language" the drafter can learn in a few steps
    base = torch.randint(0, target.config.vocab_size - 1, (4, 8), generator=gen)
    sequences = base.repeat(1, 6)  # [4, 48]
    logs: list[str] = []
    run = train_drafter(drafter, teacher, sequences, Schedule(40, 300.0, log_every=20), batch=4,
                        anchors_per_seq=8, lr=3e-3, decay=4.0, seed=0, log=logs.append)
    assert run["steps"] == 40 and run["stopped_by"] == "steps"
    first, last = run["history"][0]["total"], run["history"][-1]["total"]
    assert last < first, run["history"]
    out = save_draft(tmp_path / "draft", drafter.config, drafter.state_dict(), fmt="deepspec")
    ckpt = load_draft(out, target_config=target.config)
    reloaded = DSparkDrafter(ckpt.config)
    reloaded.load_state_dict(ckpt.weights, strict=True)
    for name, value in drafter.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], value)


def test_schedule_replans_to_fit_time_limit():
    sched = Schedule(total_steps=10_000, time_limit_s=0.2, log_every=1)
    step = 0
    while not sched.done(step):
        sched.check(step)
        step += 1
        torch.randn(200, 200) @ torch.randn(200, 200)
    assert step < 10_000
    assert sched.stopped_by(step) != "steps"
    assert 0.0 < sched.lr_scale(step - 1) <= 1.0


def test_heldout_split_is_by_name_only():
    names = [f"pkg{i}/mod{j}.py" for i in range(40) for j in range(25)]
    held = [n for n in names if is_heldout(n)]
    assert 0.03 < len(held) / len(names) < 0.07
    assert all(is_heldout(n) for n in held)  # deterministic
    train, heldout = split_sources([SourceFile(n, "x") for n in names])
    assert [f.path for f in heldout] == held and len(train) + len(heldout) == len(names)


# ---- committed fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    from benchmark.tiny.evaluate import load_pair

    return load_pair(TARGET_DIR, DRAFT_DIR)


@needs_fixtures
def test_fixture_files_size_and_configs():
    expected = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "heldout_prompts.jsonl", "train_report.json", "eval_report.json"}
    assert expected <= {p.name for p in TARGET_DIR.iterdir()}
    assert {"config.json", "model.safetensors"} <= {p.name for p in DRAFT_DIR.iterdir()}
    total = sum(p.stat().st_size for d in (TARGET_DIR, DRAFT_DIR) for p in d.iterdir() if p.is_file())
    assert total <= FIXTURE_BYTES_LIMIT, f"fixtures take {total:,} bytes"
    tcfg = json.loads((TARGET_DIR / "config.json").read_text())
    assert tcfg["model_type"] == "qwen3" and tcfg["tie_word_embeddings"] is True
    assert tcfg["head_dim"] == 128 and tcfg["num_attention_heads"] // tcfg["num_key_value_heads"] == 4
    assert tcfg["vocab_size"] <= 4096
    dcfg = json.loads((DRAFT_DIR / "config.json").read_text())
    assert dcfg["architectures"] == ["Qwen3DSparkModel"] and dcfg["block_size"] == 7
    assert dcfg["num_target_layers"] == tcfg["num_hidden_layers"]
    assert max(dcfg["target_layer_ids"]) < tcfg["num_hidden_layers"] - 1
    assert dcfg["markov_head_type"] == "vanilla" and dcfg["markov_rank"] == 64
    assert dcfg["enable_confidence_head"] is True
    assert 1 <= dcfg["num_hidden_layers"] <= 2


@needs_fixtures
def test_fixture_loads_and_tokenizer_round_trips(pair):
    assert pair.drafter.config.mask_token_id == pair.tokenizer.mask_token_id
    assert pair.target.lm_head.weight.data_ptr() == pair.target.model.embed_tokens.weight.data_ptr()
    ckpt = load_draft(DRAFT_DIR, target_config=pair.target.config)
    assert ckpt.embed_tokens is None and ckpt.lm_head is None  # the drafter reuses the target's tables
    text = "def add(a, b):\n    return a + b\n"
    assert pair.tokenizer.decode(pair.tokenizer(text)["input_ids"]) == text


@needs_fixtures
def test_fixture_target_beats_unigram_on_heldout(pair):
    """The target is trained: held-out next-token loss well under the uniform log(V)."""
    report = json.loads((TARGET_DIR / "train_report.json").read_text())
    from benchmark.tiny.data import read_jsonl

    text = read_jsonl(TARGET_DIR / "heldout_prompts.jsonl")[0]["text"]
    ids = torch.tensor([pair.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        logits = pair.target(input_ids=ids).logits[0, :-1]
    loss = float(F.cross_entropy(logits, ids[0, 1:]))
    assert loss < 0.6 * torch.log(torch.tensor(float(pair.target.config.vocab_size)))
    assert report["target"]["heldout_loss"] < report["target"]["heldout_loss_init"]


@needs_fixtures
def test_fixture_greedy_lossless_and_acceptance_band(pair):
    from benchmark.tiny.evaluate import TEST_SUBSET_NEW_TOKENS, load_prompts, band_subset_acceptance
    from sglang_dspark.reference.decode import speculative_generate, target_generate

    sets = load_prompts(TARGET_DIR)
    for texts in sets.values():
        for text in texts[:2]:
            ids = pair.tokenizer(text)["input_ids"]
            spec = speculative_generate(pair.target, pair.drafter, ids, TEST_SUBSET_NEW_TOKENS)
            assert spec.tokens == target_generate(pair.target, ids, TEST_SUBSET_NEW_TOKENS)
            assert max(spec.committed_per_step) > 1  # the drafter actually got tokens accepted
    measured = band_subset_acceptance(pair, sets)["mean_accept_len"]
    recorded = json.loads((TARGET_DIR / "eval_report.json").read_text())["test_subset"]["mean_accept_len"]
    assert measured >= ACCEPT_FLOOR, f"greedy acceptance {measured:.3f} below the floor {ACCEPT_FLOOR}"
    assert abs(measured - recorded) <= ACCEPT_TOLERANCE, f"measured {measured:.3f}, recorded {recorded:.3f}"

"""``ServerArgs`` resolution for ``--speculative-algorithm DSPARK`` (and DFLASH left as it was)."""

from __future__ import annotations

import argparse
import logging

import pytest

from sglang_fixtures import draft_config, target_config

pytestmark = pytest.mark.sglang
pytest.importorskip("sglang.srt")  # "sglang" alone would find this test dir


def test_defaults_come_from_the_checkpoint(parse):
    args = parse()
    assert args.speculative_algorithm == "DSPARK"
    assert args.speculative_dspark_block_size == 7
    assert args.speculative_num_draft_tokens == 8
    assert (args.speculative_num_steps, args.speculative_eagle_topk) == (1, 1)
    assert args.max_running_requests == 48
    assert args.enable_mixed_chunk is False
    assert args.speculative_draft_attention_backend == "flashinfer"


def test_lowercase_name_and_torchspec_layouts(parse):
    for fmt in ("dspark", "qwen3_dspark"):
        args = parse(draft=draft_config(fmt, block_size=5), algorithm="dspark")
        assert args.speculative_algorithm == "DSPARK"
        assert (args.speculative_dspark_block_size, args.speculative_num_draft_tokens) == (5, 6)


def test_block_size_flag_sets_gamma(parse, caplog):
    with caplog.at_level(logging.WARNING, logger="sglang_dspark"):
        args = parse("--speculative-dspark-block-size", "4")
    assert (args.speculative_dspark_block_size, args.speculative_num_draft_tokens) == (4, 5)
    assert "is below the draft checkpoint's block_size 7" in caplog.text


def test_consistent_explicit_values_are_kept(parse):
    args = parse(
        "--speculative-dspark-block-size", "7", "--speculative-num-draft-tokens", "8",
        "--speculative-num-steps", "1", "--speculative-eagle-topk", "1", "--max-running-requests", "12",
        "--speculative-draft-attention-backend", "flashinfer",
    )
    assert (args.speculative_dspark_block_size, args.speculative_num_draft_tokens) == (7, 8)
    assert args.max_running_requests == 12


def test_missing_block_size_is_rejected(parse):
    with pytest.raises(ValueError, match="is not a usable DSpark draft.*'block_size'"):
        parse(draft=draft_config(block_size=None))


def test_mixed_chunk_is_switched_off(parse):
    assert parse("--enable-mixed-chunk").enable_mixed_chunk is False


@pytest.mark.parametrize(
    "flags, expected",
    [
        (("--speculative-num-draft-tokens", "7"),
         "--speculative-num-draft-tokens 7 contradicts --speculative-dspark-block-size"),
        (("--speculative-dspark-block-size", "4", "--speculative-num-draft-tokens", "4"), "must be 5"),
        (("--speculative-dspark-block-size", "0"), "--speculative-dspark-block-size must be a positive integer"),
        (("--speculative-eagle-topk", "2"), "--speculative-eagle-topk must be 1"),
        (("--speculative-num-steps", "3"), "--speculative-num-steps must be 1"),
        (("--pp-size", "2"), "--pp-size 1, got 2"),
        (("--speculative-dspark-block-size", "8"), "--speculative-dspark-block-size 8 exceeds the block_size 7"),
        (("--tp-size", "2", "--dp-size", "2", "--enable-dp-attention"), "--enable-dp-attention"),
        (("--device", "cpu"), "needs a CUDA device"),
        (("--speculative-draft-attention-backend", "triton"),
         "--speculative-draft-attention-backend triton is not supported"),
        (("--speculative-draft-window-size", "64"), "--speculative-draft-window-size"),
    ],
)
def test_bad_flag_combinations_are_rejected(parse, flags, expected):
    with pytest.raises(ValueError) as info:
        parse(*flags)
    assert expected in str(info.value)


def test_draft_path_is_required(dspark_plugin, model_dirs):
    from sglang.srt.server_args import ServerArgs

    target_dir, _ = model_dirs()
    with pytest.raises(ValueError, match="requires --speculative-draft-model-path"):
        ServerArgs(model_path=target_dir, device="cuda", skip_tokenizer_init=True, speculative_algorithm="DSPARK")


@pytest.mark.parametrize(
    "draft, target, expected",
    [
        (draft_config(hidden_size=32, head_dim=8), None, "key 'hidden_size': expected 64"),
        (draft_config(vocab_size=500, mask_token_id=499), None, "key 'vocab_size': expected 1000"),
        (draft_config(target_layer_ids=[1, 7], num_target_layers=None), None,
         "key 'target_layer_ids': expected ids in 0..6"),
        (None, target_config(num_hidden_layers=12), "key 'num_target_layers': expected 12"),
    ],
)
def test_draft_target_pairing_is_checked(parse, draft, target, expected):
    with pytest.raises(ValueError) as info:
        parse(draft=draft, target=target)
    message = str(info.value)
    assert "--speculative-draft-model-path" in message and "does not fit --model-path" in message
    assert expected in message


def test_non_dspark_draft_is_rejected(parse):
    dflash_draft = draft_config(architectures=["DFlashDraftModel"])
    with pytest.raises(ValueError, match="is not a usable DSpark draft.*'architectures'"):
        parse(draft=dflash_draft)


def test_help_documents_the_dspark_flags(dspark_plugin):
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    text = " ".join(parser.format_help().split())
    assert "--speculative-dspark-block-size" in text
    assert "DSPARK only. Number of tokens drafted per block (gamma)." in text
    assert "--speculative-dspark-verify {scheduled,full}" in text
    assert "'full': verify all gamma drafts every step." in text
    assert "--speculative-dspark-cost-profile" in text


def test_dflash_resolution_is_unchanged(parse):
    dflash_draft = draft_config(
        architectures=["DFlashDraftModel"], model_type="qwen3", block_size=6,
        dflash_config={"mask_token_id": 999, "target_layer_ids": [1, 3, 5]},
    )
    args = parse(draft=dflash_draft, algorithm="DFLASH")
    assert args.speculative_num_draft_tokens == 6
    assert (args.speculative_num_steps, args.speculative_eagle_topk) == (1, 1)
    assert args.speculative_dspark_block_size is None
    # DFLASH keeps the target's (triton) backend for its draft and still accepts its own flag.
    assert args.speculative_draft_attention_backend == args.attention_backend
    args = parse("--speculative-dflash-block-size", "4", draft=dflash_draft, algorithm="DFLASH")
    assert args.speculative_num_draft_tokens == 4
    with pytest.raises(ValueError, match="--speculative-dflash-block-size are set but they differ"):
        parse("--speculative-dflash-block-size", "4", "--speculative-num-draft-tokens", "5",
              draft=dflash_draft, algorithm="DFLASH")


@pytest.mark.parametrize("problem", ["missing", "no config", "bad json"])
def test_unusable_draft_directory_is_rejected_naming_it(dspark_plugin, model_dirs, tmp_path, problem):
    """A draft path that does not exist, has no config.json, or an unreadable one fails at launch with
    a message naming the path (no stack trace from deep inside model loading)."""
    from sglang.srt.server_args import ServerArgs

    target_dir, _ = model_dirs()
    draft_dir = tmp_path / "draft"
    if problem != "missing":
        draft_dir.mkdir()
    if problem == "bad json":
        (draft_dir / "config.json").write_text("{not json")
    with pytest.raises(ValueError) as info:
        ServerArgs(model_path=target_dir, device="cuda", skip_tokenizer_init=True, speculative_algorithm="DSPARK",
                   speculative_draft_model_path=str(draft_dir))
    message = str(info.value)
    assert message.startswith(f"--speculative-draft-model-path {draft_dir}: "), message
    expected = {"missing": "no such directory", "no config": "cannot read the draft's config.json",
                "bad json": "not a valid JSON file"}[problem]
    assert expected in message, message


def test_verification_mode_defaults_to_scheduled_with_a_confidence_head(parse, tmp_path):
    args = parse()
    assert (args.speculative_dspark_verify, args.speculative_dspark_cost_profile) == ("scheduled", "auto")
    assert parse("--speculative-dspark-verify", "full").speculative_dspark_verify == "full"
    no_head = draft_config(enable_confidence_head=False, confidence_head_with_markov=False)
    assert parse(draft=no_head).speculative_dspark_verify == "full"
    with pytest.raises(ValueError, match="--speculative-dspark-verify scheduled needs a draft with a confidence "
                                         "head.*'enable_confidence_head' is false"):
        parse("--speculative-dspark-verify", "scheduled", draft=no_head)
    with pytest.raises(SystemExit):  # argparse choices
        parse("--speculative-dspark-verify", "sometimes")


def test_cost_profile_file_is_read_at_launch(parse, tmp_path):
    from sglang_dspark.cost_profile import CostProfile

    good = tmp_path / "cost.json"
    CostProfile(points=((1, 6.0), (64, 7.0)), draft_points=((1, 1.0),)).save(good)
    assert parse("--speculative-dspark-cost-profile", str(good)).speculative_dspark_cost_profile == str(good)
    assert parse("--speculative-dspark-cost-profile", "builtin").speculative_dspark_cost_profile == "builtin"
    with pytest.raises(ValueError, match=f"--speculative-dspark-cost-profile {tmp_path}/missing.json: .*not found"):
        parse("--speculative-dspark-cost-profile", str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "sglang-dspark-cost-profile", "version": 1, "points": [[1, 6.0]]}')
    with pytest.raises(ValueError, match="bad.json.*'points' needs at least 2 points"):
        parse("--speculative-dspark-cost-profile", str(bad))

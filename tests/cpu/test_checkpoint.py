"""The draft checkpoint loader: both layouts, name aliases, sharding, and every documented error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sglang_dspark.checkpoint import (
    DSparkCheckpointError,
    expected_shapes,
    load_draft,
    normalize_weights,
    random_draft_weights,
    read_draft_config,
    save_draft,
    validate_against_target,
)
from sglang_dspark.config import DSparkConfig
from sglang_dspark.reference.drafter import DSparkDrafter
from sglang_dspark.reference.sampling import SamplingBatch, SamplingParams

from tiny_configs import TARGET_LAYERS, tiny_config


def target_dict(config: DSparkConfig, **changes) -> dict:
    target = {"model_type": "qwen3", "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
              "num_hidden_layers": TARGET_LAYERS}
    return {**target, **changes}


def tables(config: DSparkConfig, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (config.vocab_size, config.hidden_size)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen) / config.hidden_size**0.5


def rewrite(draft: Path, rename=None, drop=(), add=None, config_changes=None, config_drop=()) -> None:
    """Edit a saved single-file draft in place: rename/drop/add tensors, change/drop config keys."""
    tensors = load_file(str(draft / "model.safetensors"))
    tensors = {(rename(n) if rename else n): t for n, t in tensors.items() if n not in drop}
    tensors.update(add or {})
    save_file(tensors, str(draft / "model.safetensors"))
    raw = json.loads((draft / "config.json").read_text())
    raw.update(config_changes or {})
    for key in config_drop:
        raw.pop(key)
    (draft / "config.json").write_text(json.dumps(raw))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


HEAD_VARIANTS = {
    "vanilla": {},
    "gated": {"markov_head_type": "gated"},
    "rnn": {"markov_head_type": "rnn"},
    "no_markov": {"markov_rank": 0, "confidence_head_with_markov": False},
    "conf_without_markov": {"confidence_head_with_markov": False},
    "no_confidence": {"enable_confidence_head": False, "confidence_head_with_markov": False},
    "attention_bias": {"attention_bias": True},
}


# ---- both layouts ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(HEAD_VARIANTS))
def test_both_layouts_load_to_identical_canonical_tensors(tmp_path, variant):
    config = tiny_config(**HEAD_VARIANTS[variant])
    weights = random_draft_weights(config, seed=3)
    layouts = ["deepspec"] + (["torchspec"] if config.markov_head_type == "vanilla" else [])
    for fmt in layouts:
        save_draft(tmp_path / fmt, config, weights, fmt)
        ckpt = load_draft(tmp_path / fmt)
        assert ckpt.format == fmt
        assert ckpt.embed_tokens is None and ckpt.lm_head is None
        assert_same_tensors(ckpt.weights, weights)
        expected_config = config if fmt == "deepspec" else config.replace(num_target_layers=TARGET_LAYERS)
        assert ckpt.config == expected_config
    assert set(weights) == set(expected_shapes(config))
    if config.markov_rank == 0:
        assert not any(n.startswith("markov_head.") for n in weights)
    if config.enable_confidence_head:
        assert weights["confidence_head.proj.weight"].shape == (1, config.confidence_in_features)


def test_deepspec_layout_on_disk(tmp_path):
    config = tiny_config()
    save_draft(tmp_path, config, random_draft_weights(config), "deepspec", extra_config={"num_anchors": 512})
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["architectures"] == ["Qwen3DSparkModel"]
    assert raw["model_type"] == "qwen3"
    assert raw["num_target_layers"] == TARGET_LAYERS
    assert raw["num_hidden_layers"] == 2 and raw["head_dim"] == 8
    assert raw["layer_types"] == ["full_attention"] * 2
    assert raw["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "default"}
    assert raw["tie_word_embeddings"] is False and raw["use_sliding_window"] is False
    assert raw["markov_head_type"] == "vanilla" and raw["confidence_head_with_markov"] is True
    assert raw["target_layer_ids"] == [1, 2, 4] and raw["block_size"] == 4 and raw["mask_token_id"] == 60
    assert raw["dtype"] == "float32" and raw["num_anchors"] == 512
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert names == set(expected_shapes(config))


def test_torchspec_layout_on_disk(tmp_path):
    config = tiny_config()
    embed, lm_head = tables(config)
    weights = random_draft_weights(config)
    save_draft(tmp_path, config, weights, "torchspec", embed_tokens=embed, lm_head=lm_head)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "dspark"
    assert "num_target_layers" not in raw and "layer_types" not in raw
    assert raw["target_num_hidden_layers"] == TARGET_LAYERS
    assert raw["num_draft_layers"] == 2 and raw["rope_theta"] == 10000.0
    assert raw["target_hidden_size"] == 32 and raw["torch_dtype"] == "float32"
    names = set(load_file(str(tmp_path / "model.safetensors")))
    for name in ("context_proj.weight", "context_norm.weight", "final_norm.weight", "markov_w1.weight",
                 "markov_w2.weight", "embed_tokens.weight", "lm_head.weight", "layers.1.mlp.up_proj.weight"):
        assert name in names
    for canonical in ("fc.weight", "hidden_norm.weight", "norm.weight", "markov_head.markov_w1.weight"):
        assert canonical not in names


def test_torchspec_gated_head_is_refused(tmp_path):
    config = tiny_config(markov_head_type="gated")
    with pytest.raises(DSparkCheckpointError, match="TorchSpec defines only 'vanilla'.*found 'gated'"):
        save_draft(tmp_path, config, random_draft_weights(config), "torchspec")


def test_deepspec_output_needs_num_target_layers(tmp_path):
    config = tiny_config(num_target_layers=None)
    with pytest.raises(DSparkCheckpointError, match="'num_target_layers'.*unknown"):
        save_draft(tmp_path, config, random_draft_weights(config), "deepspec")


def test_drafter_logits_identical_from_both_layouts(tmp_path):

    config = tiny_config()
    weights = random_draft_weights(config, seed=5)
    embed, lm_head = tables(config)
    features = torch.randn(2, 5, config.num_context_features, generator=torch.Generator().manual_seed(9))
    anchor = torch.tensor([3, 17])

    def run(state_dict):
        drafter = DSparkDrafter(config)
        drafter.load_state_dict(state_dict, strict=True)
        cache = drafter.new_context_cache(2)
        drafter.extend_context(cache, features, 0)
        with torch.no_grad():
            block = torch.full((2, config.block_size), config.mask_token_id)
            block[:, 0] = anchor
            base = drafter.base_logits(drafter.backbone(embed[block], cache), lm_head)
        proposal = drafter.propose(anchor, cache, embed, lm_head, config.block_size,
                                   SamplingBatch.repeat(SamplingParams(), 2))
        return base, proposal

    save_draft(tmp_path / "ds", config, weights, "deepspec")
    save_draft(tmp_path / "ts", config, weights, "torchspec")
    ds_base, ds = run(load_draft(tmp_path / "ds").weights)
    ts_base, ts = run(load_draft(tmp_path / "ts").weights)
    assert torch.equal(ds_base, ts_base)
    assert torch.equal(ds.tokens, ts.tokens)
    assert torch.equal(ds.probs, ts.probs)
    assert torch.equal(ds.confidence_logits, ts.confidence_logits)
    # the comparison is meaningful: other weights give other logits
    other_base, _ = run(random_draft_weights(config, seed=6))
    assert not torch.allclose(ds_base, other_base)


@pytest.mark.parametrize("variant", HEAD_VARIANTS)
def test_drafter_state_dict_names_are_the_canonical_names(variant):
    config = tiny_config(**HEAD_VARIANTS[variant])
    state = DSparkDrafter(config).state_dict()
    assert {n: tuple(t.shape) for n, t in state.items()} == expected_shapes(config)


# ---- aliases, prefixes, aside tensors, sharding ---------------------------------------------


def test_model_prefix_and_rotary_buffers(tmp_path):
    config = tiny_config()
    weights = random_draft_weights(config)
    save_draft(tmp_path, config, weights, "deepspec")
    buffers = {"model.rotary_emb.inv_freq": torch.ones(4), "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    rewrite(tmp_path, rename=lambda n: "model." + n, add=buffers)
    assert_same_tensors(load_draft(tmp_path).weights, weights)


def test_torchspec_classical_without_head_dim(tmp_path):
    config = tiny_config(head_dim=8, num_attention_heads=4)  # 32 / 4 = 8
    weights = random_draft_weights(config)
    save_draft(tmp_path, config, weights, "torchspec")
    rewrite(tmp_path, config_changes={"markov_head_type": "classical", "model_type": "qwen3_dspark"},
            config_drop=("head_dim", "target_num_hidden_layers"))
    loaded, fmt = read_draft_config(tmp_path)
    assert fmt == "torchspec"
    assert loaded.markov_head_type == "vanilla" and loaded.head_dim == 8 and loaded.num_target_layers is None
    assert_same_tensors(load_draft(tmp_path).weights, weights)


def test_torchspec_files_with_deepspec_names_and_torchspec_names_with_model_prefix(tmp_path):
    config = tiny_config()
    weights = random_draft_weights(config)
    save_draft(tmp_path / "a", config, weights, "torchspec")
    rewrite(tmp_path / "a",
            rename=lambda n: n.replace("context_proj.", "fc.").replace("markov_w", "markov_head.markov_w"))
    assert_same_tensors(load_draft(tmp_path / "a").weights, weights)
    save_draft(tmp_path / "b", config, weights, "torchspec")
    rewrite(tmp_path / "b", rename=lambda n: "model." + n)
    assert_same_tensors(load_draft(tmp_path / "b").weights, weights)


def test_midlayer_alias_for_one_layer_draft(tmp_path):
    config = tiny_config(num_hidden_layers=1)
    weights = random_draft_weights(config)
    save_draft(tmp_path, config, weights, "deepspec")
    rewrite(tmp_path, rename=lambda n: n.replace("layers.0.", "midlayer."))
    assert_same_tensors(load_draft(tmp_path).weights, weights)


@pytest.mark.parametrize("present", [(), ("embed_tokens",), ("lm_head",), ("embed_tokens", "lm_head")])
def test_embed_and_lm_head_present_or_absent(tmp_path, present):
    config = tiny_config()
    embed, lm_head = tables(config)
    given = {"embed_tokens": embed, "lm_head": lm_head}
    kwargs = {name: given[name] for name in present}
    save_draft(tmp_path, config, random_draft_weights(config), "deepspec", **kwargs)
    ckpt = load_draft(tmp_path)
    for name in ("embed_tokens", "lm_head"):
        value = getattr(ckpt, name)
        assert (value is not None) == (name in present)
        if value is not None:
            assert torch.equal(value, given[name])
    assert not any(n in ckpt.weights for n in ("embed_tokens.weight", "lm_head.weight"))


def test_embed_tokens_wrong_shape(tmp_path):
    config = tiny_config()
    save_draft(tmp_path, config, random_draft_weights(config), "deepspec")
    rewrite(tmp_path, add={"model.embed_tokens.weight": torch.zeros(63, 32)})
    with pytest.raises(DSparkCheckpointError) as err:
        load_draft(tmp_path)
    assert (f"{tmp_path / 'model.safetensors'}: tensor 'model.embed_tokens.weight' (canonical "
            "'embed_tokens.weight'): expected shape [64, 32], found [63, 32]") in str(err.value)


def write_shards(draft: Path, index: bool = True) -> list[str]:
    """Split a saved single-file draft into 3 shards (+ index when asked); returns the shard names."""
    tensors = load_file(str(draft / "model.safetensors"))
    (draft / "model.safetensors").unlink()
    names = sorted(tensors)
    shard_names = [f"model-0000{i + 1}-of-00003.safetensors" for i in range(3)]
    weight_map = {}
    for i, shard in enumerate(shard_names):
        part = {n: tensors[n] for n in names[i::3]}
        save_file(part, str(draft / shard))
        weight_map.update({n: shard for n in part})
    if index:
        index_json = {"metadata": {}, "weight_map": weight_map}
        (draft / "model.safetensors.index.json").write_text(json.dumps(index_json))
    return shard_names


@pytest.mark.parametrize("index", [True, False])
def test_sharded_loading(tmp_path, index):
    config = tiny_config()
    weights = random_draft_weights(config)
    embed, _ = tables(config)
    save_draft(tmp_path, config, weights, "torchspec", embed_tokens=embed)
    write_shards(tmp_path, index=index)
    ckpt = load_draft(tmp_path, dtype=torch.bfloat16)
    assert_same_tensors(ckpt.weights, {n: t.to(torch.bfloat16) for n, t in weights.items()})
    assert torch.equal(ckpt.embed_tokens, embed.to(torch.bfloat16))


def test_sharded_shape_error_names_the_shard(tmp_path):
    config = tiny_config()
    save_draft(tmp_path, config, random_draft_weights(config), "deepspec")
    shards = write_shards(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["norm.weight"]
    part = load_file(str(tmp_path / shard))
    part["norm.weight"] = torch.ones(31)
    save_file(part, str(tmp_path / shard))
    with pytest.raises(DSparkCheckpointError) as err:
        load_draft(tmp_path)
    assert f"{tmp_path / shard}: tensor 'norm.weight': expected shape [32], found [31]" in str(err.value)
    assert shard in shards


def test_sharded_index_errors(tmp_path):
    config = tiny_config()
    save_draft(tmp_path, config, random_draft_weights(config), "deepspec")
    write_shards(tmp_path)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    holder = index["weight_map"]["fc.weight"]
    other = next(shard for shard in set(index["weight_map"].values()) if shard != holder)
    index["weight_map"]["fc.weight"] = other
    index_path.write_text(json.dumps(index))
    with pytest.raises(DSparkCheckpointError) as err:
        load_draft(tmp_path)
    assert (f"{index_path}: key 'weight_map.fc.weight': expected {holder!r} (the shard holding it), "
            f"found {other!r}") in str(err.value)
    index["weight_map"]["fc.weight"] = "model-00009-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    missing_shard = r"lists shard\(s\) \['model-00009-of-00003.safetensors'\], which do not exist"
    with pytest.raises(DSparkCheckpointError, match=missing_shard):
        load_draft(tmp_path)
    del index["weight_map"]["fc.weight"]
    index["weight_map"]["ghost.weight"] = holder
    index_path.write_text(json.dumps(index))
    with pytest.raises(DSparkCheckpointError, match="key 'weight_map.fc.weight': expected .* found None"):
        load_draft(tmp_path)


# ---- tensor errors ----------------------------------------------------------------------------


def saved(tmp_path: Path, fmt: str = "deepspec", **changes) -> tuple[DSparkConfig, Path]:
    config = tiny_config(**changes)
    save_draft(tmp_path, config, random_draft_weights(config), fmt)
    return config, tmp_path


def load_error(path: Path) -> str:
    with pytest.raises(DSparkCheckpointError) as err:
        load_draft(path)
    return str(err.value)


def test_missing_tensor(tmp_path):
    _, path = saved(tmp_path)
    rewrite(path, drop=("fc.weight", "layers.1.self_attn.k_norm.weight"))
    message = load_error(path)
    assert str(path) in message
    assert "2 required tensor(s) missing: ['fc.weight', 'layers.1.self_attn.k_norm.weight']" in message


def test_unknown_backbone_name_is_unused_not_dropped(tmp_path):
    _, path = saved(tmp_path)
    rewrite(path, rename=lambda n: "proj.weight" if n == "fc.weight" else n,
            add={"d2t": torch.zeros(64, dtype=torch.int64)})
    message = load_error(path)
    assert "2 tensor(s) left unused" in message and "['d2t', 'proj.weight']" in message
    assert "required tensor(s) missing: ['fc.weight']" in message


def test_tensors_of_a_head_the_config_does_not_have_are_unused(tmp_path):
    config = tiny_config(markov_head_type="gated")
    save_draft(tmp_path, config, random_draft_weights(config), "deepspec")
    rewrite(tmp_path, config_changes={"markov_head_type": "vanilla"})
    message = load_error(tmp_path)
    assert "left unused" in message
    assert "['markov_head.gate_proj.bias', 'markov_head.gate_proj.weight']" in message


def test_shape_mismatch_names_file_tensor_expected_and_found(tmp_path):
    _, path = saved(tmp_path, fmt="torchspec")
    rewrite(path, add={"context_proj.weight": torch.zeros(32, 64)})
    message = load_error(path)
    assert (f"{path / 'model.safetensors'}: tensor 'context_proj.weight' (canonical 'fc.weight'): "
            "expected shape [32, 96], found [32, 64]") in message


def test_confidence_head_width_mismatch(tmp_path):
    _, path = saved(tmp_path, confidence_head_with_markov=False)
    rewrite(path, config_changes={"confidence_head_with_markov": True})
    assert "tensor 'confidence_head.proj.weight': expected shape [1, 40], found [1, 32]" in load_error(path)


def test_two_names_for_one_tensor(tmp_path):
    _, path = saved(tmp_path)
    rewrite(path, add={"context_proj.weight": torch.zeros(32, 96)})
    message = load_error(path)
    assert "duplicate: tensors 'context_proj.weight' and 'fc.weight' both map to 'fc.weight'" in message


def test_normalize_weights_takes_a_plain_mapping():
    config = tiny_config()
    weights = random_draft_weights(config)
    raw = {("model." + n): t for n, t in weights.items()}
    raw["lm_head.weight"] = torch.zeros(64, 32)
    out = normalize_weights(raw, config, "deepspec", "sglang-load")
    assert_same_tensors(out.drafter, weights)
    assert out.embed_tokens is None and out.lm_head is not None
    del raw["model.norm.weight"]
    with pytest.raises(DSparkCheckpointError, match=r"(?s)sglang-load: deepspec .*missing: \['norm.weight'\]"):
        normalize_weights(raw, config, "deepspec", "sglang-load")


# ---- config errors ----------------------------------------------------------------------------


def config_error(path: Path) -> str:
    with pytest.raises(DSparkCheckpointError) as err:
        read_draft_config(path)
    return str(err.value)


@pytest.mark.parametrize("key", ["block_size", "target_layer_ids", "mask_token_id", "hidden_size", "markov_rank",
                                 "enable_confidence_head", "markov_head_type", "confidence_head_with_markov"])
def test_missing_required_config_key(tmp_path, key):
    _, path = saved(tmp_path)
    rewrite(path, config_drop=(key,))
    assert config_error(path) == f"{path / 'config.json'}: required key {key!r} is missing"


def test_missing_rope(tmp_path):
    _, path = saved(tmp_path)
    rewrite(path, config_drop=("rope_parameters",))
    assert "required key 'rope_theta' (or 'rope_parameters.rope_theta') is missing" in config_error(path)


def test_rope_flat_and_nested_are_equivalent(tmp_path):
    config, path = saved(tmp_path)
    rewrite(path, config_drop=("rope_parameters",), config_changes={"rope_theta": 10000})
    assert read_draft_config(path)[0] == config
    rewrite(path, config_changes={"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4}})
    assert "key 'rope_parameters.rope_type': expected 'default' (plain RoPE), found 'yarn'" in config_error(path)


@pytest.mark.parametrize("fmt", ["deepspec", "torchspec"])
def test_unknown_markov_head_type_lists_allowed(tmp_path, fmt):
    _, path = saved(tmp_path, fmt=fmt)
    rewrite(path, config_changes={"markov_head_type": "bigram"})
    allowed = "['vanilla', 'gated', 'rnn']" if fmt == "deepspec" else "['vanilla', 'gated', 'rnn', 'classical']"
    assert config_error(path) == (f"{path / 'config.json'}: key 'markov_head_type': expected one of {allowed}, "
                                  "found 'bigram'")


def test_wrong_model_type_and_architecture(tmp_path):
    _, path = saved(tmp_path)
    rewrite(path, config_changes={"architectures": ["DFlashDraftModel"]})
    assert "key 'architectures': expected ['Qwen3DSparkModel']" in config_error(path)
    assert "found ['DFlashDraftModel']" in config_error(path)
    rewrite(path, config_changes={"model_type": "llama"})
    assert "key 'model_type': expected 'qwen3' (DeepSpec layout) or one of ['dspark', 'qwen3_dspark']" in config_error(path)


def test_torchspec_num_target_layers_means_captured_count(tmp_path):
    _, path = saved(tmp_path, fmt="torchspec")
    rewrite(path, config_changes={"num_target_layers": 3})
    assert read_draft_config(path)[0].num_target_layers == TARGET_LAYERS  # from target_num_hidden_layers
    rewrite(path, config_changes={"num_target_layers": 36})
    assert "key 'num_target_layers': in the TorchSpec layout it counts the captured layers; expected 3" in config_error(path)


def test_config_level_checks(tmp_path):
    _, path = saved(tmp_path)
    rewrite(path, config_changes={"layer_types": ["full_attention", "sliding_attention"]})
    assert "key 'layer_types': expected 2 x 'full_attention'" in config_error(path)
    _, path = saved(tmp_path / "b")
    rewrite(path, config_changes={"target_layer_ids": [1, 5]})
    message = config_error(path)
    assert "key 'target_layer_ids': expected ids in 0..4 for its num_target_layers with 6 layers, found [5]" in message
    assert "final layer, which is forbidden" in message
    _, path = saved(tmp_path / "c", fmt="torchspec")
    rewrite(path, config_drop=("head_dim",), config_changes={"num_attention_heads": 5, "num_key_value_heads": 5})
    assert "key 'head_dim' is absent and hidden_size=32 is not divisible by num_attention_heads=5" in config_error(path)
    _, path = saved(tmp_path / "d")
    rewrite(path, config_changes={"num_key_value_heads": 3})
    assert "key 'num_attention_heads': expected a multiple of num_key_value_heads=3, found 4" in config_error(path)
    _, path = saved(tmp_path / "e")
    rewrite(path, config_changes={"mask_token_id": 64})
    assert "key 'mask_token_id': expected an id in 0..63 (vocab_size 64), found 64" in config_error(path)


# ---- validation against the target ------------------------------------------------------------


def target_error(config: DSparkConfig, target) -> str:
    with pytest.raises(DSparkCheckpointError) as err:
        validate_against_target(config, target, "draft/config.json", "target/config.json")
    return str(err.value)


def test_matching_target_passes_as_dict_and_as_hf_config():
    from transformers import Qwen3Config

    config = tiny_config()
    validate_against_target(config, target_dict(config), "d", "t")
    hf = Qwen3Config(hidden_size=32, vocab_size=64, num_hidden_layers=TARGET_LAYERS, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, intermediate_size=64)
    validate_against_target(config, hf, "d", "t")
    message = target_error(config, Qwen3Config(hidden_size=32, vocab_size=64, num_hidden_layers=5,
                                               num_attention_heads=4, num_key_value_heads=2))
    assert "key 'num_target_layers': expected 5 (num_hidden_layers of the target, target/config.json), found 6" in message


def test_target_layer_out_of_range_and_final_layer():
    config = tiny_config(num_target_layers=None, target_layer_ids=(1, 5))
    message = target_error(config, target_dict(config))
    assert message.startswith("draft/config.json: draft does not match target target/config.json")
    assert ("key 'target_layer_ids': expected ids in 0..4 for the target (target/config.json) with 6 layers, "
            "found [5] in [1, 5]; layer 5 is the final layer, which is forbidden: HF returns its hidden state "
            "final-normed") in message
    config = tiny_config(num_target_layers=None, target_layer_ids=(1, 9))
    message = target_error(config, target_dict(config))
    assert "found [9] in [1, 9]" in message and "forbidden" not in message


def test_target_hidden_vocab_mask_and_layer_count():
    config = tiny_config()
    message = target_error(config, target_dict(config, hidden_size=64))
    assert "key 'hidden_size': expected 64 (hidden_size of the target, target/config.json), found 32" in message
    message = target_error(config, target_dict(config, vocab_size=48))
    assert "key 'vocab_size': expected 48 (vocab_size of the target, target/config.json), found 64" in message
    assert "key 'mask_token_id': expected an id in 0..47 (the target's vocab, target/config.json), found 60" in message
    message = target_error(config, target_dict(config, num_hidden_layers=8))
    assert "key 'num_target_layers': expected 8 (num_hidden_layers of the target, target/config.json), found 6" in message
    message = target_error(config, {"hidden_size": 32, "vocab_size": 64})
    assert "target/config.json: target config key 'num_hidden_layers': expected an integer, found None" in message


def test_draft_head_sanity_is_checked_for_configs_built_in_code():
    config = tiny_config(num_attention_heads=3)
    assert "key 'num_attention_heads': expected a multiple of num_key_value_heads=2, found 3" in target_error(
        config, target_dict(config))
    config = tiny_config(head_dim=7)
    assert "key 'head_dim': expected an even size" in target_error(config, target_dict(config))


def test_load_draft_validates_against_a_target_directory(tmp_path):
    config, path = saved(tmp_path / "draft")
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "config.json").write_text(json.dumps(target_dict(config)))
    assert load_draft(path, target_config=tmp_path / "target").config == config
    (tmp_path / "target" / "config.json").write_text(json.dumps(target_dict(config, hidden_size=48)))
    with pytest.raises(DSparkCheckpointError) as err:
        load_draft(path, target_config=tmp_path / "target")
    assert str(err.value).startswith(f"{path / 'config.json'}: draft does not match target {tmp_path / 'target' / 'config.json'}")
    assert "expected 48" in str(err.value)


# ---- the published Qwen3-8B configs (spec A.9, B.1, B.2) --------------------------------------

QWEN3_8B_TARGET = {"model_type": "qwen3", "hidden_size": 4096, "vocab_size": 151936, "num_hidden_layers": 36}
TORCHSPEC_8B = {  # TorchSpec torchspec/config/dspark_draft_config.json (the revision with model_type dspark)
    "architectures": ["Qwen3DSparkModel"], "model_type": "dspark", "hidden_size": 4096,
    "intermediate_size": 12288, "num_hidden_layers": 5, "num_draft_layers": 5, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 40960, "rope_theta": 1000000.0, "attention_bias": False,
    "attention_dropout": 0.0, "tie_word_embeddings": False, "block_size": 7, "num_anchors": 512,
    "mask_token_id": 151669, "target_layer_ids": [1, 9, 17, 25, 33], "markov_rank": 256,
    "markov_head_type": "vanilla", "enable_confidence_head": True, "confidence_head_with_markov": True,
}


def test_qwen3_8b_configs_parse_to_the_spec_dimensions():
    from sglang_dspark.checkpoint import parse_draft_config

    ts_config, fmt = parse_draft_config(TORCHSPEC_8B, "ts/config.json")
    assert fmt == "torchspec" and ts_config.num_target_layers is None
    deepspec = {k: v for k, v in TORCHSPEC_8B.items() if k not in ("num_draft_layers", "rope_theta")}
    deepspec.update(model_type="qwen3", num_target_layers=36, layer_types=["full_attention"] * 5,
                    rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}, use_sliding_window=False)
    ds_config, fmt = parse_draft_config(deepspec, "ds/config.json")
    assert fmt == "deepspec" and ds_config == ts_config.replace(num_target_layers=36)
    validate_against_target(ds_config, QWEN3_8B_TARGET, "ds/config.json", "Qwen3-8B/config.json")
    assert (ds_config.hidden_size, ds_config.head_dim, ds_config.block_size, ds_config.rope_theta) == (4096, 128, 7, 1e6)
    shapes = expected_shapes(ds_config)
    assert shapes["fc.weight"] == (4096, 20480) and shapes["confidence_head.proj.weight"] == (1, 4352)
    assert shapes["layers.4.self_attn.k_proj.weight"] == (1024, 4096)
    assert len(shapes) == 62  # B.1: 64 tensors, 62 without embed_tokens / lm_head
    numel = sum(torch.Size(s).numel() for s in shapes.values())
    assert numel == 1_126_422_017  # B.1: unique drafter parameters

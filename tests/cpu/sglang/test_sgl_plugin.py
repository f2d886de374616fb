"""The ``dspark`` entry point, the DSPARK algorithm's predicates and widths, and the patched call sites."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.sglang
pytest.importorskip("sglang.srt")  # "sglang" alone would find this test dir


def test_entry_point_is_discovered_by_load_plugins():
    """A fresh interpreter: SGLang's own loader finds the entry point and registers DSPARK."""
    code = textwrap.dedent(
        """
        import json
        from importlib.metadata import entry_points
        from sglang.srt.speculative.spec_registry import get_spec
        before = get_spec("DSPARK")
        from sglang.srt.plugins import load_plugins
        load_plugins()
        algo = get_spec("DSPARK")
        eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
        print(json.dumps({"before": before is None, "eps": eps, "cls": type(algo).__name__,
                          "overlap": algo.supports_overlap}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["before"] is True
    assert result["eps"].get("dspark") == "sglang_dspark.plugin:load"
    assert result["cls"] == "DSparkSpecAlgo" and result["overlap"] is True


def test_dspark_predicates_and_widths(dspark_plugin):
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    algo = SpeculativeAlgorithm.from_string("dspark")
    assert algo is dspark_plugin and algo.name == "DSPARK"
    assert algo.is_dspark() and algo.is_dflash_family() and algo.is_speculative()
    assert not algo.is_dflash() and not algo.is_eagle() and not algo.is_none()
    assert algo.supports_target_verify_for_draft() and algo.has_draft_kv()
    assert not algo.need_topk() and not algo.carries_draft_hidden_states()
    assert algo.get_num_tokens_per_bs_for_target_verify(8, is_draft_worker=True) == 7
    assert algo.get_num_tokens_per_bs_for_target_verify(8, is_draft_worker=False) == 8


def test_builtin_predicates(dspark_plugin):
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
    from sglang.srt.speculative.spec_registry import CustomSpecAlgo

    dflash = SpeculativeAlgorithm.DFLASH
    assert dflash.is_dflash_family() and not dflash.is_dspark() and dflash.supports_target_verify_for_draft()
    assert dflash.get_num_tokens_per_bs_for_target_verify(8, True) == 8
    for other in (SpeculativeAlgorithm.EAGLE, SpeculativeAlgorithm.NGRAM, SpeculativeAlgorithm.NONE):
        assert not other.is_dflash_family() and not other.is_dspark()
    plain = CustomSpecAlgo("PLAIN_TEST", lambda server_args: object)
    assert not plain.is_dflash_family() and not plain.is_dspark()
    assert not plain.need_topk() and not plain.carries_draft_hidden_states()
    with pytest.raises(NotImplementedError, match="PLAIN_TEST must implement resolve_target_capture"):
        plain.resolve_target_capture(None, 8)


def test_load_is_idempotent(dspark_plugin):
    from sglang.srt.speculative.spec_registry import get_spec

    from sglang_dspark import plugin

    plugin.load()
    plugin.load()
    assert get_spec("DSPARK") is dspark_plugin


@pytest.fixture
def dspark_server_args(dspark_plugin, model_dirs):
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    target_dir, draft_dir = model_dirs()
    args = ServerArgs(
        model_path=target_dir, device="cuda", skip_tokenizer_init=True,
        speculative_algorithm="DSPARK", speculative_draft_model_path=draft_dir,
    )
    set_global_server_args_for_scheduler(args)
    return args


def test_target_capture_hook(dspark_plugin, dspark_server_args):
    assert dspark_plugin.resolve_target_capture(dspark_server_args, 8) == ([1, 3, 5], 2)
    with pytest.raises(ValueError, match=r"has ids \[5\] outside 0\.\.4 for the 6-layer target"):
        dspark_plugin.resolve_target_capture(dspark_server_args, 6)


def test_dummy_verify_input_is_as_wide_as_the_runner(dspark_plugin, dspark_server_args):
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode
    from sglang.srt.speculative.dflash_info import DFlashVerifyInput
    from sglang.srt.speculative.spec_info import create_dummy_verify_input

    draft = create_dummy_verify_input(dspark_plugin, dspark_server_args, None, 7, is_draft_worker=True)
    target = create_dummy_verify_input(dspark_plugin, dspark_server_args, None, 8, is_draft_worker=False)
    assert isinstance(draft, DFlashVerifyInput) and isinstance(target, DFlashVerifyInput)
    assert (draft.draft_token_num, draft.capture_hidden_mode) == (7, CaptureHiddenMode.NULL)
    assert (target.draft_token_num, target.capture_hidden_mode) == (8, CaptureHiddenMode.FULL)


def test_decode_graph_dummy_spec_info_uses_the_captured_width(dspark_plugin, dspark_server_args):
    from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

    runner = SimpleNamespace(
        model_runner=SimpleNamespace(
            spec_algorithm=dspark_plugin, is_draft_worker=True, attn_backend=object(),
            server_args=dspark_server_args,
        ),
        num_tokens_per_bs=dspark_plugin.get_num_tokens_per_bs_for_target_verify(8, True),
        buffers=SimpleNamespace(custom_mask=None),
    )
    spec_info = DecodeCudaGraphRunner.get_spec_info(runner, num_tokens=7 * 4)
    assert spec_info.draft_token_num == 7 and spec_info.custom_mask is None


def test_future_map_relays_no_topk_or_hidden_states(dspark_plugin, dspark_server_args):
    from sglang.srt.speculative.spec_utils import spec_need_hidden_states

    assert spec_need_hidden_states(dspark_server_args) is False
    pool = SimpleNamespace(req_to_token=torch.zeros(4, 16, dtype=torch.int32))
    future_map = dspark_plugin.create_future_map(torch.device("cpu"), pool)
    payload = SimpleNamespace(hidden_states=torch.zeros(2, 64), draft_probs=None, dsa_topk_indices=None)
    future_map._lazy_init_forward_buf(payload)
    assert future_map.need_topk is False and future_map.need_hidden_states is False


def test_decode_preparation_goes_through_the_draft_input(dspark_plugin):
    from sglang.srt.speculative.spec_utils import spec_prepare_for_decode

    calls = []
    batch = SimpleNamespace(spec_algorithm=dspark_plugin, spec_info=SimpleNamespace(prepare_for_decode=calls.append))
    spec_prepare_for_decode(batch)
    assert calls == [batch]


def test_request_validation_names_the_algorithm(dspark_plugin):
    from sglang.srt.speculative.dflash_utils import validate_dflash_request

    req = SimpleNamespace(return_logprob=True, return_hidden_states=False)
    assert validate_dflash_request(req, True, algo_name=dspark_plugin.name).startswith("DSPARK speculative")
    assert validate_dflash_request(req, True).startswith("DFLASH speculative")


@pytest.mark.parametrize("field, value", [("frequency_penalty", 0.5), ("presence_penalty", -0.3),
                                          ("repetition_penalty", 1.2), ("min_new_tokens", 4)])
def test_dspark_rejects_penalties_per_request(dspark_plugin, field, value):
    """Penalties and min_new_tokens depend on the tokens before each position; a verify step cannot apply
    them exactly, so DSPARK refuses such a request (plain requests and DFLASH stay as they were)."""
    from sglang.srt.sampling.sampling_params import SamplingParams
    from sglang.srt.speculative.dflash_utils import validate_dflash_request

    def req(**params):
        return SimpleNamespace(return_logprob=False, return_hidden_states=False, sampling_params=SamplingParams(**params))

    message = validate_dflash_request(req(**{field: value}), True, algo_name=dspark_plugin.name)
    assert message is not None and "DSPARK" in message and "penalties or min_new_tokens" in message
    assert validate_dflash_request(req(), True, algo_name=dspark_plugin.name) is None
    assert validate_dflash_request(req(**{field: value}), True) is None


def test_torchspec_draft_config_loads_through_model_config(dspark_plugin, model_dirs):
    from sglang.srt.configs.model_config import ModelConfig
    from sglang_fixtures import draft_config
    from transformers import AutoConfig

    from sglang_dspark.plugin import DSparkHFConfig, Qwen3DSparkHFConfig

    for fmt, config_class in (("dspark", DSparkHFConfig), ("qwen3_dspark", Qwen3DSparkHFConfig)):
        _, draft_dir = model_dirs(draft_config(fmt))
        assert type(AutoConfig.from_pretrained(draft_dir)) is config_class
        model_config = ModelConfig(draft_dir, is_draft_model=True, context_length=4096)
        assert model_config.hf_config.architectures == ["Qwen3DSparkModel"]
        assert model_config.hf_config.target_layer_ids == [1, 3, 5]
        assert model_config.num_hidden_layers == 2 and model_config.hf_config.hidden_size == 64


@pytest.mark.skipif(
    importlib.util.find_spec("sglang_dspark.model") is None or importlib.util.find_spec("sglang_dspark.worker") is None,
    reason="sglang_dspark.model / sglang_dspark.worker not written yet",
)
def test_create_worker_registers_the_draft_architectures(dspark_plugin, dspark_server_args):
    from sglang.srt.models.registry import ModelRegistry

    from sglang_dspark.model import DSparkDraftModel
    from sglang_dspark.worker import DSparkWorker

    assert dspark_plugin.create_worker(dspark_server_args) is DSparkWorker
    for arch in ("Qwen3DSparkModel", "DSparkDraftModel"):
        assert ModelRegistry.resolve_model_cls([arch]) == (DSparkDraftModel, arch)

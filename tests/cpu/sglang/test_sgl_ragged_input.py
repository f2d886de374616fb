"""``sglang_dspark.ragged_input.RaggedVerifyInput``: the attention arguments of a ragged verify batch (packed rows,
CUDA-graph padding requests without rows)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.sglang
torch = pytest.importorskip("torch")


class _KvIndices:
    """``create_flashinfer_kv_indices_triton[(bs,)](...)`` in torch: each request's first kv_len slots."""

    def __getitem__(self, grid):
        def fill(req_to_token, req_pool_indices, kv_lens, kv_indptr, kv_start_idx, kv_indices, stride):
            for b, pool in enumerate(req_pool_indices.tolist()):
                start = int(kv_indptr[b])
                kv_indices[start : start + int(kv_lens[b])] = req_to_token[pool, : int(kv_lens[b])]
        return fill


def test_ragged_rows_and_padding(dspark_plugin, monkeypatch):
    import sglang_dspark.ragged_input as module

    monkeypatch.setattr(module, "create_flashinfer_kv_indices_triton", _KvIndices())
    width = 3
    rows = torch.tensor([5, 3, 1], dtype=torch.int32)  # L = 4 / 2 / 0: 9 = 3 x 3 packed rows
    spec = module.RaggedVerifyInput(draft_token=torch.zeros(9, dtype=torch.int64), positions=torch.zeros(9, dtype=torch.int64),
                                    draft_token_num=width, custom_mask=None, rows=rows)
    assert spec.num_tokens_per_req == width  # the host plan: W rows per request
    req_to_token = torch.arange(5 * 50, dtype=torch.int32).view(5, 50)
    pools = torch.tensor([2, 0, 3, 4])  # a fourth, padding request of the CUDA graph
    prefix = torch.tensor([10, 20, 30, 1], dtype=torch.int32)
    kv_indices, kv_indptr, qo_indptr, mask = spec.generate_attn_arg_prefill(pools, prefix, int(prefix.sum()), req_to_token)
    assert mask is None  # causal
    assert qo_indptr.tolist() == [0, 5, 8, 9, 9]
    kv_lens = [15, 23, 31, 1]
    assert kv_indptr.tolist() == [0, 15, 38, 69, 70]
    assert kv_indices.shape[0] >= 70
    for b, (pool, n) in enumerate(zip(pools.tolist(), kv_lens)):
        assert kv_indices[kv_indptr[b] : kv_indptr[b + 1]].tolist() == req_to_token[pool, :n].tolist()


def test_ragged_verify_switch(dspark_plugin, monkeypatch):
    """``SGLANG_DSPARK_RAGGED_VERIFY``: off by default; on only with scheduled verification, the sync-free plan and
    without deterministic inference (launch errors name the knob); any other value fails at launch."""
    import types

    import sglang_dspark.worker as worker_module
    from sglang_dspark.ragged import RAGGED_VERIFY_ENV

    def ragged(env, sync_free=True, deterministic=False, verify="scheduled"):
        worker = object.__new__(worker_module.DSparkWorker)
        worker.__dict__.update(_lengths_from_bounds=sync_free, server_args=types.SimpleNamespace(
            enable_deterministic_inference=deterministic, speculative_dspark_verify=verify))
        if env is None:
            monkeypatch.delenv(RAGGED_VERIFY_ENV, raising=False)
        else:
            monkeypatch.setenv(RAGGED_VERIFY_ENV, env)
        return worker._ragged_verify()

    assert ragged(None) is False and ragged("0") is False and ragged("1") is True
    with pytest.raises(ValueError, match="SGLANG_DSPARK_RAGGED_VERIFY=1 needs the sync-free FlashInfer plan"):
        ragged("1", sync_free=False)
    with pytest.raises(ValueError, match="not supported with --enable-deterministic-inference"):
        ragged("1", deterministic=True)
    with pytest.raises(ValueError, match="needs scheduled verification .* found full"):
        ragged("1", verify="full")
    assert ragged("0", verify="full") is False
    with pytest.raises(ValueError, match="SGLANG_DSPARK_RAGGED_VERIFY: expected 0 or 1, found 'on'"):
        ragged("on")

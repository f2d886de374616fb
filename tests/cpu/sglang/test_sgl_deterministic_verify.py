"""Patch 0010's deterministic DSPARK verify: a verify batch of bs requests x W tokens as bs * W decode rows."""

from __future__ import annotations

import types

import pytest

pytestmark = pytest.mark.sglang
torch = pytest.importorskip("torch")


def test_verify_decode_rows_layout(dspark_plugin):
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

    backend = types.SimpleNamespace(verify_decode_rows=3)
    committed = torch.tensor([10, 4], dtype=torch.int32)
    host_kv = committed + 3 + torch.tensor([0, 2], dtype=torch.int32)  # host lengths: with the block, may be larger
    pools, kv, kv_cpu, kv_sum = FlashInferAttnBackend._verify_decode_rows(
        backend, torch.tensor([5, 9]), committed, host_kv, int(host_kv.sum())
    )
    # Row j of a request is the decode of its token j: it attends to committed + j + 1 slots.
    assert pools.tolist() == [5, 5, 5, 9, 9, 9]
    assert kv.tolist() == [11, 12, 13, 5, 6, 7]
    assert kv_cpu.tolist() == [11, 12, 13, 7, 8, 9]  # the host bound per row, never below the device length
    assert all(h >= d for h, d in zip(kv_cpu.tolist(), kv.tolist())) and kv_sum >= int(kv_cpu.sum())
    # Padded graph rows carry a host length of 1: every row still plans at least one slot.
    _, _, kv_cpu, _ = FlashInferAttnBackend._verify_decode_rows(
        backend, torch.tensor([0]), torch.tensor([1]), torch.tensor([1]), 1
    )
    assert kv_cpu.tolist() == [1, 1, 1]

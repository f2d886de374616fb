"""``sglang_dspark.ragged``: the row layout of per-request verify lengths and the verify input that plans attention
from it (FlashInfer's KV-index kernel replaced by a torch stand-in on CPU)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.sglang


def test_rows_lay_each_request_out_after_the_previous(dspark_plugin):
    from sglang_dspark.ragged import RaggedRows

    gamma = 4
    rows = RaggedRows.build([2, 5, 2], gamma, "cpu")
    assert rows.width == 3 and rows.lengths == (2, 5, 2)
    assert rows.qo_indptr_host.tolist() == [0, 2, 7, 9] and rows.qo_indptr.tolist() == [0, 2, 7, 9]
    assert rows.qo_indptr.dtype == rows.lengths_device.dtype == torch.int32
    # row r -> the [3, gamma + 1] window: request 0 slots 0-1, request 1 slots 0-4, request 2 slots 0-1
    assert rows.window_index.tolist() == [0, 1, 5, 6, 7, 8, 9, 10, 11]
    # read back as [bs, 5]: a request's rows past its length repeat its last row
    assert rows.rows.tolist() == [[0, 1, 1, 1, 1], [2, 3, 4, 5, 6], [7, 8, 8, 8, 8]]
    assert rows.caps.tolist() == [1, 4, 1]
    window = torch.arange(3 * (gamma + 1)).view(3, gamma + 1) * 10
    assert window.view(-1)[rows.window_index].tolist() == [0, 10, 50, 60, 70, 80, 90, 100, 110]


@pytest.mark.parametrize("lengths", [[2, 5, 1], [0, 3, 3], [6, 1, 2]])
def test_rows_refuse_lengths_a_verify_graph_cannot_run(dspark_plugin, lengths):
    from sglang_dspark.ragged import RaggedRows

    with pytest.raises(ValueError, match="per-request verify lengths"):
        RaggedRows.build(lengths, 4, "cpu")  # a total not a multiple of 3, a length 0, a length past gamma + 1


def test_verify_input_plans_each_request_over_its_own_rows(dspark_plugin, monkeypatch):
    """KV length of request b = committed + n_b; a batch padded by the CUDA graph runner gives each padding
    request W rows (host and device layouts alike)."""
    import sglang_dspark.ragged as ragged_module
    from sglang_dspark.ragged import RaggedRows, RaggedVerifyInput

    def kv_indices_kernel(grid):  # create_flashinfer_kv_indices_triton[(bs,)](...) in torch
        def run(req_to_token, req_pool_indices, kv_lens, kv_indptr, kv_start_idx, kv_indices, stride):
            for b, pool in enumerate(req_pool_indices.tolist()):
                start, n = int(kv_indptr[b]), int(kv_lens[b])
                kv_indices[start:start + n] = req_to_token[pool, :n]
        return run

    monkeypatch.setattr(ragged_module, "create_flashinfer_kv_indices_triton",
                        type("K", (), {"__getitem__": lambda self, grid: kv_indices_kernel(grid)})())
    rows = RaggedRows.build([2, 5, 2], 4, "cpu")
    spec = RaggedVerifyInput(draft_token=torch.zeros(9, dtype=torch.int64), positions=torch.zeros(9, dtype=torch.int64),
                             draft_token_num=3, ragged=rows)
    req_to_token = torch.arange(5 * 50, dtype=torch.int32).view(5, 50)
    committed = torch.tensor([10, 20, 30, 1], dtype=torch.int32)  # the fourth: a padding request (fill value 1)
    kv_indices, kv_indptr, qo_indptr, mask = spec.generate_attn_arg_prefill(
        torch.tensor([2, 0, 3, 4]), committed, int(committed.sum()), req_to_token)
    assert mask is None
    assert qo_indptr.tolist() == [0, 2, 7, 9, 12] and spec.ragged_qo_indptr_host(4).tolist() == [0, 2, 7, 9, 12]
    assert spec.ragged_qo_indptr_host(3).tolist() == [0, 2, 7, 9]
    assert kv_indptr.tolist() == [0, 12, 37, 69, 73]  # 10 + 2, 20 + 5, 30 + 2, 1 + 3
    assert kv_indices[:12].tolist() == list(range(100, 112)) and kv_indices[12:37].tolist() == list(range(0, 25))

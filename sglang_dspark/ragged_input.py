"""DFLASH's verify input with per-request row counts, for ragged verification (``sglang_dspark.ragged``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from sglang.srt.layers.attention.utils import create_flashinfer_kv_indices_triton
from sglang.srt.speculative.dflash_info import DFlashVerifyInput


@dataclass
class RaggedVerifyInput(DFlashVerifyInput):
    """``draft_token_num`` (``W``) rows per request on average: ``bs * W`` packed rows, request ``b`` owning
    ``rows[b]`` (int32 ``[bs]``, ``1 + L_b``) of them in order. Attention reads the ragged layout on the device;
    the host plan (``num_tokens_per_req``) keeps ``W`` rows per request, which only has to give every request
    its query tile (FlashInfer skips rows past a request's device length)."""

    rows: Optional[torch.Tensor] = None

    def generate_attn_arg_prefill(
        self,
        req_pool_indices: torch.Tensor,
        paged_kernel_lens: torch.Tensor,
        paged_kernel_lens_sum: int,
        req_to_token: torch.Tensor,
        kv_start_idx: Optional[torch.Tensor] = None,
    ):
        """(kv_indices, kv_indptr, qo_indptr, no mask: causal) for the ragged rows; requests past ``rows`` (CUDA
        graph padding) get none. ``paged_kernel_lens`` ``[bs]``: the committed prefix lengths."""
        bs = len(req_pool_indices)
        device = req_pool_indices.device
        rows = torch.zeros((bs,), dtype=torch.int32, device=device)
        rows[: self.rows.shape[0]] = self.rows
        qo_indptr = torch.zeros((bs + 1,), dtype=torch.int32, device=device)
        qo_indptr[1:] = torch.cumsum(rows, 0)
        kv_lens = paged_kernel_lens + rows
        kv_indptr = torch.zeros((bs + 1,), dtype=torch.int32, device=device)
        kv_indptr[1:] = torch.cumsum(kv_lens, 0)
        kv_indices = torch.empty(paged_kernel_lens_sum + self.draft_token_num * bs, dtype=torch.int32, device=device)
        create_flashinfer_kv_indices_triton[(bs,)](
            req_to_token, req_pool_indices, kv_lens, kv_indptr, kv_start_idx, kv_indices, req_to_token.size(1)
        )
        return kv_indices, kv_indptr, qo_indptr, None

"""Per-request verify lengths in one verify forward (experimental: ``SGLANG_DSPARK_PER_REQUEST_LENGTHS=1``).

The width planner (``verify_width.WidthPlanner.plan``) may give request ``b`` its own verify length ``n_b``
(``1..gamma + 1`` tokens: the anchor and ``n_b - 1`` drafts) with ``sum_b n_b = bs * W``. The step then replays
the target's width-``W`` verify graph (the same number of rows, so the same graph and FlashInfer plan shape:
FlashInfer's CUDA-graph plan lets the query lengths vary at a fixed total) with the rows laid out request by
request: request ``b`` owns rows ``qo_indptr[b] .. qo_indptr[b + 1] - 1``. ``RaggedRows`` holds that layout
(built on the host, one host-to-device copy) and ``RaggedVerifyInput`` is the DFLASH verify input that plans
attention from it. Acceptance reads the rows back into the ``[bs, max n_b]`` layout of a uniform step, with each
request's drafts capped at ``n_b - 1`` (``accept.accept_drafts(..., verified=caps)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from sglang.srt.layers.attention.utils import create_flashinfer_kv_indices_triton
from sglang.srt.speculative.dflash_info import DFlashVerifyInput


@dataclass(frozen=True)
class RaggedRows:
    """The row layout of a step whose requests verify ``lengths`` tokens each (``sum = bs * width``)."""

    lengths: tuple[int, ...]  # host, n_b per request
    width: int  # W: the verify graph replayed (sum(lengths) / bs)
    qo_indptr_host: torch.Tensor  # int32 [bs + 1], cpu
    window_index: torch.Tensor  # int64 [bs * W], device: row r -> index into the [bs, gamma + 1] window, flattened
    rows: torch.Tensor  # int64 [bs, max n_b], device: row of request b's j-th token (its last row past n_b)
    caps: torch.Tensor  # int64 [bs], device: drafts verified per request, n_b - 1
    qo_indptr: torch.Tensor  # int32 [bs + 1], device
    lengths_device: torch.Tensor  # int32 [bs], device

    @classmethod
    def build(cls, lengths: Sequence[int], gamma: int, device: torch.device | str) -> "RaggedRows":
        n = np.asarray(lengths, dtype=np.int64)
        bs, total, longest = len(n), int(n.sum()), int(n.max())
        if total % bs or not (1 <= n.min() and longest <= gamma + 1):
            raise ValueError(f"DSPARK per-request verify lengths {list(n)}: expected 1..{gamma + 1} each and a "
                             f"total that is a multiple of the batch size {bs}")
        starts = np.concatenate(([0], np.cumsum(n)))
        request = np.repeat(np.arange(bs), n)  # [total]: the request of each row
        offset = np.arange(total) - starts[request]  # position of the row within its request
        j = np.arange(longest)
        packed = np.concatenate((
            request * (gamma + 1) + offset,  # window_index
            (starts[:-1, None] + np.minimum(j, n[:, None] - 1)).reshape(-1),  # rows
            n - 1, starts, n,  # caps, qo_indptr, lengths
        ))
        host = torch.from_numpy(packed)
        if torch.device(device).type == "cuda":
            host = host.pin_memory()
        on_device = host.to(device, non_blocking=True)
        sizes = (total, bs * longest, bs, bs + 1, bs)
        window_index, rows, caps, qo_indptr, lengths_device = torch.split(on_device, sizes)
        return cls(
            lengths=tuple(int(x) for x in n), width=total // bs,
            qo_indptr_host=torch.from_numpy(starts.astype(np.int32)), window_index=window_index,
            rows=rows.view(bs, longest), caps=caps, qo_indptr=qo_indptr.to(torch.int32),
            lengths_device=lengths_device.to(torch.int32),
        )


@dataclass
class RaggedVerifyInput(DFlashVerifyInput):
    """A DFLASH verify input (``draft_token_num = W``) whose requests own ``ragged.lengths`` rows each.

    A batch padded by the CUDA graph runner (to a captured batch size) gives each padding request ``W`` rows,
    as a uniform verify would."""

    ragged: Optional[RaggedRows] = field(default=None)

    def _padded(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(qo_indptr int32 ``[bs + 1]``, lengths int32 ``[bs]``) on the device for ``bs >=`` the real batch."""
        extra = bs - len(self.ragged.lengths)
        if extra == 0:
            return self.ragged.qo_indptr, self.ragged.lengths_device
        w = self.draft_token_num
        pad = torch.full((extra,), w, dtype=torch.int32, device=self.ragged.qo_indptr.device)
        tail = self.ragged.qo_indptr[-1:] + torch.arange(1, extra + 1, dtype=torch.int32, device=pad.device) * w
        return torch.cat((self.ragged.qo_indptr, tail)), torch.cat((self.ragged.lengths_device, pad))

    def ragged_qo_indptr_host(self, bs: int) -> torch.Tensor:
        """Host qo_indptr int32 ``[bs + 1]`` for FlashInfer's sync-free plan (patch 0010)."""
        host = self.ragged.qo_indptr_host
        extra = bs - len(self.ragged.lengths)
        if extra == 0:
            return host
        return torch.cat((host, host[-1] + torch.arange(1, extra + 1, dtype=torch.int32) * self.draft_token_num))

    def generate_attn_arg_prefill(
        self,
        req_pool_indices: torch.Tensor,
        paged_kernel_lens: torch.Tensor,
        paged_kernel_lens_sum: int,
        req_to_token: torch.Tensor,
        kv_start_idx: Optional[torch.Tensor] = None,
    ):
        """As DFLASH's, with request ``b`` attending over its committed length plus its own ``n_b`` rows."""
        bs = len(req_pool_indices)
        qo_indptr, lengths = self._padded(bs)
        kv_lens = paged_kernel_lens + lengths
        kv_indptr = torch.zeros((bs + 1,), dtype=torch.int32, device=req_pool_indices.device)
        kv_indptr[1:] = torch.cumsum(kv_lens, dim=0)
        kv_indices = torch.empty(
            paged_kernel_lens_sum + self.draft_token_num * bs, dtype=torch.int32, device=req_pool_indices.device
        )
        create_flashinfer_kv_indices_triton[(bs,)](
            req_to_token, req_pool_indices, kv_lens, kv_indptr, kv_start_idx, kv_indices, req_to_token.size(1)
        )
        return kv_indices, kv_indptr, qo_indptr, None

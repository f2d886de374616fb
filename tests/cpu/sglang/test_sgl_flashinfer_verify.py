"""Patch 0010 (FlashInfer, DSPARK verify): the deterministic decode-row layout, the no-split plan from upper bounds."""

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


def test_fast_prefill_plan_passes_disable_split_kv(dspark_plugin):
    """Patch 0010: the sync-free verify plan hands ``disable_split_kv`` to FlashInfer's planner (a backend that
    plans from upper-bound lengths must not split the KV)."""
    from sglang.srt.layers.attention.flashinfer_backend import fast_prefill_plan

    for disable in (False, True):
        calls = []
        bs, width = 2, 3
        wrapper = types.SimpleNamespace(
            is_cuda_graph_enabled=True, _backend="fa2", _max_total_num_rows=None, device=torch.device("cpu"),
            _cached_module=types.SimpleNamespace(plan=lambda *args: calls.append(args)),
            _float_workspace_buffer=None, _int_workspace_buffer=None, _pin_memory_int_workspace_buffer=None,
            _qo_indptr_buf=torch.zeros(bs + 1, dtype=torch.int32), _paged_kv_indptr_buf=torch.zeros(bs + 1, dtype=torch.int32),
            _paged_kv_last_page_len_buf=torch.zeros(bs, dtype=torch.int32), _paged_kv_indices_buf=torch.zeros(64, dtype=torch.int32),
        )
        qo = torch.arange(0, (bs + 1) * width, width, dtype=torch.int32)
        kv = torch.tensor([0, 10, 25], dtype=torch.int32)
        fast_prefill_plan(
            wrapper, qo, kv, torch.arange(25, dtype=torch.int32), torch.ones(bs, dtype=torch.int32), 4, 2, 8, 1,
            causal=True, qo_indptr_host=qo, kv_indptr_host=kv, kv_lens_host=torch.tensor([10, 15], dtype=torch.int32),
            max_q_len=width, max_kv_len=15, disable_split_kv=disable,
        )
        assert len(calls) == 1 and calls[0][-2] is disable and calls[0][-3] == -1  # no fixed split size given


@pytest.mark.parametrize("needs_cpu", [True, False])
def test_verify_plan_splits_kv_only_with_host_lengths(dspark_plugin, needs_cpu):
    """Patch 0010: a backend that opted out of the host seq_lens mirror plans DSPARK's verify without a KV split
    at capture (FlashInfer's real ``plan``) as well as at replay (``fast_prefill_plan``). In CUDA-graph mode
    FlashInfer always splits unless told not to, and a graph captured with a split keeps launching the split
    kernel and its merge, which a replay planned without one leaves reading the stale split layout."""
    from functools import partial

    from sglang.srt.layers.attention.flashinfer_backend import FlashInferIndicesUpdaterPrefill, fast_prefill_plan
    from sglang.srt.speculative.dflash_info import DFlashVerifyInput

    bs, width = 2, 3
    lens = torch.tensor([10, 15], dtype=torch.int32)
    kv_indptr = torch.tensor([0, 10, 25], dtype=torch.int32)
    qo_indptr = torch.arange(0, (bs + 1) * width, width, dtype=torch.int32)

    class Verify(DFlashVerifyInput):
        def generate_attn_arg_prefill(self, *args, **kwargs):
            return torch.arange(25, dtype=torch.int32), kv_indptr, qo_indptr, None

    spec_info = Verify(draft_token=torch.zeros(bs * width), positions=torch.zeros(bs * width), draft_token_num=width)
    updater = types.SimpleNamespace(
        attn_backend=types.SimpleNamespace(needs_cpu_seq_lens=needs_cpu), num_qo_heads=4, num_kv_heads=2,
        head_dim=8, q_data_type=torch.bfloat16, data_type=torch.bfloat16, req_to_token=None,
        kv_last_page_len=torch.ones(bs, dtype=torch.int32),
    )
    capture_kwargs, replay_args = {}, []
    wrapper = types.SimpleNamespace(
        begin_forward=lambda *args, **kwargs: capture_kwargs.update(kwargs),  # the real plan at capture
        is_cuda_graph_enabled=True, _backend="fa2", _max_total_num_rows=None, device=torch.device("cpu"),
        _cached_module=types.SimpleNamespace(plan=lambda *args: replay_args.append(args)),
        _float_workspace_buffer=None, _int_workspace_buffer=None, _pin_memory_int_workspace_buffer=None,
        _qo_indptr_buf=torch.zeros(bs + 1, dtype=torch.int32), _paged_kv_indptr_buf=torch.zeros(bs + 1, dtype=torch.int32),
        _paged_kv_last_page_len_buf=torch.zeros(bs, dtype=torch.int32), _paged_kv_indices_buf=torch.zeros(64, dtype=torch.int32),
    )

    def plan():
        FlashInferIndicesUpdaterPrefill.call_begin_forward(
            updater, None, wrapper, torch.arange(bs), lens + width, int(lens.sum()) + bs * width, lens, None,
            None, None, None, use_ragged=False, spec_info=spec_info, seq_lens_cpu=lens + width,
        )

    plan()
    assert capture_kwargs["disable_split_kv"] is (not needs_cpu)
    wrapper.begin_forward = partial(fast_prefill_plan, wrapper)  # installed after capture
    plan()
    assert len(replay_args) == 1 and replay_args[0][-2] is (not needs_cpu)


def test_sync_free_plan_by_default(dspark_plugin, monkeypatch):
    """Once the scheduler has built the attention backends (after the workers: ``init_attention_backends``),
    both FlashInfer backends opt out of the host seq_lens mirror by default and the worker plans from the
    reserved bounds; ``SGLANG_DSPARK_NO_SEQ_LENS_SYNC=0`` keeps the host lengths; with another backend the
    default keeps them too, while ``=1`` is refused naming the knob; any other value fails at launch."""
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

    import sglang_dspark.worker as worker_module

    def init_backends(target, draft, env):
        """The scheduler's order: the target worker's backends, then ``draft_worker.init_attention_backends()``
        (DFLASH builds the draft runner's backend there)."""
        draft_runner = types.SimpleNamespace()
        worker = object.__new__(worker_module.DSparkWorker)
        worker.__dict__.update(
            _target_worker=types.SimpleNamespace(model_runner=types.SimpleNamespace(attn_backend=target)),
            _draft_worker=types.SimpleNamespace(init_attention_backends=lambda: setattr(draft_runner, "attn_backend", draft)),
            draft_model_runner=draft_runner,
        )
        if env is None:
            monkeypatch.delenv(worker_module.NO_SEQ_LENS_SYNC_ENV, raising=False)
        else:
            monkeypatch.setenv(worker_module.NO_SEQ_LENS_SYNC_ENV, env)
        worker.init_attention_backends()
        return worker

    def flashinfer():
        return object.__new__(FlashInferAttnBackend)

    target, draft = flashinfer(), flashinfer()
    assert target.needs_cpu_seq_lens and draft.needs_cpu_seq_lens  # SGLang's default for FlashInfer
    assert not init_backends(target, draft, "0")._lengths_from_bounds
    assert target.needs_cpu_seq_lens and draft.needs_cpu_seq_lens
    for env in (None, "1"):
        target, draft = flashinfer(), flashinfer()
        assert init_backends(target, draft, env)._lengths_from_bounds  # the worker then plans from the bounds
        assert target.needs_cpu_seq_lens is False and draft.needs_cpu_seq_lens is False
    other = types.SimpleNamespace(needs_cpu_seq_lens=True)
    with pytest.raises(ValueError, match="SGLANG_DSPARK_NO_SEQ_LENS_SYNC=1 needs FlashInfer"):
        init_backends(flashinfer(), other, "1")
    target = flashinfer()
    assert not init_backends(target, other, None)._lengths_from_bounds
    assert other.needs_cpu_seq_lens is True and target.needs_cpu_seq_lens is True
    with pytest.raises(ValueError, match="SGLANG_DSPARK_NO_SEQ_LENS_SYNC: expected 0 or 1, found 'yes'"):
        init_backends(flashinfer(), flashinfer(), "yes")

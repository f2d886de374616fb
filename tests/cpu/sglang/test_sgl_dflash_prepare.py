"""Patch 0013: ``DFlashDraftInputV2.prepare_for_decode`` gathers the per-request lengths in lists and writes
each host buffer once; what it hands on (host lengths and sums, reserved bounds, top-k summary, the requests'
allocation watermarks, the slots it asks for and maps) is what the per-request loop it replaces computed."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.sglang
pytest.importorskip("sglang.srt")  # "sglang" alone would find this test dir

BLOCK = 8  # --speculative-num-draft-tokens


def expected(reqs: list[SimpleNamespace]) -> dict:
    """The replaced loop's results, written out per request."""
    committed = [r.kv_committed_len for r in reqs]
    allocated = [r.kv_allocated_len for r in reqs]
    reserved = [max(a, c + 2 * BLOCK) for a, c in zip(allocated, committed)]
    top_ks = [r.sampling_params.top_k for r in reqs]
    return {"committed": committed, "allocated": allocated, "reserved": reserved,
            "needed": sum(reserved) - sum(allocated), "max_top_k": max(1, *top_ks),
            "uniform": top_ks[0] if len(set(top_ks)) == 1 else None}


@pytest.mark.parametrize("seed", range(6))
def test_prepare_for_decode_matches_the_per_request_loop(monkeypatch, seed):
    import sglang.srt.speculative.dflash_info_v2 as module

    rng = random.Random(seed)
    bs = rng.choice([1, 3, 32, 40])
    uniform = seed % 2 == 0
    reqs = []
    for _ in range(bs):
        committed = rng.randint(1, 500)
        reqs.append(SimpleNamespace(
            kv_committed_len=committed, kv_allocated_len=committed + rng.choice([0, 5, 2 * BLOCK, 3 * BLOCK]),
            sampling_params=SimpleNamespace(top_k=1 if uniform else rng.choice([1, 20, 50]))))
    want = expected(reqs)
    asked, mapped = [], []
    server_args = SimpleNamespace(speculative_num_draft_tokens=BLOCK)
    monkeypatch.setattr(module, "get_global_server_args", lambda: server_args)
    monkeypatch.setattr(module, "alloc_token_slots", lambda tree_cache, n: asked.append(n) or torch.arange(n))

    def assign(pool_idx, req_to_token, cur, nxt, loc, n):
        mapped.append((cur.tolist(), nxt.tolist(), len(loc)))

    monkeypatch.setattr(module, "assign_req_to_token_pool_func", assign)
    batch = SimpleNamespace(
        reqs=reqs, device="cpu", batch_size=lambda: bs, req_pool_indices=torch.arange(bs),
        token_to_kv_pool_allocator=SimpleNamespace(page_size=1), tree_cache=None,
        req_to_token_pool=SimpleNamespace(req_to_token=None))
    info = module.DFlashDraftInputV2.create_idle_input("cpu")
    info.prepare_for_decode(batch)

    assert batch.seq_lens_cpu.tolist() == want["committed"] and batch.seq_lens_sum == sum(want["committed"])
    assert info.reserved_seq_lens_cpu.tolist() == want["reserved"]
    assert info.reserved_seq_lens_sum == sum(want["reserved"])
    assert (info.max_top_k, info.uniform_top_k_value) == (want["max_top_k"], want["uniform"])
    assert [r.kv_allocated_len for r in reqs] == want["reserved"]
    if want["needed"]:
        assert asked == [want["needed"]] and mapped == [(want["allocated"], want["reserved"], want["needed"])]
    else:
        assert asked == [] and mapped == []

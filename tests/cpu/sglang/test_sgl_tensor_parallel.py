"""DSPARK under tensor parallelism, on CPU: launch arguments with ``--tp-size``, the target's vocab-parallel
lm_head gathered back into the full table (real ``ParallelLMHead`` shards, padding and LoRA-added rows), and
rank 0's uniforms and draft hidden states taken by every rank each step (fake TP groups)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from sglang_fixtures import draft_config, run_worker_step_checks

pytestmark = pytest.mark.sglang
pytest.importorskip("sglang.srt")  # "sglang" alone would find this test dir



# ---- launch arguments ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_is_accepted(parse, tp):
    """The draft (4 query heads, 2 key/value heads, intermediate 128) splits over 2 and 4 ranks."""
    args = parse("--tp-size", str(tp))
    assert args.tp_size == tp
    assert (args.speculative_dspark_block_size, args.speculative_num_draft_tokens) == (7, 8)
    assert args.speculative_draft_attention_backend == "flashinfer"


@pytest.mark.parametrize(
    "tp, draft",
    [
        (3, draft_config()),  # 4 query heads over 3 ranks
        (2, draft_config(num_key_value_heads=3, num_attention_heads=6, head_dim=16)),  # 3 kv heads over 2
        (2, draft_config(intermediate_size=129)),
    ],
)
def test_tensor_parallel_that_does_not_split_the_draft_is_rejected(parse, tp, draft):
    with pytest.raises(ValueError) as info:
        parse("--tp-size", str(tp), draft=draft)
    message = str(info.value)
    assert f"--tp-size {tp} does not split the draft" in message
    assert "'num_attention_heads'" in message and "'num_key_value_heads'" in message


def test_dp_attention_is_still_rejected_with_tp(parse):
    with pytest.raises(ValueError, match="--enable-dp-attention"):
        parse("--tp-size", "2", "--dp-size", "2", "--enable-dp-attention")


# ---- the lm_head gathered across ranks -----------------------------------------------------------------


def _rank_heads(vocab: int, added: int, tp: int, d: int, full: torch.Tensor, added_rows: torch.Tensor):
    """One real ``ParallelLMHead`` per rank of a ``tp``-way split, loaded through its own weight loader with
    ``full`` ``[vocab, d]``; LoRA-added rows set to ``added_rows`` and padding rows to a sentinel, so a wrong row
    choice shows."""
    from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead
    from sglang.srt.runtime_context import get_parallel

    heads = []
    for rank in range(tp):
        with get_parallel().override(tp_size=tp, tp_rank=rank, attn_tp_size=tp, attn_tp_rank=rank):
            head = ParallelLMHead(vocab + added, d, org_num_embeddings=vocab, params_dtype=torch.float32)
        head.weight_loader(head.weight, full)
        s = head.shard_indices
        with torch.no_grad():
            head.weight[s.num_org_elements:].fill_(1e4)  # padding (and added-vocab padding)
            added_start = s.num_org_elements_padded
            head.weight[added_start:added_start + s.num_added_elements].copy_(
                added_rows[s.added_vocab_start_index - vocab:s.added_vocab_end_index - vocab])
        heads.append(head)
    return heads


# (vocab, LoRA-added rows, tp): no padding; padding on the last rank only; a whole rank of padding; added vocab
# interleaved per rank (VocabParallelEmbedding's docstring example, 1010 + 16).
LAYOUTS = [(2048, 0, 2), (1000, 0, 2), (100, 0, 4), (1010, 16, 2), (1000, 0, 4)]


@pytest.mark.parametrize("vocab, added, tp", LAYOUTS)
def test_gathered_vocab_rows_reassemble_real_parallel_lm_head_shards(vocab, added, tp):
    from sglang_dspark.worker import gathered_vocab_rows

    d, gen = 8, torch.Generator().manual_seed(vocab + tp)
    full, added_rows = torch.randn(vocab, d, generator=gen), torch.randn(max(added, 1), d, generator=gen) - 50
    heads = _rank_heads(vocab, added, tp, d, full, added_rows)
    gathered = torch.cat([h.weight.detach() for h in heads])  # what the TP all-gather returns
    ranges = [(h.shard_indices.org_vocab_start_index, h.shard_indices.org_vocab_end_index) for h in heads]
    rows = gathered_vocab_rows(ranges, heads[0].weight.shape[0], vocab)
    assert rows.dtype == torch.int64 and rows.shape == (vocab,)
    assert torch.equal(gathered.index_select(0, rows), full)
    # Without added vocab the tokens are the gathered table's first rows (the logits processor's own cut);
    # added rows sit inside each rank's shard, so there the first rows are not the vocabulary.
    assert torch.equal(gathered[:vocab], full) == (added == 0)


@pytest.mark.parametrize(
    "ranges, rows_per_rank, vocab, expected",
    [
        ([(0, 5), (6, 10)], 5, 10, "rank 1's vocab shard to hold token ids 5.."),  # a gap
        ([(0, 5), (4, 10)], 6, 10, "rank 1's vocab shard to hold token ids 5.."),  # an overlap
        ([(0, 7), (7, 10)], 6, 10, "in at most 6 rows, found ids 0..6"),  # more ids than rows
        ([(0, 5), (5, 8)], 5, 10, "token ids 0..9, found 0..7"),  # too few ids
    ],
)
def test_gathered_vocab_rows_rejects_shards_that_do_not_tile_the_vocab(ranges, rows_per_rank, vocab, expected):
    from sglang_dspark.worker import gathered_vocab_rows

    with pytest.raises(ValueError, match="DSPARK lm_head gather") as info:
        gathered_vocab_rows(ranges, rows_per_rank, vocab)
    assert expected in str(info.value)


class _GatherGroup:
    """A TP group whose ``all_gather`` returns the given per-rank shards (checking the caller sends its own)."""

    def __init__(self, shards: list[torch.Tensor], rank: int) -> None:
        self.shards, self.rank, self.world_size, self.calls = shards, rank, len(shards), 0

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        assert dim == 0 and torch.equal(tensor, self.shards[self.rank])
        self.calls += 1
        return torch.cat(self.shards)


def _lm_head_worker(head, vocab: int, group, rank: int):
    from sglang_dspark.worker import DSparkWorker

    worker = object.__new__(DSparkWorker)
    worker.__dict__.update(
        _target_worker=SimpleNamespace(model_runner=SimpleNamespace(model=SimpleNamespace(lm_head=head))),
        server_args=SimpleNamespace(speculative_draft_model_path="/drafts/tiny"), tp_rank=rank, _tp_group=group,
        _dspark_config=lambda: SimpleNamespace(vocab_size=vocab),
    )
    return worker


@pytest.mark.parametrize("vocab, added, tp", [(1000, 0, 2), (1010, 16, 2), (100, 0, 4)])
def test_worker_gathers_the_full_lm_head_on_every_rank(vocab, added, tp, caplog):
    d, gen = 8, torch.Generator().manual_seed(7)
    full, added_rows = torch.randn(vocab, d, generator=gen), torch.randn(max(added, 1), d, generator=gen)
    heads = _rank_heads(vocab, added, tp, d, full, added_rows)
    shards = [h.weight.detach() for h in heads]
    for rank, head in enumerate(heads):
        group = _GatherGroup(shards, rank)
        with caplog.at_level(logging.INFO, logger="sglang_dspark"):
            caplog.clear()
            table = _lm_head_worker(head, vocab, group, rank)._target_lm_head_weight()
        assert group.calls == 1
        assert table.is_contiguous() and torch.equal(table, full)
        logged = f"[{vocab}, {d}] torch.float32: +{vocab * d * 4 / 2**20:.1f} MiB per GPU"
        assert (logged in caplog.text) == (rank == 0), caplog.text


def test_worker_keeps_the_lm_head_itself_at_tp1():
    from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead
    from sglang.srt.runtime_context import get_parallel

    with get_parallel().override(tp_size=1, tp_rank=0, attn_tp_size=1, attn_tp_rank=0):
        head = ParallelLMHead(1000, 8, params_dtype=torch.float32)
    table = _lm_head_worker(head, 1000, None, 0)._target_lm_head_weight()
    assert table.shape == (1000, 8) and table.data_ptr() == head.weight.data_ptr()  # a view, no copy


def test_worker_checks_the_draft_vocab_against_the_whole_split_lm_head():
    full = torch.randn(1000, 8)
    heads = _rank_heads(1000, 0, 2, 8, full, torch.zeros(1, 8))
    with pytest.raises(ValueError, match="key 'vocab_size': expected 1000 .*found 500"):
        _lm_head_worker(heads[1], 500, _GatherGroup([h.weight.detach() for h in heads], 1), 1)._target_lm_head_weight()
    with pytest.raises(ValueError, match="split over 2 ranks, expected the TP group's 1 ranks"):
        _lm_head_worker(heads[0], 1000, None, 0)._target_lm_head_weight()


# ---- rank 0's step inputs on every rank ----------------------------------------------------------------


class _BroadcastGroup:
    """One rank's view of a TP group: ``broadcast`` from ``src`` puts the source rank's bytes into ``tensor`` on
    every rank (ranks called in order, source first, sharing ``network``; without one, the caller is rank 0 of a
    group of 2). Records the calls."""

    def __init__(self, rank: int = 0, network: dict | None = None) -> None:
        self.rank, self.network, self.world_size, self.calls = rank, {} if network is None else network, 2, []
        self.objects = []  # broadcast_object calls: (src, object sent or received)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        self.calls.append((src, tensor.dtype, tensor.numel()))
        if self.rank == src:
            self.network["payload"] = tensor.clone()
        else:
            tensor.copy_(self.network["payload"])
        return tensor

    def broadcast_object(self, obj=None, src: int = 0):
        if self.rank == src:
            self.network["object"] = obj
        self.objects.append((src, self.network["object"]))
        return self.network["object"]


@pytest.mark.parametrize("dtype, bs, gamma, d", [(torch.bfloat16, 3, 7, 64), (torch.float32, 1, 3, 5),
                                                 (torch.float16, 1, 1, 3)])
def test_every_rank_takes_rank0_uniforms_and_hidden_states(dtype, bs, gamma, d):
    """Rank 0 keeps its own step inputs; rank 1 ends with rank 0's, bit for bit (odd sizes included)."""
    from sglang_dspark.worker import DSparkWorker

    gen = torch.Generator().manual_seed(bs)
    inputs = [(torch.rand(bs, 2 * gamma + 2, generator=gen), torch.randn(bs * gamma, d, generator=gen).to(dtype))
              for _ in range(2)]
    network: dict = {}
    got = []
    for rank, (draws, hidden) in enumerate(inputs):
        worker = object.__new__(DSparkWorker)
        worker._tp_group = _BroadcastGroup(rank, network)
        got.append(worker._from_tp_rank0(draws.clone(), hidden.clone()))
        assert [src for src, _, _ in worker._tp_group.calls] == [0]  # one broadcast, from TP rank 0
    draws0, hidden0 = inputs[0]
    for draws, hidden in got:
        assert draws.dtype == torch.float32 and draws.shape == draws0.shape and torch.equal(draws, draws0)
        assert hidden.dtype == dtype and hidden.shape == hidden0.shape and torch.equal(hidden, hidden0)
        assert hidden.data_ptr() % 16 == 0 and draws.data_ptr() % 16 == 0
    assert not torch.equal(inputs[1][0], draws0)  # rank 1 really had other inputs


def test_decode_step_broadcasts_once_per_step(dspark_plugin, tmp_path, monkeypatch):
    """``tests/gpu/unit.py``'s worker step (greedy, mixed, simulated, scheduled widths 3 and 1, per-request lengths
    greedy and mixed) with a TP group:
    every check still passes and each decode step broadcasts exactly once, from rank 0 (a width-1 step drafts
    nothing but still takes rank 0's uniforms)."""
    import sglang_dspark.worker as worker_module

    group = _BroadcastGroup()
    monkeypatch.setattr(worker_module.DSparkWorker, "_tp_group", group)
    checks = run_worker_step_checks("worker-step-tp", tmp_path, monkeypatch)
    failed = [c for c in checks if not c["ok"]]
    assert len(checks) == 10 and not failed, failed
    assert [src for src, _, _ in group.calls] == [0] * 10
    # the scheduled steps' plans (width, per-request lengths), from rank 0
    assert group.objects == [(0, (3, None)), (0, (1, None)), (0, (3, [2, 5, 2])), (0, (3, [2, 5, 2])),
                             (0, (2, [1, 1, 4])), (0, (4, [5, 3, 4]))]


def test_every_rank_takes_rank0_verify_width(dspark_plugin):
    """Scheduled verification under TP: each rank's planner may see other host times and lagged gains; the step
    runs rank 0's width (and per-request lengths) on every rank."""
    import types

    from sglang_dspark.worker import DSparkWorker

    network: dict = {}
    widths = []
    for rank, own in ((0, (2, [1, 3])), (1, (5, None))):
        worker = object.__new__(DSparkWorker)
        worker.__dict__.update(_planner=types.SimpleNamespace(plan=lambda bs, rids, own=own: own),
                               _tp_group=_BroadcastGroup(rank, network))
        widths.append(worker._step_plan(2, None, None))
    assert widths == [(2, [1, 3]), (2, [1, 3])]

"""``sglang_dspark.ragged``: per-request verify lengths within a step's budget, the packed layout, and the cut
of an all-drafts acceptance to each request's verified prefix (exactly what verifying only that prefix gives)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sglang_dspark.accept import TargetSampling, accept_drafts, target_token_at
from sglang_dspark.cost_profile import CostProfile
from sglang_dspark.ragged import cap, ragged_layout, ragged_lengths
from sglang_dspark.verify_width import WidthPlanner


def test_lengths_spread_the_budget_by_survival():
    survival = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.95, 0.85, 0.1, 0.05], [0.2, 0.1, 0.05, 0.01]])
    assert ragged_lengths(survival, 6).tolist() == [4, 2, 0]
    assert ragged_lengths(survival, 0).tolist() == [0, 0, 0]
    assert ragged_lengths(survival, 12).tolist() == [4, 4, 4]
    ties = torch.ones((3, 4))  # every survival equal: any split, but always the whole budget, within gamma
    lengths = ragged_lengths(ties, 5)
    assert int(lengths.sum()) == 5 and bool((lengths <= 4).all())


def test_layout_packs_each_requests_prefix_and_maps_back():
    gamma, lengths = 4, torch.tensor([4, 2, 0])
    width = 3  # budget 3 x 3 rows: sum (1 + L) = 9
    window = torch.arange(3 * (gamma + 1)).view(3, gamma + 1) + 100
    layout = ragged_layout(lengths, gamma, width)
    packed = window.reshape(-1)[layout.order]
    assert packed.tolist() == [100, 101, 102, 103, 104, 105, 106, 107, 110]
    assert layout.qo_indptr.tolist() == [0, 5, 8, 9] and layout.rows.tolist() == [5, 3, 1]
    # Window slot j of request b reads packed row min(j, L_b) of that request.
    want = torch.stack([window[b, torch.clamp(torch.arange(gamma + 1), max=int(n))] for b, n in enumerate(lengths)])
    assert torch.equal(packed[layout.window_rows], want)


def _sampling(bs: int) -> TargetSampling:
    return TargetSampling(temperature=torch.full((bs,), 0.8), top_k=torch.full((bs,), 1 << 30),
                          top_p=torch.ones(bs), max_top_k=0, apply_top_k=False, apply_top_p=False)


@pytest.mark.parametrize("greedy", [True, False])
def test_cap_equals_verifying_only_the_prefix(greedy):
    """With the same draws, the cut all-drafts outcome is the outcome of verifying the first L_b drafts: the
    decisions before L_b are the same ones, and where they all accept, the bonus is p_{L_b}'s sample (or argmax)
    with the bonus draw, as the L_b-draft chain would take it."""
    gen = torch.Generator().manual_seed(0)
    bs, gamma, vocab = 64, 4, 6
    logits = torch.randn((bs, gamma + 1, vocab), generator=gen) * 2
    q = torch.softmax(torch.randn((bs, gamma, vocab), generator=gen), -1)
    top1 = logits.argmax(-1)[:, :gamma]
    drafts = torch.where(torch.rand((bs, gamma), generator=gen) < 0.7, top1, torch.randint(0, vocab, (bs, gamma), generator=gen))
    coins, bonus_u = torch.rand((bs, gamma), generator=gen), torch.rand((bs,), generator=gen)
    lengths = torch.randint(0, gamma + 1, (bs,), generator=gen)
    flags = torch.full((bs,), greedy)
    sampling = None if greedy else _sampling(bs)
    accepted, bonus = accept_drafts(drafts, logits, q, flags, sampling, coins, bonus_u)
    accepted, bonus = cap(accepted, bonus, lengths, logits, flags, sampling, bonus_u)
    for b in range(bs):
        n = int(lengths[b])
        one = None if greedy else _sampling(1)
        if n == 0:
            want_a, want_y = 0, int(target_token_at(logits[b : b + 1], torch.zeros(1, dtype=torch.int64), flags[:1], one, bonus_u[b : b + 1]))
        else:
            a, y = accept_drafts(drafts[b : b + 1, :n], logits[b : b + 1, : n + 1], q[b : b + 1, :n], flags[:1], one,
                                 coins[b : b + 1, :n], bonus_u[b : b + 1])
            want_a, want_y = int(a), int(y)
        assert (int(accepted[b]), int(bonus[b])) == (want_a, want_y), b
    assert bool((accepted <= lengths).all())


# ops that copy a tensor value to the host (.item(), int(t), bool(t), `if t:`, t[0-dim tensor]) or whose
# output shape depends on tensor values (t[bool mask] is aten.index with a bool index); none may run in a
# CUDA-graph-captured step. .tolist() does not dispatch, so the test makes it raise instead.
HOST_SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "repeat_interleave.Tensor")


class OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()
        self.bad: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.ops.add(name)
        if any(op in name for op in HOST_SYNC_OPS) or (
            name == "aten.index.Tensor" and any(i is not None and i.dtype == torch.bool for i in args[1])
        ):
            self.bad.add(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_tolist(monkeypatch):
    def tolist(self):
        raise AssertionError("Tensor.tolist() copies to the host")

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)


def test_op_recorder_catches_host_syncs():
    for fn in (lambda x: x * x.sum().item(), lambda x: x[x > 0], lambda x: x if x.sum() > 0 else -x,
               lambda x: x[x.argmax()], lambda x: int(x.argmax()), lambda x: x.nonzero()):
        with OpRecorder() as rec:
            fn(torch.randn(4))
        assert rec.bad, "the detector must flag this function"
    with OpRecorder() as rec:
        torch.randn(4).cumsum(0).take(torch.tensor(2))
    assert not rec.bad


def test_ragged_step_is_sync_free(no_tolist):
    """Choosing, packing and cutting run on the device between the draft and the verify: no op may copy a value
    to the host or size its output by tensor values."""
    gen = torch.Generator().manual_seed(1)
    bs, gamma, width, vocab = 5, 7, 3, 11
    planner = WidthPlanner(gamma, CostProfile(points=((1, 1.0), (64, 2.0))), "cpu", ragged=True)
    confidence = torch.randn((bs, gamma), generator=gen)
    logits = torch.randn((bs, gamma + 1, vocab), generator=gen)
    flags = torch.ones((bs,), dtype=torch.bool)
    with OpRecorder() as rec:
        lengths = ragged_lengths(planner.survival(confidence), bs * (width - 1))
        layout = ragged_layout(lengths, gamma, width)
        window = torch.arange(bs * (gamma + 1)).view(bs, gamma + 1)
        packed = window.reshape(-1)[layout.order]
        packed[layout.window_rows.reshape(-1)]
        cap(torch.full((bs,), gamma), torch.zeros((bs,), dtype=torch.int64), lengths, logits, flags, None,
            torch.rand((bs,), generator=gen))
    assert rec.bad == set(), rec.bad
    assert "aten.sort.stable" in rec.ops and "aten.topk.default" in rec.ops  # the recorder saw the ragged ops

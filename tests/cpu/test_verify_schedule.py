"""Confidence-scheduled verification: the cost profile (file, curves, profiler core) and the planner."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sglang_dspark.cost_profile import (
    CostProfile,
    CostProfileError,
    PiecewiseLinear,
    WallTimer,
    _interpolate,
    builtin_profile,
    main as cost_profile_main,
    measure_points,
)
from sglang_dspark.verify_schedule import (
    allocate_verify_lengths,
    plan_verify_budget,
    plan_verify_lengths,
    round_up_to_buckets,
    survival_from_logits,
)

# ---- helpers ------------------------------------------------------------------------------------------


def profile(points, draft_points=()) -> CostProfile:
    return CostProfile(points=tuple(points), draft_points=tuple(draft_points))


def random_profile(gen: torch.Generator, max_tokens: int) -> CostProfile:
    """A random increasing verify curve (knees and cliffs included) and a random draft curve."""
    xs = sorted(set([1] + torch.randint(2, max_tokens + 2, (3,), generator=gen).tolist()))
    ys = (torch.rand(len(xs), generator=gen) * 3).cumsum(0) + 1.0
    return profile(zip(xs, ys.tolist()), [(1, 0.5), (4, 0.5 + float(torch.rand(1, generator=gen)))])


def bucketed(total: int, buckets: list[int] | None) -> int:
    if not buckets:
        return total
    return next((b for b in sorted(buckets) if b >= total), total)


def objective(lengths, survival: torch.Tensor, prof: CostProfile, draft_ms: float, buckets=None) -> float:
    """theta of a length vector, computed directly (float64, host)."""
    s = survival.double()
    expected = len(lengths) + sum(float(s[b, :n].sum()) for b, n in enumerate(lengths))
    total = sum(n + 1 for n in lengths)
    return expected / (draft_ms + prof.verify_ms(bucketed(total, buckets)))


def brute_force(survival, prof, draft_ms, min_len, max_len, buckets=None) -> float:
    bs = survival.shape[0]
    return max(
        objective(lengths, survival, prof, draft_ms, buckets)
        for lengths in itertools.product(range(min_len, max_len + 1), repeat=bs)
    )


def algorithm1(survival, prof, draft_ms, min_len, max_len, buckets=None) -> list[int]:
    """The paper's Algorithm 1 (causal greedy, early stop), literally, with the planner's tie-break."""
    bs, gamma = survival.shape
    lengths = [min_len] * bs
    candidates = sorted(
        ((float(survival[b, k]), k, b) for b in range(bs) for k in range(min_len, max_len)),
        key=lambda c: (-c[0], c[1], c[2]),
    )
    best = objective(lengths, survival, prof, draft_ms, buckets)
    taken = 0
    for _, k, b in candidates:
        trial = list(lengths)
        trial[b] = k + 1
        theta = objective(trial, survival, prof, draft_ms, buckets)
        if theta <= best:
            break
        lengths, best, taken = trial, theta, taken + 1
    if buckets:  # fill the bucket with the next candidates
        room = bucketed(sum(n + 1 for n in lengths), buckets) - sum(n + 1 for n in lengths)
        for _, k, b in candidates[taken : taken + room]:
            lengths[b] = k + 1
    return lengths


def random_logits(gen: torch.Generator, bs: int, gamma: int, kind: str) -> torch.Tensor:
    if kind == "zero":  # confidence 0: nothing survives
        return torch.full((bs, gamma), -100.0)
    if kind == "one":  # confidence 1: everything survives
        return torch.full((bs, gamma), 100.0)
    return torch.randn(bs, gamma, generator=gen) * 2.0 + 1.0


# ---- cost profile ---------------------------------------------------------------------------------------


def test_piecewise_linear_matches_host_interpolation():
    points = ((2, 1.0), (10, 1.0), (20, 3.0), (30, 2.0))  # flat, rising, falling (noise) segments
    curve = PiecewiseLinear(points)
    xs = torch.tensor([0.0, 1.0, 2.0, 6.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 1000.0])
    got = curve(xs)
    want = [_interpolate(points, float(x)) for x in xs]
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    # below the first point flat; past the last point the (negative) last slope is continued as flat
    assert want[0] == 1.0 and want[-1] == 2.0
    assert want[5] == pytest.approx(2.0) and want[7] == pytest.approx(2.5)
    # any shape, including 0-dim
    assert curve(torch.tensor(15)).shape == () and float(curve(torch.tensor(15))) == pytest.approx(2.0)
    assert curve(xs.view(1, -1, 1)).shape == (1, xs.numel(), 1)


def test_piecewise_linear_extrapolates_last_slope():
    curve = PiecewiseLinear(((1, 5.0), (100, 5.0), (200, 10.0)))
    assert float(curve(torch.tensor(400))) == pytest.approx(20.0)
    assert float(curve(torch.tensor(150))) == pytest.approx(7.5)


def test_profile_round_trip(tmp_path):
    prof = CostProfile(
        points=((1, 6.0), (64, 6.5), (256, 14.0)), draft_points=((1, 1.0), (32, 1.5)),
        device="NVIDIA H200", model="Qwen/Qwen3-8B", dtype="bfloat16", date="2026-01-01T00:00:00Z",
        meta={"repeats": 20},
    )
    path = tmp_path / "cost.json"
    prof.save(path)
    loaded = CostProfile.load(path)
    assert loaded == prof
    assert loaded.verify_ms(160) == pytest.approx(10.25)
    assert loaded.draft_ms(16) == pytest.approx(1.0 + 0.5 * 15 / 31)
    cost = loaded.tensors()
    assert float(cost.verify_ms(torch.tensor(160))) == pytest.approx(10.25)
    assert float(cost.draft_ms(torch.tensor(16.0))) == pytest.approx(loaded.draft_ms(16))
    assert "NVIDIA H200" in loaded.table() and "256" in loaded.table()


def test_profile_without_draft_points_costs_zero_draft():
    prof = profile([(1, 1.0), (8, 2.0)])
    assert prof.draft_ms(4) == 0.0
    assert float(prof.tensors().draft_ms(torch.tensor(4.0))) == 0.0


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda d: d.pop("points"), "'points'"),
        (lambda d: d.update(points=[[1, 1.0]]), "'points'"),
        (lambda d: d.update(points=[[4, 1.0], [2, 2.0]]), "'points'"),
        (lambda d: d.update(points=[[1, 1.0], [2, -2.0]]), "points[1][1]"),
        (lambda d: d.update(points=[[1, 1.0], [2.5, 2.0]]), "points[1][0]"),
        (lambda d: d.update(points=[[1, 1.0], "x"]), "points[1]"),
        (lambda d: d.update(draft_points={"1": 2}), "'draft_points'"),
        (lambda d: d.update(format="other"), "'format'"),
        (lambda d: d.update(version=2), "'version'"),
        (lambda d: d.update(device=3), "'device'"),
    ],
)
def test_profile_load_errors_name_file_and_key(tmp_path, edit, key):
    data = profile([(1, 1.0), (8, 2.0)]).to_dict()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CostProfileError) as info:
        CostProfile.load(path)
    assert str(path) in str(info.value) and key in str(info.value)


def test_profile_load_missing_and_invalid_json(tmp_path):
    with pytest.raises(CostProfileError, match="not found"):
        CostProfile.load(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(CostProfileError, match="not valid JSON"):
        CostProfile.load(tmp_path / "x.json")


def test_builtin_profile_is_flat_to_knee_then_linear():
    prof = builtin_profile(8e9, draft_params=1e9, gamma=7)  # defaults: knee at 2 * 600e12 / (2 * 4000e9) = 150
    read_ms = 8e9 * 2 / 4000e9 * 1e3 + 0.5
    assert prof.verify_ms(1) == pytest.approx(read_ms)
    assert prof.verify_ms(150) == pytest.approx(read_ms)
    per_token = 2 * 8e9 / 600e12 * 1e3
    assert prof.verify_ms(600) - prof.verify_ms(300) == pytest.approx(300 * per_token, rel=1e-6)
    assert prof.source == "builtin" and prof.draft_points
    assert prof.draft_ms(1) == pytest.approx(1e9 * 2 / 4000e9 * 1e3)
    assert prof.draft_ms(200) > 2 * prof.draft_ms(1)  # compute-bound past the draft knee (bs * gamma tokens)
    assert builtin_profile(8e9).draft_points == ()
    with pytest.raises(CostProfileError, match="target_params"):
        builtin_profile(0)


def test_measure_points_median_and_warmup():
    calls = []
    now = [0.0]

    def forward(n: int) -> None:  # costs n ms, plus 100 ms on its 3rd timed call at each n (an outlier)
        calls.append(n)
        now[0] += n * 1e-3 + (0.1 if calls.count(n) == 5 else 0.0)

    points = measure_points(forward, [8, 2, 8, 4], WallTimer(clock=lambda: now[0]), warmup=2, repeats=5)
    assert [n for n, _ in points] == [2, 4, 8]
    assert [ms for _, ms in points] == pytest.approx([2.0, 4.0, 8.0])
    assert calls.count(8) == 2 + 5
    with pytest.raises(CostProfileError):
        measure_points(forward, [1], WallTimer(), repeats=0)


def test_cli_measure_show_builtin(tmp_path, capsys):
    out = tmp_path / "cost.json"
    args = ["measure", "--forward", "synthetic", "--device", "cpu", "--tokens", "1,4,16", "--warmup", "1",
            "--repeats", "2", "--model", "synthetic-16", "--dtype", "float32", "--out", str(out)]
    for flag in ("--forward-arg", "--draft-forward-arg"):
        args += [flag, "hidden=16", flag, "layers=1", flag, "device=cpu", flag, "dtype=float32"]
    args += ["--draft-forward", "synthetic", "--batch-sizes", "1,2"]
    assert cost_profile_main(args) == 0
    prof = CostProfile.load(out)
    assert [n for n, _ in prof.points] == [1, 4, 16] and [n for n, _ in prof.draft_points] == [1, 2]
    assert prof.model == "synthetic-16" and prof.source == "measured" and prof.meta["repeats"] == 2
    assert "measure --forward synthetic" in prof.meta["command"]
    capsys.readouterr()
    assert cost_profile_main(["show", str(out)]) == 0
    assert "synthetic-16" in capsys.readouterr().out
    assert cost_profile_main(["builtin", "--target-params", "8e9", "--out", str(tmp_path / "b.json")]) == 0
    assert CostProfile.load(tmp_path / "b.json").source == "builtin"
    with pytest.raises(SystemExit) as info:
        cost_profile_main(["measure", "--forward", "no_colon", "--out", str(out), "--device", "cpu"])
    assert info.value.code == 1


# ---- planner: exactness -----------------------------------------------------------------------------------


def test_survival_is_cumulative_product():
    logits = torch.tensor([[0.0, 2.0, -1.0], [5.0, 5.0, 5.0]])
    s = survival_from_logits(logits)
    want = torch.sigmoid(logits).cumprod(-1)
    assert torch.allclose(s, want)
    assert (s[:, 1:] <= s[:, :-1]).all()
    temps = torch.tensor([1.0, 2.0, 4.0])
    assert torch.allclose(survival_from_logits(logits, temps), torch.sigmoid(logits / temps).cumprod(-1))


def _cases():
    gen = torch.Generator().manual_seed(0)
    for bs, gamma in itertools.product(range(0, 4), range(1, 5)):
        for kind in ("random", "random", "zero", "one"):
            prof = random_profile(gen, bs * (gamma + 1) + 2)
            min_len = int(torch.randint(0, gamma + 1, (1,), generator=gen)) if kind == "random" else 0
            max_len = int(torch.randint(min_len, gamma + 1, (1,), generator=gen))
            draft_ms = float(torch.rand(1, generator=gen)) * 2
            yield bs, gamma, random_logits(gen, bs, gamma, kind), prof, draft_ms, min_len, max_len


@pytest.mark.parametrize("use_buckets", [False, True])
def test_global_search_equals_brute_force(use_buckets):
    checked = 0
    for bs, gamma, logits, prof, draft_ms, min_len, max_len in _cases():
        buckets = [2, 3, 5, 8, 13] if use_buckets else None
        plan = plan_verify_lengths(logits, prof.tensors(), draft_ms, min_len, max_len, buckets=buckets, search="global")
        survival = survival_from_logits(logits)
        lengths = plan.lengths.tolist()
        assert plan.lengths.dtype == torch.int64 and plan.lengths.shape == (bs,)
        assert all(min_len <= n <= max_len for n in lengths)
        assert int(plan.total_tokens) == sum(n + 1 for n in lengths)
        got = objective(lengths, survival, prof, draft_ms, buckets)
        assert got == pytest.approx(brute_force(survival, prof, draft_ms, min_len, max_len, buckets), rel=1e-5)
        # the plan reports its own expected tokens and step time
        assert float(plan.expected_tokens) == pytest.approx(
            bs + sum(float(survival[b, :n].sum()) for b, n in enumerate(lengths)), rel=1e-5, abs=1e-5
        )
        billed = bucketed(sum(n + 1 for n in lengths), buckets)
        assert float(plan.step_ms) == pytest.approx(draft_ms + prof.verify_ms(billed), rel=1e-5)
        if use_buckets and sum(n + 1 for n in lengths) < bs * (max_len + 1):
            assert sum(n + 1 for n in lengths) in buckets  # padding filled unless every draft is in
        checked += 1
    assert checked == 64


@pytest.mark.parametrize("use_buckets", [False, True])
def test_causal_search_is_algorithm_1(use_buckets):
    for bs, gamma, logits, prof, draft_ms, min_len, max_len in _cases():
        buckets = [2, 3, 5, 8, 13] if use_buckets else None
        plan = plan_verify_lengths(logits, prof.tensors(), draft_ms, min_len, max_len, buckets=buckets)
        survival = survival_from_logits(logits)
        assert plan.lengths.tolist() == algorithm1(survival, prof, draft_ms, min_len, max_len, buckets)


@pytest.mark.parametrize("use_buckets", [False, True])
def test_causal_admission_ignores_the_admitted_token(use_buckets):
    """Losslessness (spec D.1): whether draft k of request b is verified must not depend on the confidence
    of positions > k (computed from x_k itself). Perturb them and check min(L_b, k) is unchanged."""
    gen = torch.Generator().manual_seed(1)
    prof = profile([(1, 4.0), (12, 4.0), (24, 8.0), (25, 9.5), (60, 20.0)])  # knee and a cliff
    cost = prof.tensors()
    buckets = [4, 8, 16, 24, 32, 48] if use_buckets else None
    for _ in range(40):
        bs, gamma = int(torch.randint(1, 6, (1,), generator=gen)), int(torch.randint(1, 8, (1,), generator=gen))
        logits = torch.randn(bs, gamma, generator=gen) * 2 + 1
        base = plan_verify_lengths(logits, cost, 0.7, buckets=buckets).lengths
        for b, k in itertools.product(range(bs), range(1, gamma)):
            changed = logits.clone()
            changed[b, k:] = torch.randn(gamma - k, generator=gen) * 4
            lengths = plan_verify_lengths(changed, cost, 0.7, buckets=buckets).lengths
            assert min(int(lengths[b]), k) == min(int(base[b]), k)


def test_global_search_is_not_causal_at_a_cost_cliff():
    """Why "causal" is the default: at a cliff the global argmax admits draft 1 only if draft 2 looks good."""
    cost = profile([(1, 1.0), (2, 1.5), (3, 1.6)]).tensors()  # a cliff at 2 tokens: theta(L=1) = theta(L=0)
    confident_2nd = torch.tensor([[0.0, 6.0]])  # s_1 = 0.5, s_2 ~ 0.5: theta(L=2) = 1.25
    doubtful_2nd = torch.tensor([[0.0, -6.0]])  # s_1 = 0.5, s_2 ~ 0.001: theta(L=2) = 0.94
    assert plan_verify_lengths(confident_2nd, cost, 0.0, search="global").lengths.tolist() == [2]
    assert plan_verify_lengths(doubtful_2nd, cost, 0.0, search="global").lengths.tolist() == [0]
    assert plan_verify_lengths(confident_2nd, cost, 0.0).lengths.tolist() == [0]
    assert plan_verify_lengths(doubtful_2nd, cost, 0.0).lengths.tolist() == [0]


def test_causal_equals_global_on_the_roofline_profile():
    """Flat-then-linear cost and decreasing marginals: theta is unimodal, both searches agree."""
    cost = builtin_profile(8e9, 1e9).tensors()
    gen = torch.Generator().manual_seed(2)
    for bs in (1, 8, 30, 64, 128):
        logits = torch.randn(bs, 7, generator=gen) * 2 + 1.5
        a = plan_verify_lengths(logits, cost)
        b = plan_verify_lengths(logits, cost, search="global")
        assert torch.equal(a.lengths, b.lengths)


# ---- planner: behaviour -------------------------------------------------------------------------------------


def test_edge_cases():
    flat = profile([(1, 1.0), (10_000, 1.0)]).tensors()
    for gamma in range(1, 9):
        assert plan_verify_lengths(torch.zeros(0, gamma), flat, 1.0).lengths.shape == (0,)
        one = plan_verify_lengths(torch.full((3, gamma), 50.0), flat, 1.0)
        assert one.lengths.tolist() == [gamma] * 3 and float(one.expected_tokens) == pytest.approx(3 * (gamma + 1))
        assert plan_verify_lengths(torch.full((3, gamma), -50.0), flat, 1.0).lengths.tolist() == [0] * 3
        assert plan_verify_lengths(torch.full((3, gamma), -50.0), flat, 1.0, 1).lengths.tolist() == [1] * 3
        forced = plan_verify_lengths(torch.full((2, gamma), -50.0), flat, 1.0, gamma, gamma)
        assert forced.lengths.tolist() == [gamma] * 2  # min_len = max_len = gamma: full verification
        capped = plan_verify_lengths(torch.full((2, gamma), 50.0), flat, 1.0, 0, gamma // 2)
        assert capped.lengths.tolist() == [gamma // 2] * 2
    single = plan_verify_lengths(torch.tensor([[3.0, 2.0, 1.0, -4.0]]), flat, 1.0)
    assert single.lengths.tolist() == [4]  # flat cost: every positive marginal pays
    with pytest.raises(ValueError, match="min_len"):
        plan_verify_lengths(torch.zeros(2, 4), flat, 1.0, 3, 2)
    with pytest.raises(ValueError, match="search"):
        plan_verify_lengths(torch.zeros(2, 4), flat, 1.0, search="best")


def test_ties_are_deterministic_and_spread_over_requests():
    cost = profile([(1, 1.0), (5, 1.0), (40, 36.0)]).tensors()  # 5 tokens free, then 1 ms per token
    logits = torch.zeros(3, 4)  # every request identical: s = 0.5, 0.25, ...
    plan = plan_verify_lengths(logits, cost, 0.0)
    assert plan.lengths.tolist() == [1, 1, 0]  # equal survivals: lower request index first
    again = plan_verify_lengths(logits.clone(), cost, 0.0)
    assert torch.equal(plan.lengths, again.lengths)
    assert allocate_verify_lengths(survival_from_logits(logits), 4).tolist() == [2, 1, 1]


def test_cheaper_verify_means_longer_verify():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(24, 7, generator=gen) * 1.5 + 1.0
    totals = []
    for slope in (0.0, 0.005, 0.02, 0.05, 0.1, 0.3, 1.0):  # ms per token past a 32-token knee
        cost = profile([(1, 5.0), (32, 5.0), (1000, 5.0 + slope * 968)]).tensors()
        totals.append(int(plan_verify_lengths(logits, cost, 1.0, search="global").total_tokens))
    assert totals == sorted(totals, reverse=True) and totals[0] > totals[-1]
    assert totals[0] == 24 * 8  # flat: verify everything


def test_bigger_draft_cost_means_longer_verify():
    logits = torch.randn(24, 7, generator=torch.Generator().manual_seed(4)) + 1.0
    cost = profile([(1, 5.0), (32, 5.0), (1000, 100.0)]).tensors()
    totals = [int(plan_verify_lengths(logits, cost, d, search="global").total_tokens) for d in (0.0, 2.0, 10.0, 50.0)]
    assert totals == sorted(totals) and totals[0] < totals[-1]


def test_more_load_means_shorter_verify():
    row = torch.tensor([[4.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.0]])
    cost = builtin_profile(8e9, 1e9).tensors()
    means = []
    for bs in (1, 8, 16, 24, 32, 48, 64, 96, 128):
        plan = plan_verify_lengths(row.expand(bs, -1), cost)
        means.append(float(plan.lengths.float().mean()))
    assert means == sorted(means, reverse=True)
    assert means[0] == 7 and means[-1] <= 3


def test_budget_then_allocate_equals_plan():
    gen = torch.Generator().manual_seed(5)
    cost = builtin_profile(8e9, 1e9).tensors()
    for bs in (1, 5, 40, 100):
        logits = torch.randn(bs, 7, generator=gen) * 2 + 1
        s = survival_from_logits(logits)
        for search in ("causal", "global"):
            plan = plan_verify_lengths(logits, cost, search=search, buckets=[64, 128, 256, 512])
            budget = plan_verify_budget(s, cost, search=search, buckets=[64, 128, 256, 512])
            assert int(budget) == int(plan.lengths.sum())
            assert torch.equal(allocate_verify_lengths(s, budget), plan.lengths)


def test_allocate_takes_the_top_survivals():
    gen = torch.Generator().manual_seed(6)
    s = survival_from_logits(torch.randn(6, 5, generator=gen) * 2 + 1)
    for budget in range(0, 31):
        lengths = allocate_verify_lengths(s, torch.tensor(budget))
        assert int(lengths.sum()) == budget
        chosen = torch.cat([s[b, :n] for b, n in enumerate(lengths.tolist())])
        assert float(chosen.sum()) == pytest.approx(float(s.flatten().topk(budget).values.sum()), rel=1e-6)
    assert allocate_verify_lengths(s, 100, 1, 3).tolist() == [3] * 6  # clamped to bs * max_len
    assert allocate_verify_lengths(s, 0, 1, 3).tolist() == [1] * 6  # clamped to bs * min_len


def test_round_up_to_buckets():
    buckets = torch.tensor([8, 16, 32])
    assert round_up_to_buckets(torch.tensor([1, 8, 9, 32, 33]), buckets).tolist() == [8, 8, 16, 32, 33]


# ---- graph safety -------------------------------------------------------------------------------------------

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


def test_planner_is_graph_safe(no_tolist):
    cost = builtin_profile(8e9, 1e9).tensors()
    buckets = torch.tensor([8, 16, 32, 64, 128, 256])
    shapes = set()
    gen = torch.Generator().manual_seed(7)
    for logits in (torch.randn(40, 7, generator=gen), torch.full((40, 7), 30.0), torch.full((40, 7), -30.0)):
        with OpRecorder() as rec:
            s = survival_from_logits(logits, torch.ones(7))
            for search in ("causal", "global"):
                plan = plan_verify_lengths(logits, cost, torch.tensor(1.0), 1, 6, buckets=buckets, search=search)
                budget = plan_verify_budget(s, cost, None, 1, 6, buckets=buckets, search=search)
                allocate_verify_lengths(s, budget, 1, 6)
                shapes.add(tuple(tuple(t.shape) for t in plan))
            cost.verify_ms(plan.total_tokens)
        assert rec.bad == set(), rec.bad
        assert "aten.sort.stable" in rec.ops  # the recorder did see the planner's ops
    assert shapes == {((40,), (), (), ())}


# ---- calibration analysis (benchmark/analysis/calibration.py) -----------------------------------------------


@pytest.fixture(scope="module")
def calibration():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmark" / "analysis" / "calibration.py"
    spec = importlib.util.spec_from_file_location("dspark_calibration", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_calibration_step_views(calibration):
    steps = [
        {"confidence": [0.9, 0.5, 0.2], "accepted": 1},  # drafts 1 accepted, 2 rejected, 3 never reached
        {"confidence_logits": [0.0, 0.0, 0.0], "accepted": 3},
        {"confidence": [0.8, 0.8, 0.8], "accepted": 0, "verified": 2},
    ]
    views = calibration.step_views(steps)
    pos, pred, acc = views["conditional"]
    assert pos.tolist() == [1, 2, 1, 2, 3, 1]
    assert pred.tolist() == pytest.approx([0.9, 0.5, 0.5, 0.5, 0.5, 0.8])
    assert acc.tolist() == [True, False, True, True, True, False]
    pos, pred, acc = views["survival"]
    assert pos.tolist() == [1, 2, 3, 1, 2, 3, 1, 2]
    assert pred.tolist() == pytest.approx([0.9, 0.45, 0.09, 0.5, 0.25, 0.125, 0.8, 0.64])
    assert acc.tolist() == [True, False, False, True, True, True, False, False]
    summary = calibration.committed_summary(steps)
    assert summary["measured_mean_committed"] == pytest.approx((2 + 4 + 1) / 3)
    assert summary["predicted_mean_committed"] == pytest.approx(1 + (1.44 + 0.875 + 1.44) / 3)
    with pytest.raises(ValueError, match="step record 0"):
        calibration.step_views([{"confidence": [0.5], "accepted": 2}])


def test_calibration_metrics(calibration):
    import numpy as np

    rng = np.random.default_rng(0)
    predicted = rng.uniform(0, 1, 200_000)
    calibrated = rng.uniform(0, 1, predicted.size) < predicted
    good = calibration.reliability(predicted, calibrated, 10)
    assert good["ece"] < 0.01 and good["count"] == predicted.size and len(good["bins"]) == 10
    assert good["auc"] == pytest.approx(5 / 6, abs=0.01)  # E over pairs for p ~ U(0,1), label ~ Bernoulli(p)
    overconfident = calibration.reliability(np.minimum(predicted + 0.1, 1.0), calibrated, 10)
    assert overconfident["ece"] == pytest.approx(0.095, abs=0.01)
    tiny = calibration.reliability(np.array([0.15, 0.15, 0.95]), np.array([True, False, True]), 10)
    assert tiny["ece"] == pytest.approx((2 * 0.35 + 0.05) / 3)
    assert tiny["brier"] == pytest.approx((0.85**2 + 0.15**2 + 0.05**2) / 3)
    assert calibration.auc(np.array([0.1, 0.2, 0.9]), np.array([False, False, True])) == 1.0
    assert calibration.auc(np.array([0.5, 0.5]), np.array([False, True])) == 0.5
    assert calibration.auc(np.array([0.5, 0.7]), np.array([True, True])) is None


def test_calibration_records_cli(calibration, tmp_path):
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"position": k % 3 + 1, "predicted": 0.7, "accepted": k % 10 < 7}) + "\n"
                               for k in range(60)))
    out = tmp_path / "out"
    assert calibration.main(["records", str(records), "--out-dir", str(out)]) == 0
    report = json.loads((out / "calibration.json").read_text())
    assert report["records"]["pooled"]["ece"] == pytest.approx(0.0, abs=1e-9)
    assert sorted(report["records"]["per_position"]) == ["1", "2", "3"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (out / "reliability.png").exists()
    else:
        assert (out / "reliability.png").stat().st_size > 1000
    records.write_text(json.dumps({"position": 1, "predicted": 0.5, "accepted": True}) + "\n"
                       + json.dumps({"confidence": [0.5], "accepted": 0}) + "\n")
    with pytest.raises(SystemExit):
        calibration.main(["records", str(records), "--out-dir", str(out)])


def test_calibration_reference_records(calibration):
    """The tiny pair in the reference loop yields one step record per verify step, consistent with it."""
    steps, meta = calibration.collect_reference(1, 24, 0.0, 4, 0, "humaneval")
    assert meta["gamma"] == 4 and len(steps) >= 1
    assert all(len(s["confidence_logits"]) == 4 and 0 <= s["accepted"] <= 4 for s in steps)
    assert sum(s["accepted"] + 1 for s in steps) >= meta["generated_tokens"] - 1  # + the prefill's bonus token

"""Confidence-scheduled verification in the server: one verify width per decode step (spec D).

Each step verifies ``W - 1`` drafts of every request in the batch (``W`` tokens per request: the anchor and
the drafts), ``W`` in ``1..gamma + 1``, chosen on the host before the step from what the previous steps
measured, so choosing it adds no host synchronisation:

* ``WidthPlanner`` keeps a calibration of the confidence head on the host (per draft position ``k``: the
  decayed sums of predicted conditional confidences ``sigmoid(c_k)`` and of acceptances over the verified
  requests that reached ``k``; their ratio rescales the head, so an over- or under-confident head, or a
  drafter that got worse, is corrected by what verification measures). After every drafted step the worker
  hands it the step's confidence logits and accepted counts, which it copies to the host without blocking
  (two copies, no other device work: on small models every kernel launch of a step shows); when a copy has
  landed it turns the batch's calibrated survivals ``s_{b,k} = prod_{j<=k} min(1, r_j sigmoid(c_{b,j}))``
  into the expected accepted drafts per request for every width, ``G[W] = mean_b sum_{k<W} s_{b,k}``. Each
  step takes the width maximising expected committed tokens per millisecond from the newest ``G``::

      theta(W) = bs * (1 + G[W]) / (overhead_ms + draft_ms(bs) * [W > 1] + verify_ms(bs * W))

  with the cost profile (``sglang_dspark.cost_profile``), which times the GPU work of a step, and
  ``overhead_ms``, the part of a step the profile does not see (scheduling, output processing; it dominates
  small models, where every width costs about the same): the host clock between two steps minus the
  profile's cost of the earlier one, averaged. ``W = 1`` is a plain decode step: nothing is
  drafted, so nothing new is measured; every ``probe`` such steps (doubling while the answer stays 1) one
  step drafts and verifies ``W = 2`` to measure again. Of the full-width steps one in ``OBSERVE_EVERY`` is
  observed (narrower steps and probes all are): the copies and the fold cost the host about 0.1 ms a step
  (``benchmark/tiny/planner_cost.py``), 4% of a tiny model's step, and a sample of full-width steps shows as
  well as all of them when narrowing starts to pay.
* ``VerifyGraphs`` holds the target's ``TARGET_VERIFY`` CUDA graphs for widths ``1..gamma`` (SGLang's own
  runner holds ``gamma + 1``), each with an attention backend of its own, and times them for the cost
  profile (``measure_profile``).

* Per-request lengths (experimental, ``ragged``): at 32 requests or more the planner may share the
  ``bs * (W - 1)`` draft rows of a width-``W`` step out unevenly: to the largest survival estimates of the batch,
  each request's own (a decayed mean of ``[a > k]`` over its earlier drafted steps; where a step did not verify
  position ``k`` the estimate drifts toward the batch mean, so that a request kept short is tried again), ``W``
  maximising the same expected tokens per ms. The step replays the width-``W`` graph with the rows laid out
  request by request (``sglang_dspark.ragged``). Chosen from earlier steps' acceptances (the current step's
  confidences would need a sync); on logged steps this gained about 3% at batch 32-64 over one width
  (``benchmark/results/ragged-gain.json``, which also bounds what perfect foresight would give: 14-20%).

Lossless: the width (and lengths) of a step depend only on earlier steps, never on the drafts it verifies, so
greedy output is unchanged and rejection sampling stays exact for any width (spec D.2): a request verifying
``n`` tokens is accepted exactly as a block of ``n - 1`` drafts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Optional

import numpy as np
import torch

from sglang_dspark.cost_profile import CostProfile, CudaEventTimer, Timer, measure_points

logger = logging.getLogger("sglang_dspark")

CALIBRATION_LOG_ENV = "SGLANG_DSPARK_CALIBRATION_LOG"


class WidthPlanner:
    """Per-step verify width from lagged, calibrated confidences (module docstring).

    ``decay`` is per observed sample (0.99: the calibration follows roughly the last 100 requests that
    reached a position); ``probe`` is (first, largest) number of plain decode steps between two probes;
    ``clock`` gives host seconds (the step overhead estimate). ``ragged`` (experimental,
    ``SGLANG_DSPARK_PER_REQUEST_LENGTHS=1``): at ``RAGGED_MIN_BS`` requests or more, ``plan`` also gives each
    request its own verify length, from its acceptance history (module docstring).
    """

    OVERHEAD_DECAY = 0.9  # per step
    LOG_EVERY_S = 60.0  # a summary of the widths chosen, in the server log
    GAP_FACTOR, GAP_MS = 3.0, 20.0  # a gap longer than 3 x the predicted step + 20 ms was not one step (idle, prefill)
    MAX_PENDING = 8  # observed steps whose host copies are in flight
    OBSERVE_EVERY = 8  # full-width steps per observed one (narrower ones and probes are all observed, as is every
    # step when ``ragged``): what decides to narrow can come from a sample, each narrowed step decides the next
    RAGGED_MIN_BS = 32  # per-request lengths lost 1% at batch 16 and gained 3% at 32-64 on logged steps
    HISTORY_DECAY = 0.7  # per observed step of the request

    def __init__(
        self, gamma: int, cost: CostProfile, *, decay: float = 0.99,
        probe: tuple[int, int] = (4, 128), clock: Callable[[], float] = time.perf_counter, ragged: bool = False,
    ) -> None:
        self.gamma = gamma
        self.cost = cost
        self._costs: dict[int, list[float]] = {}  # _gpu_ms per batch size
        self.decay = decay
        self.probe_first, self.probe_max = probe
        self.clock = clock
        self.overhead_ms = 0.0
        self._last_step: Optional[tuple[float, float]] = None  # (host time, predicted ms) of the last step
        self.widths: Counter[int] = Counter()  # widths chosen since the last summary
        self.uneven = 0  # steps with per-request lengths since the last summary
        self._logged_at = clock()
        # Calibration sums per position, float32 [gamma], starting at one pseudo-observation of ratio 1.
        self.predicted = np.ones(gamma, dtype=np.float32)
        self.accepted = np.ones(gamma, dtype=np.float32)
        # Observed steps whose host copies may not have landed: (event or None, confidence logits, accepted,
        # verified, rids).
        self._pending: deque[tuple[Any, torch.Tensor, torch.Tensor, Any, Optional[list[str]]]] = deque()
        self.gains: Optional[list[float]] = None  # G[W] for W = 0..gamma + 1 (index 0 unused); None: no data yet
        self.ragged = ragged
        self._mean_survival: Optional[np.ndarray] = None  # [gamma]: the last observed batch's calibrated mean
        self._history: dict[str, np.ndarray] = {}  # rid -> [gamma] survival estimate from its own acceptances
        self._plain_steps = 0
        self._probe_every = self.probe_first
        self._drafted = 0  # drafted steps chosen from measured gains (probes not counted)
        self._observe_next = True  # whether ``observe`` takes the step planned last

    def step_ms(self, bs: int, width: int) -> float:
        """Predicted ms of a step: the profile's draft (when drafting) and verify, plus the measured overhead."""
        return self.overhead_ms + self._gpu_ms(bs)[width]

    def _gpu_ms(self, bs: int) -> list[float]:
        """The profile's ms of a step of ``bs`` requests per width (index 1..gamma + 1), computed once per batch
        size: the width is chosen on the host every decode step."""
        costs = self._costs.get(bs)
        if costs is None:
            costs = [0.0] + [(self.cost.draft_ms(bs) if w > 1 else 0.0) + self.cost.verify_ms(bs * w)
                             for w in range(1, self.gamma + 2)]
            self._costs[bs] = costs
        return costs

    def width(self, bs: int) -> int:
        """The verify width (``1..gamma + 1``) of the next step of ``bs`` requests: host only, no sync."""
        return self.plan(bs)[0]

    def plan(self, bs: int, rids: Optional[Sequence[str]] = None) -> tuple[int, Optional[list[int]]]:
        """(width ``W``, per-request verify lengths or None) of the next step of the requests ``rids`` (``bs``):
        host only, no sync. Lengths (``1..gamma + 1`` each, summing to ``bs * W``) only when ``ragged`` and they
        differ; the step then runs the width-``W`` verify graph with its rows shared out unevenly."""
        self._poll()
        self._time_step()
        width, lengths = self._choose(bs, rids)
        now = self.clock()
        self._last_step = (now, self._gpu_ms(bs)[width])
        self.widths[width] += 1
        self.uneven += lengths is not None
        if now - self._logged_at >= self.LOG_EVERY_S:
            logger.info("DSPARK scheduled verification: %s", self.summary())
            self.widths.clear()
            self.uneven = 0
            self._logged_at = now
        return width, lengths

    def summary(self) -> str:
        """Widths chosen since the last summary (share of steps), the overhead estimate and the expected accepted
        drafts per request at full width."""
        steps = sum(self.widths.values()) or 1
        shares = ", ".join(f"{w}: {100 * n / steps:.0f}%" for w, n in sorted(self.widths.items()))
        full = "n/a" if self.gains is None else f"{self.gains[self.gamma + 1]:.2f}"
        uneven = f", per-request lengths in {100 * self.uneven / steps:.0f}% of steps" if self.ragged else ""
        return (f"verify widths over {sum(self.widths.values())} steps {{{shares}}}{uneven}, step overhead "
                f"{self.overhead_ms:.2f} ms, expected accepted drafts at full width {full}")

    def _time_step(self) -> None:
        """Fold the host time since the last step, minus the profile's cost of that step, into the overhead."""
        if self._last_step is None:
            return
        start, predicted = self._last_step
        gap = (self.clock() - start) * 1000.0
        if gap <= self.GAP_FACTOR * predicted + self.GAP_MS:
            sample = max(gap - predicted, 0.0)
            self.overhead_ms = self.OVERHEAD_DECAY * self.overhead_ms + (1 - self.OVERHEAD_DECAY) * sample

    def _choose(self, bs: int, rids: Optional[Sequence[str]]) -> tuple[int, Optional[list[int]]]:
        if self.gains is None:  # nothing measured yet: verify everything (and observe every step)
            return self.gamma + 1, None
        lengths = None
        if self.ragged and rids is not None and bs >= self.RAGGED_MIN_BS and self._mean_survival is not None:
            best, lengths = self._ragged(bs, rids)
        else:  # expected committed tokens per ms, bs * (1 + G[W]) / step_ms(bs, W), without the common factor bs
            gains, costs, overhead = self.gains, self._gpu_ms(bs), self.overhead_ms
            best = max(range(1, self.gamma + 2), key=lambda w: (1.0 + gains[w]) / (overhead + costs[w]))
        if best > 1:
            self._plain_steps, self._probe_every = 0, self.probe_first
            self._drafted += 1
            self._observe_next = self.ragged or best <= self.gamma or self._drafted % self.OBSERVE_EVERY == 0
            return best, lengths
        self._plain_steps += 1
        if self._plain_steps < self._probe_every:
            return 1, None
        self._plain_steps, self._probe_every = 0, min(2 * self._probe_every, self.probe_max)
        self._observe_next = True  # a probe
        return 2, None

    def request_survival(self, rids: Sequence[str]) -> np.ndarray:
        """The requests' survival estimates from their own acceptance histories, float ``[len(rids), gamma]`` (the
        last observed batch's mean for a request without one; after at least one observed step)."""
        return np.stack([self._history.get(rid, self._mean_survival) for rid in rids])

    def _ragged(self, bs: int, rids: Sequence[str]) -> tuple[int, Optional[list[int]]]:
        """Width ``W`` and lengths: ``share_rows`` over ``request_survival``, the ``bs * (W - 1)`` draft rows of
        each width ``W``."""
        survival = self.request_survival(rids)  # [bs, gamma]
        sizes = [bs * (w - 1) for w in range(1, self.gamma + 2)]
        rows, drafts = share_rows(survival, sizes, lambda n: self.step_ms(bs, n // bs + 1))
        best = rows // bs + 1
        if best == 1 or (drafts == best - 1).all():
            return best, None
        return best, (drafts + 1).tolist()

    def _poll(self) -> None:
        """Fold in every observed step whose host copy has landed, oldest first (host only)."""
        while self._pending and (self._pending[0][0] is None or self._pending[0][0].query()):
            _, confidence_logits, accepted, verified, rids = self._pending.popleft()
            self._fold(confidence_logits.numpy(), accepted.numpy(), verified, rids)

    def observe(self, confidence_logits: torch.Tensor, accepted: torch.Tensor, verified: int | Sequence[int],
                rids: Optional[Sequence[str]] = None) -> None:
        """After a drafted step: copy the head's logits float ``[bs, gamma]`` and the accepted counts int ``[bs]``
        to the host without blocking; a later ``plan`` folds them in once they have landed. ``verified``: the
        drafts verified per request (one number for all, or one each, >= 1); ``rids``: the requests, for their
        histories (``ragged``). A step is left out when ``plan`` chose not to observe it (``OBSERVE_EVERY``) or while
        ``MAX_PENDING`` copies are still in flight (a device far behind the host)."""
        if not self._observe_next or len(self._pending) >= self.MAX_PENDING:
            return
        rids = list(rids) if self.ragged and rids is not None else None
        if not accepted.is_cuda:
            self._pending.append((None, confidence_logits.float(), accepted, verified, rids))
            self._poll()
            return
        host = []
        for t in (confidence_logits.float(), accepted):  # into pinned memory, so that the copies do not block
            host.append(torch.empty(t.shape, dtype=t.dtype, pin_memory=True))
            host[-1].copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((event, host[0], host[1], verified, rids))

    def _fold(self, confidence_logits: np.ndarray, accepted: np.ndarray, verified: int | Sequence[int],
              rids: Optional[list[str]]) -> None:
        """Update the calibration (and the requests' histories) with one step (logits ``[bs, gamma]``, accepted
        ``[bs]``) and recompute ``G``."""
        confidence = 1.0 / (1.0 + np.exp(-confidence_logits))  # float32 [bs, gamma]
        positions = np.arange(self.gamma)
        seen = positions < np.broadcast_to(np.asarray(verified), accepted.shape)[:, None]  # [bs, gamma]: verified
        reached = seen & (positions <= accepted[:, None])  # drafts 1..k-1 were accepted
        hits = positions < accepted[:, None]
        keep = np.float32(self.decay) ** reached.sum(0)  # [gamma]: decay per sample seen at each position
        self.predicted *= keep
        self.predicted += (confidence * reached).sum(0)
        self.accepted *= keep
        self.accepted += hits.sum(0)
        ratio = self.accepted / self.predicted  # [gamma]
        survival = np.minimum(confidence * ratio, 1.0).cumprod(axis=-1)  # [bs, gamma]
        self.gains = [0.0, 0.0] + survival.cumsum(axis=-1).mean(axis=0).tolist()  # G[W]: W - 1 drafts verified
        self._mean_survival = survival.mean(axis=0)
        if rids is not None:
            old = self.request_survival(rids)
            new = next_history(old, seen, hits, self._mean_survival, self.HISTORY_DECAY)
            # Requests not in this step have finished (every running request is in every drafted step).
            self._history = dict(zip(rids, new))

    def calibration(self) -> list[float]:
        """Measured / predicted acceptance per position (as far as the landed copies go)."""
        return (self.accepted / self.predicted).tolist()


def share_rows(
    survival: np.ndarray, sizes: Iterable[int], step_ms: Callable[[int], float]
) -> tuple[int, np.ndarray]:
    """Per-request lengths from survival estimates float ``[bs, gamma]`` (non-increasing along each row): the
    ``n`` largest estimates of the batch get a draft row each (so every request's rows are a prefix), ``n`` the
    one of ``sizes`` (ascending; ties go to the smaller) maximising expected committed tokens per ms,
    ``(bs + their sum) / step_ms(n)`` -> (``n``, drafts per request int64 ``[bs]``)."""
    bs, gamma = survival.shape
    order = np.argsort(-survival, axis=None, kind="stable")
    expected = np.concatenate(([0.0], np.cumsum(survival.reshape(-1)[order])))
    n = max(sizes, key=lambda n: (bs + expected[n]) / step_ms(n))
    return n, np.bincount(order[:n] // gamma, minlength=bs)


def next_history(
    old: np.ndarray, seen: np.ndarray, hits: np.ndarray, mean: np.ndarray, decay: float
) -> np.ndarray:
    """Requests' survival estimates after one drafted step (each ``[n, gamma]``; ``mean`` ``[gamma]``): position
    ``k`` moves by ``1 - decay`` toward ``[a > k]`` (``hits``) where the step verified it (``seen``), else toward
    the batch's mean survival (so that a request kept short is tried again); made non-increasing along ``k``."""
    target = np.where(seen, hits, mean)
    return np.minimum.accumulate(decay * old + (1 - decay) * target, axis=1)


class VerifyGraphs:
    """The target's ``TARGET_VERIFY`` attention backends and CUDA graphs for verify widths ``1..gamma``.

    SGLang's ``DecodeCudaGraphRunner`` captures one width (``--speculative-num-draft-tokens``, here
    ``gamma + 1``); this builds one attention backend per width (backends keep their plans per batch size,
    and the deterministic verify plans ``W`` decode rows per request) and, when SGLang captured its graphs,
    one more runner per width, sharing SGLang's graph memory pool and input buffers. ``using(width)`` puts a
    width's backend and runner in place of the model runner's for one verify forward, so SGLang's own verify
    path (``prepare_for_verify``, ``ModelRunner.forward``) plans and replays them. Without captured graphs
    (``--disable-cuda-graph``) every width runs eagerly on its backend.
    """

    def __init__(self, model_runner: Any, widths: Sequence[int]) -> None:
        from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

        self.model_runner = model_runner
        self.default = (model_runner.attn_backend, model_runner.decode_cuda_graph_runner)
        self.default_width = int(model_runner.server_args.speculative_num_draft_tokens)
        self.backends: dict[int, Any] = {}
        self.runners: dict[int, Any] = {}
        graphs = isinstance(self.default[1], DecodeCudaGraphRunner)
        for width in widths:
            backend = model_runner._get_attention_backend()
            if getattr(backend, "verify_decode_rows", 0):  # deterministic DSPARK verify: W decode rows
                backend.verify_decode_rows = width
            # The sync-free plan (the default with FlashInfer): upper bounds like the default backend, no KV split.
            backend.needs_cpu_seq_lens = model_runner.attn_backend.needs_cpu_seq_lens
            self.backends[width] = backend
            if graphs:
                self.runners[width] = type(self.default[1])(
                    model_runner, attn_backend=backend, speculative_num_draft_tokens=width
                )

    @contextlib.contextmanager
    def using(self, width: int) -> Iterator[None]:
        backend = self.backends.get(width)
        if backend is None:
            yield
            return
        runner = self.runners.get(width, self.default[1])
        self.model_runner.attn_backend, self.model_runner.decode_cuda_graph_runner = backend, runner
        try:
            yield
        finally:
            self.model_runner.attn_backend, self.model_runner.decode_cuda_graph_runner = self.default

    def all_runners(self) -> dict[int, Any]:
        runners = dict(self.runners)
        if self.runners:
            runners[self.default_width] = self.default
        return runners


def graph_replay(runner: Any, bs: int) -> Optional[Callable[[], object]]:
    """A callable running ``runner``'s captured graph of batch size ``bs`` the way serving does (SGLang's
    ``execute``: attention planned, graph replayed) on the runner's capture-time dummy batch, or None when
    the runner captured no such graph."""
    if bs not in getattr(runner, "capture_bs", ()):
        return None
    forward_batch, _, _ = runner.capture_prepare(bs)
    return lambda: runner.execute(forward_batch)


def measure_profile(
    verify_runners: dict[int, Any], draft_replay: Callable[[int], Optional[Callable[[], object]]],
    batch_sizes: Sequence[int], *, device: str, model: str, dtype: str, timer: Timer = CudaEventTimer(),
) -> Optional[CostProfile]:
    """Cost profile from the captured graphs: ``verify_ms`` over total tokens ``bs * W`` (median over the
    (bs, W) pairs giving the same total) and ``draft_ms`` over ``bs`` (``draft_replay(bs)`` replays one draft
    pass), each point the median of 5 timed runs after 2 untimed ones (``measure_points``). Attention runs at
    the capture-time (dummy) lengths, so the profile leaves out attention's growth with context (about the
    same for every width at a given batch size). None when no graph could be timed."""

    def points(replay: Callable[[int], Optional[Callable[[], object]]]) -> tuple[tuple[int, float], ...]:
        runs = {bs: run for bs in batch_sizes if (run := replay(bs)) is not None}
        return measure_points(lambda bs: runs[bs](), list(runs), timer, warmup=2, repeats=5) if runs else ()

    by_tokens: dict[int, list[float]] = {}
    for width, runner in sorted(verify_runners.items()):
        for bs, ms in points(lambda bs, runner=runner: graph_replay(runner, bs)):
            by_tokens.setdefault(bs * width, []).append(ms)
    if len(by_tokens) < 2:
        return None
    return CostProfile(
        points=tuple(running_max((t, statistics.median(ms)) for t, ms in sorted(by_tokens.items()))),
        draft_points=tuple(running_max(points(draft_replay))), device=device, model=model, dtype=dtype,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"), source="measured",
        meta={"how": "captured CUDA graphs executed at start-up on their dummy batches"},
    )


def running_max(points: Iterable[tuple[int, float]]) -> Iterator[tuple[int, float]]:
    """Measured ``(size, ms)`` points made non-decreasing in ms: more tokens (or requests) never cost less; a
    dip is timing noise (another process on the GPU), and a curve that fell would make wider verification
    look free."""
    top = 0.0
    for size, ms in points:
        top = max(top, ms)
        yield size, top


class CalibrationLog:
    """``SGLANG_DSPARK_CALIBRATION_LOG=PATH``: one JSON line per request of every drafted step,
    ``{"confidence": [sigmoid(c_1)..sigmoid(c_gamma)], "accepted": a, "verified": L, "rid": request id, "step": n}``
    (the step records of ``benchmark/analysis/calibration.py``; ``step`` counts this log's drafted steps, so a
    request's consecutive records can be paired, ``benchmark/analysis/ragged_gain.py --lagged``), line-buffered
    so the file can be read while the server runs. It copies the step's confidences to the host (a
    synchronisation): for measurement, not for serving."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", buffering=1)
        self._steps = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Optional["CalibrationLog"]:
        path = env.get(CALIBRATION_LOG_ENV)
        return cls(path) if path else None

    def write(self, confidence_logits: torch.Tensor, accepted: torch.Tensor, verified: int | Sequence[int],
              rids: Sequence[str]) -> None:
        """confidence_logits float ``[bs, gamma]``, accepted int ``[bs]``, drafts verified per request (one number
        for all, or one each), the requests' ids (``bs``)."""
        confidence = torch.sigmoid(confidence_logits.float()).tolist()
        per_request = [verified] * len(rids) if isinstance(verified, int) else verified
        for row, a, v, rid in zip(confidence, accepted.tolist(), per_request, rids):
            record = {"confidence": [round(c, 5) for c in row], "accepted": int(a), "verified": int(v),
                      "rid": str(rid), "step": self._steps}
            self._file.write(json.dumps(record) + "\n")
        self._steps += 1

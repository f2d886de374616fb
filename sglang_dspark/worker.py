"""``DSparkWorker``: SGLang's spec-v2 worker for ``--speculative-algorithm DSPARK``.

It is ``DFlashWorkerV2`` with a different decode step; everything else is inherited: the draft
``TpModelWorker`` sharing the target's request->token table and KV allocator, the prefill (target
forward with the draft's ``target_layer_ids`` captured, then draft context K/V written at the prompt's
cache slots), the idle step, the context-K/V writer (fused Triton path) and the draft CUDA graph setup.

One decode step for a batch, gamma = ``--speculative-dspark-block-size``, width = gamma + 1, committed
length ``P`` and pending bonus token ``x_0`` per request (no host synchronisation anywhere):

1. window: positions ``P..P+gamma`` and their reserved cache slots (from ``req_to_token``);
2. draft: ONE non-causal forward of the draft over ``[x_0, mask x (gamma-1)]`` at positions
   ``P..P+gamma-1`` (TARGET_VERIFY mode, ``draft_token_num = gamma``, replayed from the draft CUDA graph
   when possible), then the Markov head samples ``x_1..x_gamma`` left to right and the confidence head
   scores them, replayed from their own CUDA graphs (``DSparkDraftSampler``: an all-greedy variant that
   builds no draft distribution, and a sampled one), or eagerly above the largest captured batch;
3. verify: the target's TARGET_VERIFY forward over ``[x_0, x_1..x_{W-1}]`` (its own CUDA graph per width)
   with the aux hidden states of the draft's target layers captured. ``W = gamma + 1`` with
   ``--speculative-dspark-verify full``; with ``scheduled`` (the default with a confidence head) the width of
   the step is chosen on the host from earlier steps (``sglang_dspark.verify_width``), and ``W = 1`` skips
   step 2 (a plain decode step); with ``SGLANG_DSPARK_PER_REQUEST_LENGTHS=1`` (experimental) the rows of a
   width-``W`` verify may be shared out unevenly, one length per request (``sglang_dspark.ragged``);
4. accept: greedy matching for ``top_k <= 1`` requests, exact rejection sampling for the others, in one
   batch (``sglang_dspark.accept``); or simulated acceptance when the environment asks for it;
5. publish ``P + a + 1``, write the draft context K/V of the ``a + 1`` committed positions from the
   verify pass's captured hidden states, and hand SGLang ``accept_lens = a + 1`` with
   ``speculative_num_draft_tokens = gamma + 1`` (so /server_info, meta_info and /metrics count it).

Under tensor parallelism (``--tp-size N``) the draft backbone and the target are sharded by SGLang's
parallel layers and every rank runs the whole step: the target's vocab-parallel lm_head is gathered into a
full table once at init (``_target_lm_head_weight``), and after step 2's backbone forward every rank takes
TP rank 0's uniforms and hidden states (``_from_tp_rank0``, one broadcast), so the replicated Markov loop,
the acceptance and the commit are the same on every rank.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
from collections.abc import Sequence
from typing import Callable, Iterator, Optional

import torch
from sglang.srt.distributed import GroupCoordinator, get_tp_group
from sglang.srt.layers.logits_processor import LogitsProcessorOutput
from sglang.srt.managers.schedule_batch import ScheduleBatch
from sglang.srt.managers.utils import GenerationBatchResult
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch, ForwardMode
from sglang.srt.server_args import ServerArgs
from sglang.srt.speculative.dflash_info import DFlashVerifyInput
from sglang.srt.speculative.dflash_info_v2 import DFlashDraftInputV2
from sglang.srt.speculative.dflash_utils import apply_dflash_verify_logits_adjustments
from sglang.srt.speculative.dflash_worker_v2 import DFlashWorkerV2
from sglang.srt.speculative.triton_ops.dflash import _prepare_dflash_draft_block_unchecked

from sglang_dspark.accept import (
    DraftBlock,
    SimulatedAcceptance,
    TargetSampling,
    accept_drafts,
    commit_layout,
    greedy_accept_top1,
    target_token_at,
)
from sglang_dspark.config import DSparkConfig
from sglang_dspark.cost_profile import OUT_ENV as COST_PROFILE_OUT_ENV
from sglang_dspark.cost_profile import CostProfile, builtin_profile
from sglang_dspark.model import DSparkDraftModel
from sglang_dspark.ragged import RaggedRows, RaggedVerifyInput
from sglang_dspark.timing import CpuProfile, StepTimer
from sglang_dspark.verify_width import (
    CalibrationLog,
    VerifyGraphs,
    WidthPlanner,
    graph_replay,
    measure_profile,
)

logger = logging.getLogger("sglang_dspark")

_DFLASH_LOGGER = "sglang.srt.speculative.dflash_worker_v2"
NO_SEQ_LENS_SYNC_ENV = "SGLANG_DSPARK_NO_SEQ_LENS_SYNC"
PER_REQUEST_LENGTHS_ENV = "SGLANG_DSPARK_PER_REQUEST_LENGTHS"


class _DropDflashBlockSizeWarning(logging.Filter):
    """DFLASH compares --speculative-num-draft-tokens with the checkpoint's block_size; for DSPARK they
    differ by design (gamma + 1 vs gamma), so that warning would be false."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("DFLASH block size mismatch")


@contextlib.contextmanager
def _without_dflash_block_size_warning() -> Iterator[None]:
    dflash_logger = logging.getLogger(_DFLASH_LOGGER)
    drop = _DropDflashBlockSizeWarning()
    dflash_logger.addFilter(drop)
    try:
        yield
    finally:
        dflash_logger.removeFilter(drop)


def _no_adjustments(batch: ScheduleBatch) -> bool:
    """Whether SGLang's verify logit adjustments (``apply_dflash_verify_logits_adjustments``: custom logit
    processors, penalties, vocab masks, logit bias) leave this batch's logits as they are."""
    info = batch.sampling_info
    if info is None:
        return True
    penalizer = getattr(info, "penalizer_orchestrator", None)
    return not (
        info.has_custom_logit_processor
        or any(getattr(info, name, None) is not None for name in ("acc_linear_penalties", "vocab_mask", "logit_bias"))
        or (penalizer is not None and penalizer.is_required)
    )


def gathered_vocab_rows(org_ranges: Sequence[tuple[int, int]], rows_per_rank: int, vocab: int) -> torch.Tensor:
    """Where token ids ``0..vocab-1`` sit in a rank-major all-gather of vocab-parallel shards -> int64 ``[vocab]``.

    Rank ``r``'s shard has ``rows_per_rank`` rows: token ids ``start..end-1`` (``org_ranges[r] = (start, end)``,
    SGLang's ``shard_indices.org_vocab_{start,end}_index``) in its first ``end - start`` rows, then padding and
    any LoRA-added rows (``VocabParallelEmbedding``'s layout). The ranges must tile ``0..vocab-1`` in rank order.
    """
    rows: list[int] = []
    for rank, (start, end) in enumerate(org_ranges):
        if start != len(rows) or not start <= end <= start + rows_per_rank:
            raise ValueError(
                f"DSPARK lm_head gather: expected rank {rank}'s vocab shard to hold token ids {len(rows)}.. in at "
                f"most {rows_per_rank} rows, found ids {start}..{end - 1}"
            )
        rows.extend(range(rank * rows_per_rank, rank * rows_per_rank + end - start))
    if len(rows) < vocab:
        raise ValueError(
            f"DSPARK lm_head gather: expected the vocab shards to hold token ids 0..{vocab - 1}, "
            f"found 0..{len(rows) - 1}"
        )
    return torch.tensor(rows[:vocab], dtype=torch.int64)


class DSparkDraftSampler:
    """Markov sampling and the confidence head in CUDA graphs of their own, replayed right after the draft
    backbone's graph.

    One graph per (captured batch size, mode): ``greedy`` (an all-greedy batch: tokens and confidence, no
    draft distribution) and ``sampled`` (``q`` built for every row). The batch's hidden states and inputs
    are copied into static buffers (rows past ``bs`` of the padded size keep stale values, and their
    outputs are ignored); outputs land in static buffers read through ``DraftBlock`` views. The worker runs
    batches larger than the largest captured size eagerly.
    """

    MODES = ("greedy", "sampled")

    def __init__(
        self, model: DSparkDraftModel, lm_head_weight: torch.Tensor, gamma: int, capture_bs: list[int],
        device: torch.device,
    ) -> None:
        self.model = model
        self.lm_head_weight = lm_head_weight
        self.gamma = gamma
        self.capture_bs = sorted(set(capture_bs))
        self.max_bs = self.capture_bs[-1]
        vocab, d = lm_head_weight.shape
        rows = self.max_bs
        # Inputs: valid values from the start, since capture runs the loop on whatever is staged.
        self.hidden = torch.zeros((rows * gamma, d), dtype=lm_head_weight.dtype, device=device)
        self.anchor = torch.zeros((rows,), dtype=torch.int64, device=device)
        self.inv_temperature = torch.ones((rows,), dtype=torch.float32, device=device)
        self.greedy = torch.ones((rows,), dtype=torch.bool, device=device)
        self.uniforms = torch.full((rows, gamma), 0.5, dtype=torch.float32, device=device)
        # Outputs.
        self.tokens = torch.zeros((rows, gamma), dtype=torch.int64, device=device)
        self.probs = torch.zeros((rows, gamma, vocab), dtype=torch.float32, device=device)
        self.confidence_logits = (
            torch.zeros((rows, gamma), dtype=torch.float32, device=device) if model.confidence_head is not None
            else None
        )
        self.graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}

    def _run(self, bs: int, mode: str) -> None:
        """The loop on the first ``bs`` rows of the static buffers, outputs copied into the static outputs."""
        block = self.model.draft_block(
            self.hidden[: bs * self.gamma], self.lm_head_weight, self.anchor[:bs], self.inv_temperature[:bs],
            self.greedy[:bs], self.uniforms[:bs], all_greedy=mode == "greedy",
        )
        self.tokens[:bs].copy_(block.tokens)
        if block.probs is not None:
            self.probs[:bs].copy_(block.probs)
        if self.confidence_logits is not None:
            self.confidence_logits[:bs].copy_(block.confidence_logits)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        for bs in reversed(self.capture_bs):  # largest first, so the shared pool is sized once
            for mode in self.MODES:
                with torch.cuda.stream(stream):
                    self._run(bs, mode)  # warm-up outside capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._run(bs, mode)
                self.graphs[(bs, mode)] = graph
        torch.cuda.current_stream().wait_stream(stream)

    def __call__(
        self, hidden: torch.Tensor, anchor: torch.Tensor, inv_temperature: torch.Tensor, greedy: torch.Tensor,
        uniforms: torch.Tensor, all_greedy: bool,
    ) -> DraftBlock:
        """hidden ``[bs * gamma, d]``, anchor ``[bs]``, ``1/T`` ``[bs]``, greedy ``[bs]``, uniforms
        ``[bs, gamma]`` (``bs <= max_bs``) -> ``DraftBlock`` (views of the static outputs, valid until the next
        call)."""
        bs = anchor.shape[0]
        padded = self.capture_bs[bisect.bisect_left(self.capture_bs, bs)]
        self.hidden[: bs * self.gamma].copy_(hidden)
        self.anchor[:bs].copy_(anchor)
        self.inv_temperature[:bs].copy_(inv_temperature)
        self.greedy[:bs].copy_(greedy)
        self.uniforms[:bs].copy_(uniforms)
        self.graphs[(padded, "greedy" if all_greedy else "sampled")].replay()
        return DraftBlock(
            tokens=self.tokens[:bs],
            probs=None if all_greedy else self.probs[:bs],
            confidence_logits=None if self.confidence_logits is None else self.confidence_logits[:bs],
        )


class DSparkWorker(DFlashWorkerV2):
    """DSPARK speculative decoding (spec-v2, overlap and synchronous scheduling)."""

    _sampler: Optional[DSparkDraftSampler] = None  # set while DFLASH captures its graphs (in __init__)
    _tp_group: Optional[GroupCoordinator] = None  # the TP group when --tp-size > 1 (see _from_tp_rank0)
    _cpu_profile: Optional[CpuProfile] = None  # SGLANG_DSPARK_CPU_PROFILE (benchmarking only)
    _verify_graphs: Optional[VerifyGraphs] = None  # scheduled verification: verify graphs per width
    _planner: Optional[WidthPlanner] = None  # scheduled verification: the width of each step
    _calibration_log: Optional[CalibrationLog] = None  # SGLANG_DSPARK_CALIBRATION_LOG (measurement only)
    _lengths_from_bounds = False  # sync-free FlashInfer (SGLANG_DSPARK_NO_SEQ_LENS_SYNC): plan from the reserved bounds
    PROFILE_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64)  # timed for --speculative-dspark-cost-profile auto

    def __init__(
        self,
        server_args: ServerArgs,
        gpu_id: int,
        tp_rank: int,
        dp_rank: Optional[int],
        moe_ep_rank: int,
        attn_cp_rank: int,
        moe_dp_rank: int,
        nccl_port: int,
        target_worker,
    ) -> None:
        with _without_dflash_block_size_warning():
            super().__init__(
                server_args=server_args, gpu_id=gpu_id, tp_rank=tp_rank, dp_rank=dp_rank,
                moe_ep_rank=moe_ep_rank, attn_cp_rank=attn_cp_rank, moe_dp_rank=moe_dp_rank,
                nccl_port=nccl_port, target_worker=target_worker,
            )
        self.gamma = int(server_args.speculative_dspark_block_size)
        self.verify_width = self.gamma + 1
        if self.speculative_num_draft_tokens != self.verify_width:
            raise ValueError(
                f"DSPARK: --speculative-num-draft-tokens must be gamma + 1 = {self.verify_width} "
                f"(--speculative-dspark-block-size {self.gamma}), got {self.speculative_num_draft_tokens}"
            )
        if get_tp_group().world_size > 1:
            self._tp_group = get_tp_group()
        self._lm_head_weight = self._target_lm_head_weight()
        self._draft_spec_info = DFlashVerifyInput(
            draft_token=torch.empty((0,), dtype=torch.long, device=self.device),
            positions=torch.empty((0,), dtype=torch.int64, device=self.device),
            draft_token_num=self.gamma,
            custom_mask=None,
            capture_hidden_mode=CaptureHiddenMode.NULL,
        )
        self._all_greedy: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per bs: (greedy mask, 1/T), read only
        self._simulation = SimulatedAcceptance.from_env(os.environ, self.gamma, self.device)
        self._timer = StepTimer.from_env(os.environ)
        self._cpu_profile = CpuProfile.from_env(os.environ)
        self._calibration_log = CalibrationLog.from_env(os.environ) if self.tp_rank == 0 else None
        config = self._dspark_config()
        logger.info(
            "DSPARK worker: gamma=%d (draft width %d, verify width %d), %s draft %s, markov %s r=%d, "
            "confidence head %s, mask token %d, %s verification",
            self.gamma, self.gamma, self.verify_width, self.draft_model.checkpoint_format,
            server_args.speculative_draft_model_path, config.markov_head_type, config.markov_rank,
            "on" if config.enable_confidence_head else "off", self._mask_token_id,
            server_args.speculative_dspark_verify,
        )

    def init_attention_backends(self) -> None:
        """The scheduler builds every worker's attention backends after the workers (and reads
        ``needs_cpu_seq_lens`` after this): the place for the sync-free plan (``_plan_from_upper_bounds``)."""
        super().init_attention_backends()
        choice = os.environ.get(NO_SEQ_LENS_SYNC_ENV, "")
        if choice not in ("", "0", "1"):
            raise ValueError(f"{NO_SEQ_LENS_SYNC_ENV}: expected 0 or 1, found {choice!r}")
        if choice != "0":
            self._plan_from_upper_bounds(required=choice == "1")

    def init_cuda_graphs(self) -> None:
        """DFLASH's draft graphs, then (scheduled verification) the target's verify graphs for widths
        ``1..gamma``, the cost profile and the width planner."""
        super().init_cuda_graphs()
        if self.server_args.speculative_dspark_verify != "scheduled":
            return
        self._verify_graphs = VerifyGraphs(self.target_worker.model_runner, range(1, self.gamma + 1))
        cost = self._cost_profile()
        self._planner = WidthPlanner(self.gamma, cost, ragged=self._per_request_lengths())
        logger.info(
            "DSPARK scheduled verification: verify graphs for widths %s, cost profile %s (%s): verify %s ms at "
            "1/%d/%d tokens, draft %s ms at batch 1/%d",
            sorted(self._verify_graphs.all_runners()) or "none (eager)", cost.source, cost.device,
            "/".join(f"{cost.verify_ms(t):.2f}" for t in (1, 64, 512)), 64, 512,
            "/".join(f"{cost.draft_ms(b):.2f}" for b in (1, 64)), 64,
        )

    def _per_request_lengths(self) -> bool:
        """``SGLANG_DSPARK_PER_REQUEST_LENGTHS=1``: per-request verify lengths (experimental); not under
        deterministic inference, whose verify plans each width's rows as decode rows."""
        choice = os.environ.get(PER_REQUEST_LENGTHS_ENV, "")
        if choice not in ("", "0", "1"):
            raise ValueError(f"{PER_REQUEST_LENGTHS_ENV}: expected 0 or 1, found {choice!r}")
        if choice != "1":
            return False
        if getattr(self.target_worker.model_runner.attn_backend, "verify_decode_rows", 0):
            logger.warning("DSPARK: %s=1 ignored under --enable-deterministic-inference.", PER_REQUEST_LENGTHS_ENV)
            return False
        logger.info("DSPARK: per-request verify lengths on (experimental, %s=1).", PER_REQUEST_LENGTHS_ENV)
        return True

    def _cost_profile(self) -> CostProfile:
        """--speculative-dspark-cost-profile: a file, the captured graphs timed now (auto), or the roofline
        estimate (builtin, and auto without CUDA graphs). ``SGLANG_DSPARK_COST_PROFILE_OUT=PATH`` saves a
        measured profile (``python -m sglang_dspark.cost_profile server`` sets it)."""
        choice = self.server_args.speculative_dspark_cost_profile
        target = self.target_worker.model_runner
        if choice not in ("auto", "builtin"):
            return CostProfile.load(choice)
        if choice == "auto" and self._tp_group is not None:  # timings differ per rank; widths may not
            logger.info("DSPARK: --tp-size > 1: cost profile 'auto' uses the builtin estimate on every rank.")
        elif choice == "auto":
            try:
                profile = measure_profile(
                    self._verify_graphs.all_runners(), self._draft_replay, self.PROFILE_BATCH_SIZES,
                    device=torch.cuda.get_device_name(self.device), model=self.server_args.model_path,
                    dtype=str(target.dtype).replace("torch.", ""),
                )
            except Exception as exc:  # noqa: BLE001 - the estimate still serves; say why
                logger.warning("DSPARK: timing the CUDA graphs for the cost profile failed (%s: %s).",
                               type(exc).__name__, exc)
                profile = None
            if profile is not None:
                out = os.environ.get(COST_PROFILE_OUT_ENV)
                if out and self.tp_rank == 0:
                    profile.save(out)
                    logger.info("DSPARK: cost profile written to %s", out)
                return profile
            logger.warning("DSPARK: no CUDA graphs to time for the cost profile; using the builtin estimate.")
        draft_params = sum(p.numel() for p in self.draft_model.parameters()) + self._lm_head_weight.numel()
        return builtin_profile(
            target_params=float(sum(p.numel() for p in target.model.parameters())),
            draft_params=float(draft_params), gamma=self.gamma,
        )

    def _draft_replay(self, bs: int) -> Optional[Callable[[], object]]:
        """One draft pass at batch size ``bs`` from the captured graphs (backbone, then Markov/confidence), or
        None when either graph is missing."""
        backbone = graph_replay(self.draft_model_runner.decode_cuda_graph_runner, bs)
        sampler = None if self._sampler is None else self._sampler.graphs.get((bs, "greedy"))
        if backbone is None or sampler is None:
            return None
        return lambda: (backbone(), sampler.replay())

    def _plan_from_upper_bounds(self, required: bool) -> None:
        """The default with FlashInfer (``SGLANG_DSPARK_NO_SEQ_LENS_SYNC=0`` turns it off, ``=1`` requires it):
        the target's and the draft's FlashInfer backends opt out of the scheduler's host mirror of the sequence
        lengths (``needs_cpu_seq_lens``), so preparing step N + 1 does not wait for step N's acceptance on the
        GPU (SGLang's ``resolve_seq_lens_cpu``). The step then plans attention from the reserved upper bounds,
        and patch 0010 captures and replays the verify graphs without a KV split (the cost: at small batch and
        long context the verify attention runs on fewer thread blocks). Other backends keep the host lengths."""
        from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

        backends = [b for b in self.spec_v2_attn_backends if b is not None]
        others = sorted({type(b).__name__ for b in backends if not isinstance(b, FlashInferAttnBackend)})
        if others and required:
            raise ValueError(
                f"{NO_SEQ_LENS_SYNC_ENV}=1 needs FlashInfer attention for the target and the draft "
                f"(--attention-backend flashinfer), found {', '.join(others)}"
            )
        if others:
            logger.info("DSPARK: attention backends %s: planned from the scheduler's host sequence lengths.",
                        ", ".join(others))
            return
        for backend in backends:
            backend.needs_cpu_seq_lens = False
        self._lengths_from_bounds = True
        logger.info("DSPARK: FlashInfer attention planned from reserved sequence-length bounds, without a KV split: "
                    "the scheduler does not wait for each step's lengths (%s=0 plans from the exact lengths, with "
                    "a KV split, for long contexts at small batch).", NO_SEQ_LENS_SYNC_ENV)

    def _dspark_config(self) -> DSparkConfig:
        if not isinstance(self.draft_model, DSparkDraftModel):
            raise ValueError(
                f"{self.server_args.speculative_draft_model_path}: DSPARK needs a DSpark draft (architectures "
                f"Qwen3DSparkModel or DSparkDraftModel), got {type(self.draft_model).__name__}"
            )
        return self.draft_model.dspark_config

    # ---- hooks of DFlashWorkerV2 -------------------------------------------------------------------------

    def _resolve_mask_token_id(self, *, mask_token: str, mask_token_id: Optional[int] = None) -> int:
        """The mask token is the draft config's ``mask_token_id`` (DFLASH's tokenizer lookup does not apply).
        Called from ``DFlashWorkerV2.__init__`` once the draft model is loaded."""
        mask_id = self._dspark_config().mask_token_id
        vocab = int(self.target_worker.model_runner.model_config.vocab_size)
        if not 0 <= mask_id < vocab:
            raise ValueError(
                f"{self.server_args.speculative_draft_model_path}: key 'mask_token_id': expected an id in "
                f"0..{vocab - 1} (the target's vocab), found {mask_id}"
            )
        return mask_id

    def _maybe_build_draft_sampler(self) -> None:
        """Called by ``DFlashWorkerV2.init_cuda_graphs`` before the draft graph is captured: captures the
        Markov/confidence graphs (``DSparkDraftSampler``) and returns None, so the draft graph itself ends
        with the backbone's hidden states."""
        limit = self.draft_model_runner.req_to_token_pool.size
        capture_bs = [bs for bs in self.server_args.cuda_graph_config.decode.bs if bs <= limit]
        if capture_bs:
            sampler = DSparkDraftSampler(self.draft_model, self._lm_head_weight, self.gamma, capture_bs, self.device)
            sampler.capture()
            self._sampler = sampler
            logger.info("DSPARK: Markov sampling and confidence head in CUDA graphs for batch sizes %s (greedy and "
                        "sampled).", capture_bs)
        return None

    def _target_lm_head_weight(self) -> torch.Tensor:
        """The target's lm_head rows of the real vocabulary: ``[V, d]``.

        Under TP the target's ``ParallelLMHead`` (or the ``embed_tokens`` it is tied to) holds one vocab shard
        per rank, padded; the Markov head needs full-vocabulary logits inside its CUDA graphs, so the shards are
        all-gathered here once and every rank keeps the whole table (its own shard stays in use by the target):
        the Markov loop then runs replicated, with no collective inside the graphs.
        """
        lm_head = getattr(self.target_worker.model_runner.model, "lm_head", None)
        weight = getattr(lm_head, "weight", None)
        if weight is None or not torch.is_floating_point(weight):
            raise ValueError(
                "DSPARK computes draft logits with the target's lm_head: the target model must expose an "
                f"unquantized lm_head.weight, found {None if weight is None else weight.dtype}"
            )
        shard = getattr(lm_head, "shard_indices", None)
        tp_size = int(lm_head.tp_size) if shard is not None else 1
        rows = int(lm_head.org_vocab_size) if shard is not None else int(weight.shape[0])
        vocab = self._dspark_config().vocab_size
        if rows != vocab:
            raise ValueError(
                f"{self.server_args.speculative_draft_model_path}: key 'vocab_size': expected {rows} (rows of "
                f"the target's lm_head), found {vocab}"
            )
        if tp_size == 1:
            return weight[:vocab]
        group = self._tp_group
        if group is None or group.world_size != tp_size:
            raise ValueError(
                f"DSPARK: the target's lm_head is split over {tp_size} ranks, expected the TP group's "
                f"{1 if group is None else group.world_size} ranks (--tp-size)"
            )
        org_ranges = []
        for rank in range(tp_size):
            indices = lm_head._get_indices(
                lm_head.num_embeddings_padded, lm_head.org_vocab_size_padded, lm_head.num_embeddings,
                lm_head.org_vocab_size, rank, tp_size,
            )
            org_ranges.append((indices.org_vocab_start_index, indices.org_vocab_end_index))
        gathered = group.all_gather(weight.detach().contiguous(), dim=0)  # [tp_size * rows per rank, d]
        index = gathered_vocab_rows(org_ranges, int(weight.shape[0]), vocab).to(gathered.device)
        full = gathered.index_select(0, index)
        if self.tp_rank == 0:
            logger.info(
                "DSPARK: --tp-size %d: the target's lm_head vocab shards gathered on every rank for the Markov "
                "head, [%d, %d] %s: +%.1f MiB per GPU",
                tp_size, full.shape[0], full.shape[1], full.dtype, full.numel() * full.element_size() / 2**20,
            )
        return full

    # ---- the step ------------------------------------------------------------------------------------------

    def forward_batch_generation(
        self, batch: ScheduleBatch, on_publish: Optional[Callable[[torch.Tensor], None]] = None
    ) -> GenerationBatchResult:
        if batch.forward_mode.is_extend() or batch.is_extend_in_batch or batch.forward_mode.is_idle():
            return super().forward_batch_generation(batch, on_publish)  # prefill / idle: as DFLASH
        return self._decode(batch, on_publish)

    def _decode(
        self, batch: ScheduleBatch, on_publish: Optional[Callable[[torch.Tensor], None]]
    ) -> GenerationBatchResult:
        if batch.return_logprob:
            raise ValueError("DSPARK speculative decoding does not support return_logprob.")
        draft_input = batch.spec_info
        if not isinstance(draft_input, DFlashDraftInputV2):
            raise RuntimeError(
                f"DSPARK expected DFlashDraftInputV2 state on the running batch, found {type(draft_input).__name__}"
            )
        # Carried over from the previous overlap iteration, possibly produced on another stream.
        batch.seq_lens.record_stream(torch.get_device_module(self.device).current_stream())
        bs = batch.seq_lens.shape[0]
        gamma = self.gamma
        prefix_lens = batch.seq_lens
        timer = self._timer
        timer.start(bs)
        if self._cpu_profile is not None:
            self._cpu_profile.step()
        greedy, inv_temperature, sampling = self._sampling(batch, bs)
        draws = torch.rand((bs, 2 * gamma + 2), device=self.device)

        # Verify width W (W - 1 drafts per request), or per-request lengths summing to bs * W: chosen from earlier
        # steps only (scheduled verification).
        rids = [r.rid for r in batch.reqs] if self._planner is not None and self._planner.ragged else None
        width, lengths = (self.verify_width, None) if self._planner is None else self._step_plan(bs, batch, rids)
        ids, positions, cache_loc = self._verify_window(batch, draft_input.bonus_tokens)
        timer.mark("prepare")
        block = None
        if width > 1:
            hidden = self._draft_backbone(batch, draft_input, ids, positions, cache_loc)
            if self._tp_group is not None:
                draws, hidden = self._from_tp_rank0(draws, hidden)
            timer.mark("draft")
            block = self._draft_tokens(hidden, ids[:, 0], inv_temperature, greedy, draws[:, :gamma], sampling is None)
            ids[:, 1:].copy_(block.tokens)
            timer.mark("markov")
        elif self._tp_group is not None:  # a plain decode step: the bonus draws still come from rank 0
            draws, _ = self._from_tp_rank0(draws, self._lm_head_weight.new_empty((0,)))
        drafts = ids[:, 1:]  # [bs, gamma]; past the verified W - 1 never accepted
        window = ids, positions, cache_loc  # each [bs, gamma + 1]
        ragged = None if lengths is None else RaggedRows.build(lengths, gamma, self.device)
        if ragged is None:
            ids, positions, cache_loc = (t[:, :width].contiguous() for t in window)
        else:  # the requests' rows one after the other; read back below as [bs, n] (n = the longest length)
            ids, positions, cache_loc = (t.view(-1)[ragged.window_index] for t in window)
        logits_output, can_run_cuda_graph = self._verify(batch, draft_input, ids, positions, cache_loc, ragged)
        timer.mark("verify")

        logits, hidden = logits_output.next_token_logits, logits_output.hidden_states
        caps, top1 = None, None  # per-request drafts verified (ragged), the target's argmax per row
        if ragged is not None:
            width, caps = ragged.rows.shape[1], ragged.caps
            # Lengths come only with drafts and for batches without logit adjustments (_step_plan): an all-greedy
            # batch reads the target's argmax per row, no [bs, n, V] copy of the logits.
            if sampling is None and self._simulation is None:
                top1 = logits.argmax(dim=-1)[ragged.rows]
            else:
                logits = logits[ragged.rows.view(-1)]
            positions, cache_loc = (t[:, :width].contiguous() for t in window[1:])
            if hidden is not None:
                hidden = hidden[ragged.rows.view(-1)]
        if top1 is None and batch.sampling_info is not None:
            apply_dflash_verify_logits_adjustments(
                next_token_logits=logits, sampling_info=batch.sampling_info, draft_token_num=width
            )
        verified = width - 1
        if top1 is not None:
            accepted, bonus = greedy_accept_top1(block.tokens[:, :verified], top1, caps)
        elif self._simulation is not None or block is None:
            logits = logits.view(bs, width, -1)
            accepted = (
                torch.zeros((bs,), dtype=torch.int64, device=self.device) if self._simulation is None
                else self._simulation.accepted(draws[:, 2 * gamma + 1]).clamp(max=width - 1)
            )
            if caps is not None:
                accepted = torch.minimum(accepted, caps)
            bonus = target_token_at(logits, accepted, greedy, sampling, draws[:, 2 * gamma])
        else:
            accepted, bonus = accept_drafts(
                block.tokens[:, :verified], logits.view(bs, width, -1),
                None if block.probs is None else block.probs[:, :verified],
                greedy, sampling, draws[:, gamma : gamma + verified], draws[:, 2 * gamma], caps,
            )
        layout = commit_layout(drafts, accepted, bonus, prefix_lens)
        if block is not None and block.confidence_logits is not None:
            per_request = verified if ragged is None else [n - 1 for n in ragged.lengths]
            if self._planner is not None:
                self._planner.observe(block.confidence_logits, accepted, per_request, rids)
            if self._calibration_log is not None:
                self._calibration_log.write(
                    block.confidence_logits, accepted, per_request, rids or [r.rid for r in batch.reqs]
                )
        timer.mark("accept")
        if on_publish is not None:
            on_publish(layout.new_seq_lens)

        if hidden is None:
            raise RuntimeError("DSPARK verify returned no target hidden states (aux capture is not set up).")
        self._append_target_hidden_to_draft_kv_by_loc(
            target_hidden=hidden,
            cache_loc=cache_loc.view(-1),
            cache_loc_2d=cache_loc,
            positions=positions.view(-1),
            commit_lens=layout.commit_lens,
        )
        logits_output.hidden_states = None  # keep the large buffer off the D2H copy
        timer.mark("kv_inject")
        timer.end(bs)
        return GenerationBatchResult(
            logits_output=logits_output,
            next_token_ids=layout.out_tokens.view(-1),
            accept_lens=layout.commit_lens,
            can_run_cuda_graph=can_run_cuda_graph,
            next_draft_input=self._make_next_draft_input_decode(bonus_tokens=bonus, new_seq_lens=layout.new_seq_lens),
            speculative_num_draft_tokens=self.verify_width,
            new_seq_lens=layout.new_seq_lens,
        )

    def _step_plan(
        self, bs: int, batch: ScheduleBatch, rids: Optional[list[str]]
    ) -> tuple[int, Optional[list[int]]]:
        """The planner's verify width for this step and per-request lengths (or None); under TP, TP rank 0's,
        sent to the other ranks over the TP group's CPU side (each rank's host clock and the moment its lagged
        copy of the gains lands differ; the width must not). Lengths only for a batch whose logits need no
        per-request adjustment (logit bias, penalties, custom logit processors apply per uniform row block)."""
        plan = self._planner.plan(bs, rids if rids is not None and _no_adjustments(batch) else None)
        if self._tp_group is not None:
            plan = self._tp_group.broadcast_object(plan, src=0)
        return plan

    def _from_tp_rank0(self, draws: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TP rank 0's uniforms (float32 ``[bs, 2 * gamma + 2]``) and draft hidden states (``[bs * gamma, d]``) on
        every rank of the TP group: one broadcast of their bytes, no host synchronisation.

        Every decision of the step (draft tokens, acceptance, bonus) is a function of these two, of the
        verify logits and of tables that are identical on every rank (the logits processor all-gathers the
        verify logits, so each rank holds the same bytes; the lm_head table is gathered once at init; the
        heads' weights are replicated). Without this step the ranks would agree only by assumption: SGLang
        seeds every rank's RNG with one broadcast seed and counts on all ranks drawing the same numbers (it
        syncs sampled ids only under SYNC_TOKEN_IDS_ACROSS_TP or with a grammar, noting that the all-reduce
        and sampling kernels are deterministic "in most cases"), and each rank computes its own copy of the
        draft hidden states, equal across ranks only while every all-reduce of the draft returns bitwise-equal
        sums everywhere (the vLLM-style custom all-reduce is built for that; NCCL and SGLang's other backends do
        not promise it). A draft token that differed on one rank would give the ranks different verify inputs.
        Taking rank 0's copy removes both assumptions for one small collective per step (``bs * (gamma * d * 2
        + (2 * gamma + 2) * 4)`` bytes in bf16: 450 KiB at batch 8, gamma 7, d 4096).
        """
        n_hidden = hidden.numel() * hidden.element_size()
        start = n_hidden + (-n_hidden % 16)  # hidden states at offset 0, uniforms 16-byte aligned after them
        payload = torch.cat([
            hidden.reshape(-1).view(torch.uint8),
            torch.zeros((start - n_hidden,), dtype=torch.uint8, device=hidden.device),
            draws.reshape(-1).view(torch.uint8),
        ])
        self._tp_group.broadcast(payload, src=0)
        return (
            payload[start:].view(draws.dtype).view(draws.shape),
            payload[:n_hidden].view(hidden.dtype).view(hidden.shape),
        )

    def _sampling(
        self, batch: ScheduleBatch, bs: int
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[TargetSampling]]:
        """(greedy mask bool ``[bs]``, ``1/T`` ``[bs]``, target sampling params or None for all-greedy)."""
        info = batch.sampling_info
        if info is None or info.is_all_greedy:
            constants = self._all_greedy.get(bs)
            if constants is None:
                constants = self._all_greedy[bs] = (
                    torch.ones((bs,), dtype=torch.bool, device=self.device),
                    torch.ones((bs,), dtype=torch.float32, device=self.device),
                )
            return (*constants, None)
        # Host-side facts from the requests (no sync); greedy rows never read their target probabilities.
        sampled = [r.sampling_params for r in batch.reqs if r.sampling_params.top_k > 1]
        vocab = self._lm_head_weight.shape[0]
        temperature = info.temperatures.view(-1).float()
        sampling = TargetSampling(
            temperature=temperature,
            top_k=info.top_ks,
            top_p=info.top_ps,
            max_top_k=max((p.top_k for p in sampled), default=0),
            apply_top_k=any(p.top_k < vocab for p in sampled),
            apply_top_p=any(p.top_p < 1.0 for p in sampled),
            min_p=info.min_ps,
            apply_min_p=any(p.min_p > 0.0 for p in sampled),
        )
        return info.top_ks <= 1, 1.0 / temperature, sampling

    def _verify_window(
        self, batch: ScheduleBatch, bonus_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids ``[bonus, mask x gamma]``, positions ``P..P+gamma``, cache slots), each int64 ``[bs, gamma + 1]``."""
        bs, width = batch.seq_lens.shape[0], self.verify_width
        ids, positions, cache_loc = (torch.empty((bs, width), dtype=torch.int64, device=self.device) for _ in range(3))
        _prepare_dflash_draft_block_unchecked(
            bonus_tokens=bonus_tokens.view(-1),
            prefix_lens=batch.seq_lens.view(-1),
            req_pool_indices=batch.req_pool_indices.view(-1),
            req_to_token=self.model_runner.req_to_token_pool.req_to_token,
            block_ids_out=ids,
            positions_out=positions,
            cache_loc_out=cache_loc,
            mask_token_id=self._mask_token_id,
        )
        return ids, positions, cache_loc

    def _host_seq_lens(
        self, batch: ScheduleBatch, draft_input: DFlashDraftInputV2, width: int,
        lengths: Optional[Sequence[int]] = None,
    ) -> tuple[torch.Tensor, int]:
        """Host KV lengths of a ``width``-token forward (or of per-request ``lengths``) for attention planning, no
        sync: exact from the scheduler's host mirror (committed + width), or, sync-free
        (``_plan_from_upper_bounds``), the reserved upper bounds, which FlashInfer may only plan from without a
        KV split (patch 0010 sees to that).

        Sync-free, the bounds are used whatever ``batch.seq_lens_cpu`` holds: the scheduler's resolve sets it
        to None, but returns early for a batch without future indices, leaving the seed of
        ``DFlashDraftInputV2.prepare_for_decode`` (committed lengths one step behind), which would under-count."""
        if self._lengths_from_bounds:
            if draft_input.reserved_seq_lens_cpu is None:
                raise RuntimeError("DSPARK's sync-free attention plan needs the reserved sequence lengths.")
            return draft_input.reserved_seq_lens_cpu, int(draft_input.reserved_seq_lens_sum)
        if batch.seq_lens_cpu is None:
            raise RuntimeError("DSPARK decode needs the scheduler's host sequence lengths (batch.seq_lens_cpu).")
        seq_lens_cpu = batch.seq_lens_cpu + (width if lengths is None else torch.tensor(lengths))
        return seq_lens_cpu, int(seq_lens_cpu.sum())

    def _draft_backbone(
        self,
        batch: ScheduleBatch,
        draft_input: DFlashDraftInputV2,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache_loc: torch.Tensor,
    ) -> torch.Tensor:
        """One draft forward over the first gamma window slots (the draft CUDA graph when it can run) ->
        final-normed hidden states ``[bs * gamma, d]``."""
        bs, gamma = ids.shape[0], self.gamma
        block_ids = ids[:, :gamma].contiguous()
        embed = self.target_worker.model_runner.model.get_input_embeddings()
        seq_lens_cpu, seq_lens_sum = self._host_seq_lens(batch, draft_input, gamma)
        forward_batch = ForwardBatch(
            forward_mode=ForwardMode.TARGET_VERIFY,
            batch_size=bs,
            input_ids=block_ids.view(-1),
            req_pool_indices=batch.req_pool_indices,
            seq_lens=batch.seq_lens,
            out_cache_loc=cache_loc[:, :gamma].reshape(-1),
            seq_lens_sum=seq_lens_sum,
            seq_lens_cpu=seq_lens_cpu,
            positions=positions[:, :gamma].reshape(-1),
            input_embeds=embed(block_ids).view(bs * gamma, -1),
            spec_algorithm=self.draft_model_runner.spec_algorithm,
            spec_info=self._draft_spec_info,
            capture_hidden_mode=CaptureHiddenMode.NULL,
        )
        with torch.inference_mode():
            hidden = self.draft_model_runner.forward(forward_batch).logits_output.hidden_states
        if hidden is None:
            raise RuntimeError("DSPARK draft model returned no hidden states.")
        return hidden

    def _draft_tokens(
        self,
        hidden: torch.Tensor,
        anchor: torch.Tensor,
        inv_temperature: torch.Tensor,
        greedy: torch.Tensor,
        uniforms: torch.Tensor,
        all_greedy: bool,
    ) -> DraftBlock:
        """The Markov sampling loop and the confidence head over the backbone output (their CUDA graph when
        one was captured)."""
        with torch.inference_mode():
            if self._sampler is not None and anchor.shape[0] <= self._sampler.max_bs:
                return self._sampler(hidden, anchor, inv_temperature, greedy, uniforms, all_greedy)
            return self.draft_model.draft_block(
                hidden, self._lm_head_weight, anchor, inv_temperature, greedy, uniforms, all_greedy=all_greedy
            )

    def _verify(
        self,
        batch: ScheduleBatch,
        draft_input: DFlashDraftInputV2,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache_loc: torch.Tensor,
        ragged: Optional[RaggedRows] = None,
    ) -> tuple[LogitsProcessorOutput, bool]:
        """Target TARGET_VERIFY forward over ``[x_0, x_1..x_{W-1}]`` (ids, positions, cache slots int64 ``[bs, W]``,
        ``W`` the step's verify width; with ``ragged``, each flat ``[bs * W]`` in its row layout) -> (logits output
        with the captured hidden states, whether a target CUDA graph ran). Widths below gamma + 1 replay their
        own graphs (``VerifyGraphs``)."""
        width = ids.shape[1] if ragged is None else ragged.width
        fields = dict(draft_token=ids.view(-1), positions=positions.view(-1), draft_token_num=width,
                      custom_mask=None, capture_hidden_mode=CaptureHiddenMode.FULL)
        verify_input = DFlashVerifyInput(**fields) if ragged is None else RaggedVerifyInput(**fields, ragged=ragged)
        batch.out_cache_loc = cache_loc.view(-1)
        seq_lens_cpu, seq_lens_sum = batch.seq_lens_cpu, batch.seq_lens_sum
        batch.seq_lens_cpu, batch.seq_lens_sum = self._host_seq_lens(
            batch, draft_input, width, None if ragged is None else ragged.lengths
        )
        graphs = self._verify_graphs.using(width) if self._verify_graphs is not None else contextlib.nullcontext()
        with graphs:
            try:
                verify_batch, _ = verify_input.prepare_for_verify(batch, self.target_worker)
            finally:
                batch.seq_lens_cpu, batch.seq_lens_sum = seq_lens_cpu, seq_lens_sum
            out = self.target_worker.forward_batch_generation(
                batch=None, forward_batch=verify_batch, is_verify=True, skip_attn_backend_init=True
            )
        return out.logits_output, out.can_run_cuda_graph

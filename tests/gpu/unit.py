"""Component checks that need SGLang or a GPU but no server (``python tests/gpu/unit.py``).

* ``DSparkDraftModel`` (SGLang layers) loads DeepSpec and TorchSpec drafts with every Markov head type
  through the one loader, holds exactly the checkpoint's tensors (fused QKV / gate-up included), rejects a
  checkpoint with a missing tensor, and its ``draft_block`` equals the reference drafter on the same
  hidden states. Runs on CPU too (``SGLANG_USE_CPU_ENGINE=1`` is set when there is no GPU).
* ``DSparkWorker``'s decode step with mocked runners (bigram target, bigram draft): window, draft
  forward batch, verify ids, accepted counts, output layout, published lengths, committed draft K/V rows,
  for greedy, mixed and simulated acceptance and for the graph (sampler buffer) path. Runs on CPU too.
* CUDA only: the draft sampler (``accept.sample_draft_block``) and the acceptance
  (``accept.accept_drafts`` + ``commit_layout``) raise nothing under ``torch.cuda.set_sync_debug_mode
  ("error")`` and give the same results replayed from a captured CUDA graph as run eagerly; FlashInfer's
  verify attention planned from upper bounds of the KV lengths (patch 0010) against a reference attention.
"""

from __future__ import annotations

import os
import sys
import tempfile
import types
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Report, info  # noqa: E402

from sglang_dspark import accept, timing  # noqa: E402
from sglang_dspark.checkpoint import (  # noqa: E402
    DSparkCheckpointError,
    load_safetensors,
    random_draft_weights,
    read_draft_config,
    save_draft,
)
from sglang_dspark.config import DSparkConfig  # noqa: E402
from sglang_dspark.reference.drafter import DSparkDrafter  # noqa: E402
from sglang_dspark.reference.heads import build_confidence_head, build_markov_head  # noqa: E402
from sglang_dspark.reference.sampling import SamplingBatch, SamplingParams  # noqa: E402


def small_config(kind: str, **overrides) -> DSparkConfig:
    fields = dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, vocab_size=300, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=1024,
        block_size=7, mask_token_id=299, target_layer_ids=(0, 2), num_target_layers=4, markov_rank=16,
        markov_head_type=kind, enable_confidence_head=True, confidence_head_with_markov=True,
    )
    fields.update(overrides)
    return DSparkConfig(**fields)


class _ServerArgs(types.SimpleNamespace):
    """Stands in for SGLang's global server args, which some layers read at construction (all None)."""

    def __getattr__(self, name):
        return None


def build_sglang_model(draft_dir: Path):
    from sglang.srt.runtime_context import get_parallel
    from sglang.srt.server_args import set_global_server_args_for_scheduler
    from transformers import AutoConfig

    from sglang_dspark.model import DSparkDraftModel
    from sglang_dspark.plugin import register_config_types

    register_config_types()
    set_global_server_args_for_scheduler(_ServerArgs())
    with get_parallel().override(tp_size=1, tp_rank=0, attn_tp_size=1, attn_tp_rank=0):
        return DSparkDraftModel(AutoConfig.from_pretrained(draft_dir))


def check_model(report: Report, kind: str, fmt: str, with_markov_features: bool) -> None:
    name = f"model {kind}/{fmt}/confidence{'+markov' if with_markov_features else ''}"
    config = small_config(kind, confidence_head_with_markov=with_markov_features)
    weights = random_draft_weights(config, seed=3)
    root = Path(tempfile.mkdtemp(prefix="dspark-unit-"))
    save_draft(root / "draft", config, weights, fmt)
    model = build_sglang_model(root / "draft")
    report.check(f"{name}: config parsed from SGLang's HF config == read_draft_config(dir)",
                 (model.dspark_config, model.checkpoint_format) == read_draft_config(root / "draft"))
    model.load_weights(load_safetensors(root / "draft")[0].items())
    params = dict(model.named_parameters())

    def loaded(canonical: str) -> torch.Tensor:
        for fused, parts, owner in (("qkv_proj", ("q_proj", "k_proj", "v_proj"), ".self_attn."),
                                    ("gate_up_proj", ("gate_proj", "up_proj"), ".mlp.")):
            for i, part in enumerate(parts):
                if f"{owner}{part}." in canonical:
                    fused_param = params[canonical.replace(part, fused)]
                    sizes = [weights[canonical.replace(part, p)].shape[0] for p in parts]
                    return fused_param.split(sizes, dim=0)[i]
        return params[canonical]

    wrong = [n for n, w in weights.items() if not torch.equal(loaded(n).float(), w.float())]
    report.check(f"{name}: every checkpoint tensor loaded into its SGLang parameter", not wrong, wrong[:5] or None)

    # draft_block vs the reference drafter fed the same hidden states.
    ref = DSparkDrafter(config)
    ref.load_state_dict(weights, strict=True)
    bs, gamma, gen = 6, 5, torch.Generator().manual_seed(4)
    hidden = torch.randn(bs, gamma, config.hidden_size, generator=gen)
    lm_head = torch.randn(config.vocab_size, config.hidden_size, generator=gen)
    embed = torch.randn(config.vocab_size, config.hidden_size, generator=gen)
    anchor = torch.randint(0, config.vocab_size, (bs,), generator=gen)
    ref.backbone = lambda block_embeds, cache: hidden  # the reference proposes from these hidden states
    greedy_sb = SamplingBatch.repeat(SamplingParams(temperature=0.0), bs)
    want = ref.propose(anchor, ref.new_context_cache(bs), embed, lm_head, gamma, greedy_sb)
    with torch.no_grad():
        got = model.draft_block(hidden.reshape(bs * gamma, -1), lm_head, anchor, torch.ones(bs),
                                torch.ones(bs, dtype=torch.bool), torch.rand(bs, gamma, generator=gen))
    report.check(f"{name}: draft_block tokens == reference propose (greedy)", torch.equal(got.tokens, want.tokens),
                 {"got": got.tokens.tolist(), "want": want.tokens.tolist()} if not torch.equal(got.tokens, want.tokens) else None)
    close = torch.allclose(got.confidence_logits, want.confidence_logits, atol=1e-4, rtol=1e-4)
    report.check(f"{name}: draft_block confidence logits == reference", close)
    report.check(f"{name}: drafts are not constant", len(set(got.tokens.flatten().tolist())) > 1)

    # A checkpoint missing a tensor is refused, naming it.
    raw = load_safetensors(root / "draft")[0]
    missing = next(n for n in raw if "layers.1" in n and "k_proj" in n)
    del raw[missing]
    try:
        model.load_weights(raw.items())
        report.check(f"{name}: a missing tensor is refused", False, "load_weights accepted it")
    except DSparkCheckpointError as e:
        report.check(f"{name}: a missing tensor is refused", "k_proj" in str(e), str(e).splitlines()[-1][:200])


def check_worker_step(report: Report) -> None:
    """``DSparkWorker._decode`` against a bigram target ``f`` and a bigram draft ``g`` (mocked runners)."""
    import sglang_dspark.worker as worker_module
    from sglang.srt.layers.logits_processor import LogitsProcessorOutput
    from sglang.srt.speculative.dflash_info_v2 import DFlashDraftInputV2

    vocab, gamma, d, features = 50, 4, 8, 16
    gen = torch.Generator().manual_seed(0)
    f = torch.randperm(vocab, generator=gen)
    g = torch.where(torch.rand(vocab, generator=gen) < 0.5, f, (f + 1) % vocab)
    t = 7
    for _ in range(gamma + 1):  # a chain from 7 on which every draft is right
        g[t] = f[t]
        t = int(f[t])

    def expected(anchor: int) -> tuple[int, int]:
        t, a = anchor, 0
        while a < gamma and g[t] == f[t]:
            t, a = int(f[t]), a + 1
        return a, int(f[t])

    def prepare_block(bonus_tokens, prefix_lens, req_pool_indices, req_to_token, block_ids_out, positions_out,
                      cache_loc_out, mask_token_id):  # the Triton kernel's contract, in torch
        width = block_ids_out.shape[1]
        block_ids_out.fill_(mask_token_id)
        block_ids_out[:, 0] = bonus_tokens
        positions_out.copy_(prefix_lens[:, None] + torch.arange(width))
        cache_loc_out.copy_(req_to_token[req_pool_indices[:, None], positions_out])

    def draft_block(hidden, lm_head_weight, anchor, inv_temperature, greedy, uniforms, all_greedy=False):
        assert hidden.shape == (anchor.shape[0] * gamma, d), hidden.shape
        tokens, prev = [], anchor
        for _ in range(gamma):
            prev = g[prev]
            tokens.append(prev)
        tokens = torch.stack(tokens, 1)
        probs = None if all_greedy else torch.nn.functional.one_hot(tokens, vocab).float()
        return accept.DraftBlock(tokens, probs, torch.zeros(tokens.shape, dtype=torch.float32))

    seen = {}

    def draft_forward(forward_batch):
        seen["draft"] = forward_batch
        hidden = torch.randn(forward_batch.batch_size * gamma, d)
        return types.SimpleNamespace(logits_output=types.SimpleNamespace(hidden_states=hidden))

    def target_forward(batch=None, forward_batch=None, is_verify=False, skip_attn_backend_init=False):
        ids = forward_batch.draft_token
        seen["verify_ids"] = ids.clone()
        logits = torch.nn.functional.one_hot(f[ids], vocab).float() * 10
        return types.SimpleNamespace(can_run_cuda_graph=False, logits_output=LogitsProcessorOutput(
            next_token_logits=logits, hidden_states=torch.randn(ids.shape[0], features)))

    class Sampler:  # DSparkDraftSampler's interface (its CUDA graphs replaced by draft_block)
        max_bs = 8

        def __call__(self, hidden, anchor, inv_temperature, greedy, uniforms, all_greedy):
            self.anchor, self.greedy, self.all_greedy = anchor.clone(), greedy.clone(), all_greedy
            return draft_block(hidden, None, anchor, inv_temperature, greedy, uniforms, all_greedy)

    class SamplingInfo(types.SimpleNamespace):
        def __len__(self):
            return self.temperatures.shape[0]

    req_to_token = torch.arange(4 * 100).view(4, 100)
    worker = object.__new__(worker_module.DSparkWorker)
    worker.__dict__.update(
        gamma=gamma, verify_width=gamma + 1, device=torch.device("cpu"), _mask_token_id=vocab - 1,
        _lm_head_weight=torch.randn(vocab, d), _draft_spec_info=None, _simulation=None, _sampler=None,
        _all_greedy={}, _timer=timing.NoTimer(),
        draft_model=types.SimpleNamespace(draft_block=draft_block),
        model_runner=types.SimpleNamespace(req_to_token_pool=types.SimpleNamespace(req_to_token=req_to_token)),
        draft_model_runner=types.SimpleNamespace(forward=draft_forward, spec_algorithm=None),
        _target_worker=types.SimpleNamespace(forward_batch_generation=target_forward, model_runner=types.SimpleNamespace(
            model=types.SimpleNamespace(get_input_embeddings=lambda: torch.nn.Embedding(vocab, d)))),
    )
    committed = {}
    worker._append_target_hidden_to_draft_kv_by_loc = lambda **kw: committed.update(kw)

    def batch(bonus: list[int], prefix: list[int], greedy: list[bool]):
        bs = len(bonus)
        top_k = torch.tensor([1 if gr else 5 for gr in greedy])
        info = SamplingInfo(is_all_greedy=all(greedy), temperatures=torch.ones(bs, 1), top_ks=top_k, top_ps=torch.ones(bs), min_ps=torch.zeros(bs),
                            has_custom_logit_processor=False, acc_linear_penalties=None, penalizer_orchestrator=None,
                            vocab_mask=None, logit_bias=None)
        draft_input = DFlashDraftInputV2(topk_p=torch.empty(bs, 0), topk_index=torch.empty(bs, 0, dtype=torch.int64),
                                         bonus_tokens=torch.tensor(bonus), new_seq_lens=torch.tensor(prefix),
                                         hidden_states=torch.empty(bs, 0))
        return types.SimpleNamespace(
            return_logprob=False, spec_info=draft_input, seq_lens=torch.tensor(prefix), seq_lens_cpu=torch.tensor(prefix),
            seq_lens_sum=sum(prefix), req_pool_indices=torch.tensor([2, 0, 3]), sampling_info=info, out_cache_loc=None,
            reqs=[types.SimpleNamespace(rid=f"r{i}", sampling_params=types.SimpleNamespace(top_k=int(k), top_p=1.0,
                                                                                          min_p=0.0))
                  for i, k in enumerate(top_k)])

    by_accepted = {}
    for token in range(vocab):
        by_accepted.setdefault(expected(token)[0], token)
    bonus, prefix, pools = [by_accepted[a] for a in sorted(by_accepted)[-3:]], [10, 20, 30], [2, 0, 3]
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(worker_module, "_prepare_dflash_draft_block_unchecked", prepare_block))
        verify_host_lens = []

        def prepare_for_verify(self, batch, target_worker):
            verify_host_lens.append((batch.seq_lens_cpu.tolist(), batch.seq_lens_sum))
            return self, False

        stack.enter_context(mock.patch.object(worker_module.DFlashVerifyInput, "prepare_for_verify", prepare_for_verify))
        stack.enter_context(mock.patch.object(torch.Tensor, "record_stream", lambda self, stream: None))
        for name, greedy in (("greedy", [True] * 3), ("mixed", [True, False, False])):
            published = []
            result = worker._decode(batch(bonus, prefix, greedy), published.append)
            want = [expected(b) for b in bonus]
            out = result.next_token_ids.view(3, gamma + 1)
            rows_ok = all(out[i, : a + 1].tolist() == [int(x) for x in _chain(f, bonus[i], a)] + [y]
                          for i, (a, y) in enumerate(want))
            draft = seen["draft"]
            ok = (
                result.accept_lens.tolist() == [a + 1 for a, _ in want] and rows_ok
                and result.new_seq_lens.tolist() == [p + a + 1 for p, (a, _) in zip(prefix, want)]
                and torch.equal(published[0], result.new_seq_lens)
                and result.next_draft_input.bonus_tokens.tolist() == [y for _, y in want]
                and result.speculative_num_draft_tokens == gamma + 1
                and draft.input_ids.view(3, gamma)[:, 0].tolist() == bonus
                and bool((draft.input_ids.view(3, gamma)[:, 1:] == vocab - 1).all())
                and draft.positions.view(3, gamma).tolist() == [[p + k for k in range(gamma)] for p in prefix]
                and draft.out_cache_loc.view(3, gamma).tolist() == [req_to_token[r, p : p + gamma].tolist() for r, p in zip(pools, prefix)]
                and draft.seq_lens_cpu.tolist() == [p + gamma for p in prefix]
                and seen["verify_ids"].view(3, gamma + 1)[:, 0].tolist() == bonus
                and committed["commit_lens"].tolist() == result.accept_lens.tolist()
                and committed["positions"].view(3, gamma + 1)[:, 0].tolist() == prefix
            )
            report.check(f"worker step ({name}): window, draft batch, accept, layout, publish, K/V commit", ok,
                         None if ok else {"accept_lens": result.accept_lens.tolist(), "want": want, "out": out.tolist()})
        worker._simulation = accept.SimulatedAcceptance(gamma, "cpu", mean_length=2.0)
        worker._sampler = Sampler()
        result = worker._decode(batch(bonus, prefix, [True, False, True]), None)
        out = result.next_token_ids.view(3, gamma + 1)
        ok = (result.accept_lens.tolist() == [2, 2, 2]
              and all(out[i, :2].tolist() == [int(g[b]), int(f[g[b]])] for i, b in enumerate(bonus))
              and worker._sampler.anchor.tolist() == bonus and not worker._sampler.all_greedy
              and worker._sampler.greedy.tolist() == [True, False, True])
        report.check("worker step (simulated ACC_LEN=2, graph path): one draft + the target's token", ok,
                     None if ok else out.tolist())
        # No exact host mirror of the lengths (SGLANG_DSPARK_NO_SEQ_LENS_SYNC): even where the batch still holds the
        # scheduler's seed (committed lengths one step behind), draft and verify plan from the reserved upper
        # bounds, and the batch keeps its seed for the scheduler.
        b = batch(bonus, prefix, [True, True, True])
        lagging = [p - gamma for p in prefix]
        b.seq_lens_cpu, b.seq_lens_sum = torch.tensor(lagging), sum(lagging)
        reserved = [p + 2 * (gamma + 1) + 3 for p in prefix]
        b.spec_info.reserved_seq_lens_cpu, b.spec_info.reserved_seq_lens_sum = torch.tensor(reserved), sum(reserved)
        verify_host_lens.clear()
        worker._lengths_from_bounds = True
        result = worker._decode(b, None)
        worker._lengths_from_bounds = False
        ok = (seen["draft"].seq_lens_cpu.tolist() == reserved and seen["draft"].seq_lens_sum == sum(reserved)
              and verify_host_lens == [(reserved, sum(reserved))] and b.seq_lens_cpu.tolist() == lagging
              and b.seq_lens_sum == sum(lagging) and result.accept_lens.tolist() == [2, 2, 2])
        report.check("worker step without exact host lengths: draft and verify planned from the reserved bounds", ok,
                     None if ok else {"draft": seen["draft"].seq_lens_cpu.tolist(), "verify": verify_host_lens})
        # Scheduled verification: the planner's width W verifies W - 1 drafts; W = 1 drafts nothing at all.
        worker._sampler, worker._simulation = None, None

        class Planner:  # WidthPlanner's interface, with a fixed plan
            def __init__(self, width, lengths=None):
                self.fixed, self.lengths, self.observed, self.ragged = width, lengths, [], lengths is not None

            def plan(self, bs, rids=None):
                return self.fixed, self.lengths if rids is not None else None

            def observe(self, confidence_logits, accepted, verified, rids=None):
                self.observed.append((tuple(confidence_logits.shape), accepted.tolist(), verified, rids))

        for width in (3, 1):
            worker._planner = planner = Planner(width)
            seen.pop("draft", None)
            result = worker._decode(batch(bonus, prefix, [True, True, True]), None)
            want = [min(expected(b)[0], width - 1) for b in bonus]
            out = result.next_token_ids.view(3, gamma + 1)
            rows = [[int(x) for x in _chain(f, b, a + 1)] for b, a in zip(bonus, want)]  # a drafts, then f's token
            ok = (result.accept_lens.tolist() == [a + 1 for a in want]
                  and all(out[i, : a + 1].tolist() == rows[i] for i, a in enumerate(want))
                  and seen["verify_ids"].shape == (3 * width,) and seen["verify_ids"].view(3, width)[:, 0].tolist() == bonus
                  and ("draft" in seen) == (width > 1)
                  and committed["positions"].view(3, width).tolist() == [[p + k for k in range(width)] for p in prefix]
                  and committed["commit_lens"].tolist() == result.accept_lens.tolist()
                  and planner.observed == ([((3, gamma), want, width - 1, None)] if width > 1 else []))
            report.check(f"worker step (scheduled width {width}): {width - 1} drafts verified"
                         + (", no draft pass" if width == 1 else ", planner observes the step"), ok,
                         None if ok else {"accept_lens": result.accept_lens.tolist(), "want": want, "out": out.tolist(),
                                          "observed": planner.observed})
        # Per-request lengths: e.g. 2, 5 and 2 tokens (1, 4 and 1 drafts) in the 9 rows of a width-3 verify.
        for lengths, name, greedy in (([2, 5, 2], "greedy", [True] * 3), ([2, 5, 2], "mixed", [True, False, False]),
                                      ([1, 1, 4], "greedy", [True] * 3), ([5, 3, 4], "greedy", [True] * 3)):
            width, longest = sum(lengths) // 3, max(lengths)
            starts = [sum(lengths[:i]) for i in range(3)]
            worker._planner = planner = Planner(width, lengths)
            result = worker._decode(batch(bonus, prefix, greedy), None)
            want = [min(expected(b)[0], n - 1) for b, n in zip(bonus, lengths)]
            out = result.next_token_ids.view(3, gamma + 1)
            rows = [[int(x) for x in _chain(f, b, a + 1)] for b, a in zip(bonus, want)]
            ids = seen["verify_ids"]
            ok = (result.accept_lens.tolist() == [a + 1 for a in want]
                  and all(out[i, : a + 1].tolist() == rows[i] for i, a in enumerate(want))
                  and ids.shape == (3 * width,) and ids[starts].tolist() == bonus
                  and committed["positions"].view(3, longest).tolist() == [[p + k for k in range(longest)]
                                                                           for p in prefix]
                  and committed["commit_lens"].tolist() == result.accept_lens.tolist()
                  and planner.observed == [((3, gamma), want, [n - 1 for n in lengths], ["r0", "r1", "r2"])])
            report.check(f"worker step (per-request lengths {lengths}, {name}): each request verifies its own drafts "
                         f"in one width-{width} verify", ok,
                         None if ok else {"accept_lens": result.accept_lens.tolist(), "want": want, "out": out.tolist(),
                                          "ids": ids.tolist(), "observed": planner.observed})
        worker._planner = None


def _chain(f: torch.Tensor, start: int, n: int) -> list[int]:
    """``f(start), f(f(start)), ...`` (``n`` tokens)."""
    out, t = [], start
    for _ in range(n):
        t = int(f[t])
        out.append(t)
    return out


def _capture(fn, *static_inputs):
    """Capture ``fn(*static_inputs)`` in a CUDA graph after a warm-up on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(*static_inputs)
    return graph, outputs


def _refill(static_inputs, new_inputs) -> None:
    for dst, src in zip(static_inputs, new_inputs):
        dst.copy_(src)


def check_graph_safety(report: Report, kind: str) -> None:
    device, vocab, d, r, bs, gamma = "cuda", 4096, 256, 32, 8, 7
    config = small_config(kind, hidden_size=d, vocab_size=vocab, mask_token_id=vocab - 1, markov_rank=r)
    markov, confidence = build_markov_head(config), build_confidence_head(config)
    gen = torch.Generator().manual_seed(5)
    for module in (markov, confidence):
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        module.to(device=device, dtype=torch.bfloat16)

    def draft_inputs(seed: int):
        g = torch.Generator(device=device).manual_seed(seed)
        return (torch.randn(bs, gamma, vocab, device=device, generator=g) * 3,
                torch.randn(bs, gamma, d, device=device, generator=g).to(torch.bfloat16),
                torch.randint(0, vocab, (bs,), device=device, generator=g),
                torch.rand(bs, device=device, generator=g) + 0.5,
                torch.rand(bs, device=device, generator=g) < 0.5,
                torch.rand(bs, gamma, device=device, generator=g))

    def draft(base, hidden, anchor, inv_t, greedy, u):
        block = accept.sample_draft_block(base, hidden, anchor, markov, confidence, inv_t, greedy, u)
        return block.tokens, block.probs, block.confidence_logits

    static = draft_inputs(0)
    try:
        torch.cuda.set_sync_debug_mode("error")
        draft(*static)
        sampling = accept.TargetSampling(
            temperature=torch.rand(bs, device=device) + 0.5, top_k=torch.randint(1, 50, (bs,), device=device),
            top_p=torch.rand(bs, device=device) * 0.5 + 0.5, max_top_k=50, apply_top_k=True, apply_top_p=True,
            min_p=torch.rand(bs, device=device) * 0.2, apply_min_p=True)
        _accept(torch.randint(0, vocab, (bs, gamma), device=device), torch.randn(bs, gamma + 1, vocab, device=device),
                torch.softmax(torch.randn(bs, gamma, vocab, device=device), -1), torch.rand(bs, device=device) < 0.5,
                torch.rand(bs, 2 * gamma + 1, device=device), torch.randint(0, 1000, (bs,), device=device), sampling)
        report.check(f"sync-free ({kind}): draft sampler and acceptance under set_sync_debug_mode('error')", True)
    except RuntimeError as e:
        report.check(f"sync-free ({kind}): draft sampler and acceptance under set_sync_debug_mode('error')", False, str(e)[:300])
    finally:
        torch.cuda.set_sync_debug_mode("default")

    graph, outputs = _capture(draft, *static)
    fresh = draft_inputs(1)
    _refill(static, fresh)
    graph.replay()
    eager = draft(*fresh)
    same = torch.equal(outputs[0], eager[0]) and torch.allclose(outputs[1], eager[1]) and torch.allclose(outputs[2], eager[2])
    report.check(f"graph ({kind}): draft sampler replayed == eager on new inputs", same)

    def draft_greedy(base, hidden, anchor, inv_t, greedy, u):  # the all-greedy graph variant
        block = accept.sample_draft_block(base, hidden, anchor, markov, confidence, inv_t, greedy, u, all_greedy=True)
        return block.tokens, block.confidence_logits

    static = draft_inputs(4)
    graph, outputs = _capture(draft_greedy, *static)
    fresh = draft_inputs(5)
    _refill(static, fresh)
    graph.replay()
    all_greedy_rows = draft(*fresh[:4], torch.ones(bs, dtype=torch.bool, device=device), fresh[5])
    same = torch.equal(outputs[0], all_greedy_rows[0]) and torch.allclose(outputs[1], all_greedy_rows[2])
    report.check(f"graph ({kind}): all-greedy draft variant replayed == the general sampler on greedy rows", same)

    def accept_inputs(seed: int):
        g = torch.Generator(device=device).manual_seed(seed)
        logits = torch.randn(bs, gamma + 1, vocab, device=device, generator=g) * 2
        drafts = logits[:, :gamma].argmax(-1)
        drafts[:, 3:] = torch.randint(0, vocab, (bs, gamma - 3), device=device, generator=g)
        return (drafts, logits, torch.softmax(torch.randn(bs, gamma, vocab, device=device, generator=g), -1),
                torch.rand(bs, device=device, generator=g) < 0.5, torch.rand(bs, 2 * gamma + 1, device=device, generator=g),
                torch.randint(0, 1000, (bs,), device=device, generator=g))

    sampling = accept.TargetSampling(
        temperature=torch.full((bs,), 0.8, device=device), top_k=torch.full((bs,), 20, device=device),
        top_p=torch.full((bs,), 0.9, device=device), max_top_k=20, apply_top_k=True, apply_top_p=True)
    static = accept_inputs(2)
    graph, outputs = _capture(lambda *a: _accept(*a, sampling), *static)
    fresh = accept_inputs(3)
    _refill(static, fresh)
    graph.replay()
    eager = _accept(*fresh, sampling)
    same = all(torch.equal(a, b) for a, b in zip(outputs, eager))
    report.check(f"graph ({kind}): acceptance + commit layout replayed == eager on new inputs", same)


def check_sync_free_verify_plan(report: Report) -> None:
    """Patch 0010's sync-free verify plan on FlashInfer (fa2, CUDA-graph buffers, Qwen3-8B's heads): the
    plan (``fast_prefill_plan``) knows only upper bounds of the KV lengths, as DSPARK's worker plans them;
    the true lengths reach the kernel on the device. Compared row by row with a float32 reference attention
    (row j of a request attends to its first ``L - W + j + 1`` slots): exact without a KV split (what the
    patch plans) for 1 and 8 rows per request, and for per-request lengths 1..8 replayed in a plan captured
    with 4 rows per request (``SGLANG_DSPARK_PER_REQUEST_LENGTHS``: the host plan gets the lengths too, so its
    output offsets match); with the split, exact for one row per request. 8 rows with the split are recorded,
    not checked: wrong in 2 of 24 trials in one run (a misplaced layout when a bound crosses a chunk boundary
    that the true length does not), right in all 24 of another. The product keeps one-row
    verifies unsplit too: a split's chunk size depends on the whole batch, so a request's logits would too
    (README, "KV split of the sync-free plan")."""
    from flashinfer import BatchPrefillWithPagedKVCacheWrapper
    from sglang.srt.layers.attention.flashinfer_backend import fast_prefill_plan

    device, heads, kv_heads, head_dim, bs, trials = "cuda", 32, 8, 128, 16, 24
    gen = torch.Generator(device=device).manual_seed(11)
    pool = bs * 4200
    k_cache = torch.randn(pool, kv_heads, head_dim, device=device, generator=gen).to(torch.bfloat16)
    v_cache = torch.randn(pool, kv_heads, head_dim, device=device, generator=gen).to(torch.bfloat16)
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    scale = head_dim ** -0.5

    def reference(q, lens, kv_indptr, kv_indices, qo_indptr):
        out = torch.empty(q.shape, dtype=torch.float32, device=device)
        for i, n in enumerate(lens.tolist()):
            slots = kv_indices[kv_indptr[i]:kv_indptr[i + 1]]
            k = k_cache[slots].float().repeat_interleave(heads // kv_heads, dim=1)
            v = v_cache[slots].float().repeat_interleave(heads // kv_heads, dim=1)
            start, end = int(qo_indptr[i]), int(qo_indptr[i + 1])
            width = end - start
            logits = torch.einsum("whd,nhd->hwn", q[start:end].float(), k) * scale
            last = n - width + torch.arange(width, device=device)  # the last slot each row attends to
            allowed = torch.arange(n, device=device)[None, :] <= last[:, None]
            probs = logits.masked_fill(~allowed[None], float("-inf")).softmax(-1)
            out[start:end] = torch.einsum("hwn,nhd->whd", probs, v)
        return out

    def ragged_lengths(width: int, generator: torch.Generator) -> torch.Tensor:
        """``bs`` lengths in 1..8 summing to ``bs * width`` (per-request verify lengths in a width-W graph)."""
        lengths = torch.full((bs,), width)
        for _ in range(4 * bs):  # move a row from one request to another where both stay in 1..8
            a, b = torch.randint(0, bs, (2,), generator=generator).tolist()
            if a != b and lengths[a] > 1 and lengths[b] < 8:
                lengths[a] -= 1
                lengths[b] += 1
        return lengths

    def worst_error(width: int, split: bool, ragged: bool = False) -> list[float]:
        """Largest relative row error per trial, W = ``width`` rows per request (``ragged``: the graph captured
        with W rows each, replayed with per-request lengths of the same total)."""
        buffers = [torch.zeros(n, dtype=torch.int32, device=device) for n in (bs + 1, bs + 1, pool)]
        buffers.append(torch.ones(bs, dtype=torch.int32, device=device))  # last page lengths (page size 1)
        wrapper = BatchPrefillWithPagedKVCacheWrapper(
            workspace, "NHD", use_cuda_graph=True, backend="fa2", qo_indptr_buf=buffers[0],
            paged_kv_indptr_buf=buffers[1], paged_kv_indices_buf=buffers[2], paged_kv_last_page_len_buf=buffers[3])
        uniform = torch.arange(0, (bs + 1) * width, width, dtype=torch.int32)
        errors, lengths = [], torch.Generator().manual_seed(12)
        for trial in range(trials):
            qo_indptr = uniform
            if ragged and trial > 0:
                qo_indptr = torch.zeros(bs + 1, dtype=torch.int32)
                qo_indptr[1:] = ragged_lengths(width, lengths).cumsum(0)
            lens = torch.randint(9 if ragged else width + 1, 4000, (bs,), generator=lengths)  # >= a request's rows
            bounds = lens + torch.randint(0, 17, (bs,), generator=lengths)  # the worker's: committed + two blocks
            kv_indptr = torch.zeros(bs + 1, dtype=torch.int32)
            kv_indptr[1:] = lens.cumsum(0)
            bound_indptr = torch.zeros(bs + 1, dtype=torch.int32)
            bound_indptr[1:] = bounds.cumsum(0)
            kv_indices = torch.randperm(pool, device=device)[: int(kv_indptr[-1])].to(torch.int32)
            args = (qo_indptr.to(device), kv_indptr.to(device), kv_indices, buffers[3], heads, kv_heads, head_dim, 1)
            kwargs = dict(q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, disable_split_kv=not split)
            if trial == 0:  # the real plan once, as at capture (from the bounds: the host knows nothing else)
                wrapper.plan(qo_indptr.to(device), bound_indptr.to(device), kv_indices, buffers[3], heads, kv_heads,
                             head_dim, 1, **kwargs)
            max_q_len = int((qo_indptr[1:] - qo_indptr[:-1]).max())
            fast_prefill_plan(wrapper, *args, **kwargs, qo_indptr_host=qo_indptr, kv_indptr_host=bound_indptr,
                              kv_lens_host=bounds.to(torch.int32), max_q_len=max_q_len, max_kv_len=int(bounds.max()))
            q = torch.randn(bs * width, heads, head_dim, device=device, generator=gen).to(torch.bfloat16)
            out = wrapper.forward(q, (k_cache, v_cache), causal=True, sm_scale=scale).float()
            ref = reference(q, lens, kv_indptr, kv_indices, qo_indptr)
            rel = (out - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
            errors.append(round(float(rel.max()), 4))
        return errors

    tolerance = 0.02
    for width, split in ((1, True), (8, False), (1, False)):
        errors = worst_error(width, split)
        report.check(f"sync-free verify plan: {width} row(s) per request, KV split {'on' if split else 'off'}, "
                     f"planned from upper bounds == reference (relative error < {tolerance})",
                     max(errors) < tolerance, {"worst_per_trial": errors})
    errors = worst_error(4, False, ragged=True)
    report.check("sync-free verify plan: per-request lengths 1..8 in a graph captured with 4 rows per request, "
                 f"KV split off, planned from upper bounds == reference (relative error < {tolerance})",
                 max(errors) < tolerance, {"worst_per_trial": errors})
    errors = worst_error(8, True)
    wrong = sum(e >= tolerance for e in errors)
    report.data["results"]["sync_free_plan_8_rows_split"] = {"wrong_trials": wrong, "worst_per_trial": errors}
    info("sync-free verify plan: 8 rows per request with the KV split planned from upper bounds (not what the "
         "product plans), trials over tolerance", f"{wrong} of {len(errors)}")


def check_planner_observe(report: Report) -> None:
    """WidthPlanner.observe on device tensors: no synchronisation, host copies into pinned memory, and once
    they have landed the same calibration and gains as from the same steps on the host."""
    from sglang_dspark.cost_profile import builtin_profile
    from sglang_dspark.verify_width import WidthPlanner

    gamma, device = 7, "cuda"
    cost = builtin_profile(8e9, 1e9)
    on_gpu, on_host = WidthPlanner(gamma, cost), WidthPlanner(gamma, cost)
    generator = torch.Generator().manual_seed(7)
    steps = [(torch.randn((bs, gamma), generator=generator), torch.randint(0, v + 1, (bs,), generator=generator), v)
             for bs, v in ((1, 7), (8, 3), (48, 7), (3, 1))]
    on_device = [(logits.to(device), accepted.to(device), verified) for logits, accepted, verified in steps]
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        for logits, accepted, verified in on_device:
            on_gpu.observe(logits, accepted, verified)
        pinned = all(t.is_pinned() for _, c, a, *_ in on_gpu._pending for t in (c, a))
        no_sync = True
    except RuntimeError as e:
        pinned, no_sync = False, str(e)[:300]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    on_gpu.width(8)  # folds in the landed copies
    for logits, accepted, verified in steps:
        on_host.observe(logits, accepted, verified)
    same = on_gpu.gains == on_host.gains and on_gpu.calibration() == on_host.calibration()
    report.check("scheduled verification: the planner observes device steps without a sync (pinned host copies) "
                 "and then computes what it computes from the same steps on the host", no_sync is True and pinned
                 and same, {"no_sync": no_sync, "pinned": pinned, "gains": [on_gpu.gains, on_host.gains]})


def _accept(drafts, logits, q, greedy, u, prefix, sampling):
    gamma = drafts.shape[1]
    accepted, bonus = accept.accept_drafts(drafts, logits, q, greedy, sampling, u[:, :gamma], u[:, gamma])
    layout = accept.commit_layout(drafts, accepted, bonus, prefix)
    return accepted, bonus, layout.commit_lens, layout.out_tokens, layout.new_seq_lens


def main() -> int:
    report = Report("gpu-unit")
    for kind, fmt, with_features in (("vanilla", "deepspec", True), ("gated", "deepspec", True),
                                     ("rnn", "deepspec", False), ("vanilla", "torchspec", True)):
        report.run(f"model {kind}/{fmt}", lambda: check_model(report, kind, fmt, with_features))
    report.run("worker step", lambda: check_worker_step(report))
    if torch.cuda.is_available():
        for kind in ("vanilla", "rnn"):
            report.run(f"graph safety {kind}", lambda: check_graph_safety(report, kind))
        report.run("sync-free verify plan", lambda: check_sync_free_verify_plan(report))
        report.run("planner observe", lambda: check_planner_observe(report))
    report.write()
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""``sglang_dspark.verify_width.VerifyGraphs``: one target attention backend (and, when SGLang captured its
verify graphs, one ``DecodeCudaGraphRunner``) per verify width, swapped in for one verify forward."""

from __future__ import annotations

import types

import pytest

pytestmark = pytest.mark.sglang
pytest.importorskip("sglang.srt")  # "sglang" alone would find this test dir


DEFAULT_BACKEND = types.SimpleNamespace(needs_cpu_seq_lens=True)


def _model_runner(default_runner, deterministic: bool, default_backend=DEFAULT_BACKEND):
    made = []

    def get_backend():
        backend = types.SimpleNamespace(verify_decode_rows=8 if deterministic else 0)
        made.append(backend)
        return backend

    runner = types.SimpleNamespace(
        attn_backend=default_backend, decode_cuda_graph_runner=default_runner, _get_attention_backend=get_backend,
        server_args=types.SimpleNamespace(speculative_num_draft_tokens=8),
    )
    return runner, made


@pytest.mark.parametrize("deterministic", [False, True])
def test_widths_get_backends_and_graph_runners(dspark_plugin, deterministic):
    from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

    from sglang_dspark.verify_width import VerifyGraphs

    class Runner(DecodeCudaGraphRunner):  # records its construction instead of capturing
        def __init__(self, model_runner, *, attn_backend=None, speculative_num_draft_tokens=None):
            self.model_runner, self.attn_backend, self.width = model_runner, attn_backend, speculative_num_draft_tokens

    default = object.__new__(Runner)
    model_runner, made = _model_runner(default, deterministic)
    graphs = VerifyGraphs(model_runner, range(1, 8))
    assert sorted(graphs.runners) == list(range(1, 8)) and sorted(graphs.all_runners()) == list(range(1, 9))
    for width, runner in graphs.runners.items():
        assert runner.width == width and runner.attn_backend is graphs.backends[width]
        assert runner.attn_backend.verify_decode_rows == (width if deterministic else 0)
    assert len({id(b) for b in made}) == 7
    with graphs.using(3):
        assert model_runner.decode_cuda_graph_runner is graphs.runners[3]
        assert model_runner.attn_backend is graphs.backends[3]
    assert (model_runner.attn_backend, model_runner.decode_cuda_graph_runner) == (DEFAULT_BACKEND, default)
    with pytest.raises(RuntimeError), graphs.using(2):
        raise RuntimeError("a failed forward")
    assert (model_runner.attn_backend, model_runner.decode_cuda_graph_runner) == (DEFAULT_BACKEND, default)
    with graphs.using(8):  # SGLang's own width: nothing swapped
        assert (model_runner.attn_backend, model_runner.decode_cuda_graph_runner) == (DEFAULT_BACKEND, default)


def test_without_captured_graphs_widths_run_eagerly_on_their_backends(dspark_plugin):
    from sglang_dspark.verify_width import VerifyGraphs

    eager = types.SimpleNamespace(can_run_graph=lambda forward_batch: False)
    model_runner, made = _model_runner(eager, deterministic=True)
    graphs = VerifyGraphs(model_runner, range(1, 8))
    assert graphs.runners == {} and graphs.all_runners() == {} and len(made) == 7
    with graphs.using(5):
        assert model_runner.decode_cuda_graph_runner is eager
        assert model_runner.attn_backend is graphs.backends[5] and graphs.backends[5].verify_decode_rows == 5
    assert model_runner.attn_backend is DEFAULT_BACKEND


@pytest.mark.parametrize("needs_cpu", [True, False])
def test_widths_plan_like_the_default_backend(dspark_plugin, needs_cpu):
    """With the sync-free plan the default backend plans from upper bounds (no host lengths, so
    no KV split); every width's backend must do the same, or a narrower verify would split the KV by bounds."""
    from sglang_dspark.verify_width import VerifyGraphs

    eager = types.SimpleNamespace(can_run_graph=lambda forward_batch: False)
    default_backend = types.SimpleNamespace(needs_cpu_seq_lens=needs_cpu)
    model_runner, made = _model_runner(eager, deterministic=False, default_backend=default_backend)
    VerifyGraphs(model_runner, range(1, 8))
    assert [b.needs_cpu_seq_lens for b in made] == [needs_cpu] * 7

"""Fixtures for the tests that import SGLang 0.5.15 (marker ``sglang``; environment: setup_env.sh).

Draft and target directories hold only ``config.json``: argument resolution never reads weights.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

import pytest
from sglang_fixtures import draft_config, target_config, write_model_dir


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> Callable[..., tuple[str, str]]:
    """Factory: ``model_dirs(draft=..., target=...)`` -> (target dir, draft dir) with the given config dicts."""
    counter = iter(range(10**6))

    def make(draft: dict[str, Any] | None = None, target: dict[str, Any] | None = None) -> tuple[str, str]:
        root = tmp_path_factory.mktemp(f"models{next(counter)}")
        return (
            write_model_dir(root / "target", target or target_config()),
            write_model_dir(root / "draft", draft or draft_config()),
        )

    return make


@pytest.fixture(scope="session")
def dspark_plugin():
    """SGLang's plugin loader has run (discovering the ``dspark`` entry point)."""
    pytest.importorskip("sglang.srt")  # "sglang" alone would find this test dir
    from sglang.srt.plugins import load_plugins
    from sglang.srt.speculative.spec_registry import get_spec

    load_plugins()
    spec = get_spec("DSPARK")
    assert spec is not None, "load_plugins() did not register DSPARK: is sglang-dspark pip-installed here?"
    return spec


@pytest.fixture(scope="module")
def parse(dspark_plugin, model_dirs):
    """``parse(*flags, draft=cfg, target=cfg)`` -> resolved ``ServerArgs`` from a real CLI parse."""
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    default_dirs = model_dirs()

    def _parse(*flags: str, draft=None, target=None, algorithm: str = "DSPARK"):
        target_dir, draft_dir = model_dirs(draft, target) if (draft or target) else default_dirs
        argv = [
            "--model-path", target_dir, "--device", "cuda", "--skip-tokenizer-init",
            "--speculative-algorithm", algorithm, "--speculative-draft-model-path", draft_dir, *flags,
        ]
        return ServerArgs.from_cli_args(parser.parse_args(argv))

    return _parse

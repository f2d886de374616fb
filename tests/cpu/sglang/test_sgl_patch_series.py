"""The patch series applies to a pristine SGLang 0.5.15, is idempotent, and fails loudly on a conflict."""

from __future__ import annotations

import glob
import os
import py_compile
import sys
import zipfile
from pathlib import Path

import pytest

from sglang_dspark import patching

pytestmark = pytest.mark.sglang
pytest.importorskip("sglang.srt")  # "sglang" alone would find this test dir


def _pristine_wheel() -> Path:
    explicit = os.environ.get("SGLANG_DSPARK_PRISTINE_WHEEL")
    found = [explicit] if explicit else glob.glob(
        os.path.join(sys.prefix, "share", "sglang-dspark", f"sglang-{patching.SGLANG_VERSION}-*.whl")
    )
    if not found or not Path(found[0]).is_file():
        pytest.fail(
            f"no pristine sglang {patching.SGLANG_VERSION} wheel under {sys.prefix}/share/sglang-dspark "
            "(tests/cpu/sglang/setup_env.sh keeps one there) and SGLANG_DSPARK_PRISTINE_WHEEL is unset"
        )
    return Path(found[0])


def _patched_paths() -> list[str]:
    return sorted({fp.path for p in patching.read_series(patching.DEFAULT_PATCH_DIR) for fp in p.files})


@pytest.fixture
def pristine_site(tmp_path) -> Path:
    """A site dir with the pristine copies of every file the series touches (+ the version file)."""
    with zipfile.ZipFile(_pristine_wheel()) as wheel:
        for name in _patched_paths() + ["sglang/_version.py"]:
            wheel.extract(name, tmp_path)
    return tmp_path


def _snapshot(site: Path) -> dict[str, str]:
    return {p: (site / p).read_text() for p in _patched_paths()}


def test_series_applies_cleanly_and_is_idempotent(pristine_site):
    before = _snapshot(pristine_site)
    states, _ = patching.plan(pristine_site)
    assert len(states) >= 9 and set(states.values()) == {"pending"}

    assert set(patching.apply(pristine_site).values()) == {"pending"}
    once = _snapshot(pristine_site)
    assert all(once[p] != before[p] for p in once), "every touched file changes"
    for path in once:
        py_compile.compile(str(pristine_site / path), doraise=True)

    assert set(patching.apply(pristine_site).values()) == {"applied"}
    assert _snapshot(pristine_site) == once
    assert set(patching.plan(pristine_site)[0].values()) == {"applied"}


def test_installed_sglang_is_the_patched_one(pristine_site):
    """The SGLang these tests import is patched, and byte-identical to the series applied to the wheel."""
    import sglang

    site = Path(sglang.__file__).resolve().parent.parent
    assert set(patching.plan(site)[0].values()) == {"applied"}
    patching.apply(pristine_site)
    assert _snapshot(site) == _snapshot(pristine_site)


def test_dflash_lines_keep_their_meaning(pristine_site):
    """Every removed line mentioning DFLASH is replaced, not dropped: DFLASH stays in the family predicate."""
    patching.apply(pristine_site)
    spec_info = (pristine_site / "sglang/srt/speculative/spec_info.py").read_text()
    assert "return self.is_dflash() or self.is_dspark()" in spec_info
    assert "return self == SpeculativeAlgorithm.DFLASH" in spec_info


def test_conflict_names_patch_file_and_hunk_and_writes_nothing(pristine_site):
    target = pristine_site / "sglang/srt/managers/scheduler.py"
    target.write_text(target.read_text().replace("is_dflash=self.spec_algorithm.is_dflash(),", "is_dflash=False,"))
    before = _snapshot(pristine_site)
    with pytest.raises(patching.PatchError) as info:
        patching.apply(pristine_site)
    message = str(info.value)
    assert "0009-scheduler-family-request-validation.patch" in message
    assert "sglang/srt/managers/scheduler.py" in message and "hunk 1/" in message
    assert _snapshot(pristine_site) == before


def test_patch_applied_to_some_files_only_is_an_error(pristine_site):
    with zipfile.ZipFile(_pristine_wheel()) as wheel:
        pristine_utils = wheel.read("sglang/srt/speculative/dflash_utils.py").decode()
    patching.apply(pristine_site)
    (pristine_site / "sglang/srt/speculative/dflash_utils.py").write_text(pristine_utils)
    with pytest.raises(patching.PatchError, match="applied to some of its files only"):
        patching.plan(pristine_site)


def test_wrong_version_is_refused(pristine_site):
    version_file = pristine_site / "sglang/_version.py"
    version_file.write_text(version_file.read_text().replace("'0.5.15'", "'0.5.17'"))
    with pytest.raises(patching.PatchError, match="is for SGLang 0.5.15, found '0.5.17'"):
        patching.plan(pristine_site)


def test_cli_exit_codes(pristine_site, capsys):
    assert patching.main(["check", "--site", str(pristine_site)]) == 1
    assert patching.main(["apply", "--site", str(pristine_site)]) == 0
    assert "applied now" in capsys.readouterr().out
    assert patching.main(["check", "--site", str(pristine_site)]) == 0
    assert patching.main(["check", "--site", str(pristine_site / "nowhere")]) == 2
    assert "does not contain an sglang package" in capsys.readouterr().err


def test_partly_patched_file_is_an_error(pristine_site):
    patching.apply(pristine_site)
    runner = pristine_site / "sglang/srt/model_executor/runner/decode_cuda_graph_runner.py"
    text = runner.read_text()
    runner.write_text(text.replace(
        "                # The captured width (DSPARK: the draft runs one fewer than verify).\n"
        "                draft_token_num=self.num_tokens_per_bs,",
        "                draft_token_num=self.model_runner.server_args.speculative_num_draft_tokens,",
    ))
    assert runner.read_text() != text
    expected = r"decode_cuda_graph_runner.py is partly patched \(hunks \[1, 2, 3, 4, 5, 6, 7\] of 8"
    with pytest.raises(patching.PatchError, match=expected):
        patching.plan(pristine_site)


def test_entry_point_can_be_written_into_a_bare_site(pristine_site):
    import importlib.metadata

    assert patching.main(["apply", "--site", str(pristine_site), "--entry-point"]) == 0
    assert patching.main(["apply", "--site", str(pristine_site), "--entry-point"]) == 0
    (dist,) = importlib.metadata.distributions(path=[str(pristine_site)])
    (ep,) = dist.entry_points.select(group="sglang.srt.plugins")
    assert (dist.metadata["Name"], ep.name, ep.value) == ("sglang-dspark", "dspark", "sglang_dspark.plugin:load")

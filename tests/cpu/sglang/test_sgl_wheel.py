"""python/build_wheel.py: the patched ``sglang-0.5.15+dspark.N`` wheel is well formed, carries the series,
installs with pip, and the installed copy resolves ``--speculative-algorithm DSPARK``."""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sglang_dspark import patching
from test_sgl_patch_series import _pristine_wheel

pytestmark = pytest.mark.sglang
pytest.importorskip("sglang.srt")  # "sglang" alone would find this test dir

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "python" / "build_wheel.py"
N_PATCHES = len(patching.read_series(patching.DEFAULT_PATCH_DIR))
VERSION = f"{patching.SGLANG_VERSION}+dspark.{N_PATCHES}"
INFO = f"sglang-{VERSION}.dist-info"
OLD_INFO = f"sglang-{patching.SGLANG_VERSION}.dist-info"


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_wheel", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def builder():
    return _load_builder()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The wheel built by the command line from the cached official wheel, with the default N."""
    out = tmp_path_factory.mktemp("wheel")
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--wheel", str(_pristine_wheel()), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"},
    )
    assert run.returncode == 0, run.stderr
    wheel = Path(run.stdout.strip().splitlines()[-1])
    assert wheel.parent == out and wheel.is_file()
    return wheel


@pytest.fixture(scope="module")
def installed(built, tmp_path_factory) -> Path:
    """``pip install --no-deps --target`` of the built wheel into a fresh directory."""
    target = tmp_path_factory.mktemp("target")
    run = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--target", str(target),
         str(built)],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return target


def test_name_version_and_kept_metadata(built):
    pristine = _pristine_wheel()
    tags = pristine.name[len(f"sglang-{patching.SGLANG_VERSION}-") : -len(".whl")]
    assert built.name == f"sglang-{VERSION}-{tags}.whl"
    with zipfile.ZipFile(built) as new, zipfile.ZipFile(pristine) as old:
        names = new.namelist()
        assert not any(n.startswith(OLD_INFO + "/") for n in names)
        metadata = new.read(f"{INFO}/METADATA").decode()
        assert f"\nVersion: {VERSION}\n" in metadata and "\nName: sglang\n" in metadata
        old_metadata = old.read(f"{OLD_INFO}/METADATA").decode()
        assert metadata == old_metadata.replace(f"\nVersion: {patching.SGLANG_VERSION}\n", f"\nVersion: {VERSION}\n")
        for kept in ("WHEEL", "entry_points.txt", "top_level.txt"):
            assert new.read(f"{INFO}/{kept}") == old.read(f"{OLD_INFO}/{kept}")
        listed = new.read(f"{INFO}/dspark-patches.txt").decode().splitlines()[1:]
        series = patching.read_series(patching.DEFAULT_PATCH_DIR)
        assert [line.split()[1] for line in listed] == [p.name for p in series]
        digest = hashlib.sha256((patching.DEFAULT_PATCH_DIR / series[0].name).read_bytes()).hexdigest()
        assert listed[0].split()[0] == f"sha256:{digest}"


def test_record_covers_every_file_with_matching_hashes(built):
    with zipfile.ZipFile(built) as zf:
        infos = zf.infolist()
        rows = list(csv.reader(io.StringIO(zf.read(f"{INFO}/RECORD").decode())))
        assert rows[-1] == [f"{INFO}/RECORD", "", ""]
        assert [i.filename for i in infos] == [r[0] for r in rows], "RECORD lists the entries in archive order"
        for name, digest, size in rows[:-1]:
            data = zf.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert (digest, int(size)) == (f"sha256={expected}", len(data)), name
    assert not any(i.is_dir() for i in infos)
    body = [i.filename for i in infos if not i.filename.startswith(INFO + "/")]
    meta = [i.filename for i in infos if i.filename.startswith(INFO + "/")]
    assert [i.filename for i in infos] == body + meta, "the .dist-info files come last"
    assert body == sorted(body) and meta[:-1] == sorted(meta[:-1])
    assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert {(i.external_attr >> 16) for i in infos} <= {0o100644, 0o100755}


def test_only_the_patched_files_differ_and_they_carry_the_series(built, tmp_path):
    touched = {fp.path for p in patching.read_series(patching.DEFAULT_PATCH_DIR) for fp in p.files}
    with zipfile.ZipFile(built) as new, zipfile.ZipFile(_pristine_wheel()) as old:
        old_body = {i.filename for i in old.infolist() if not i.is_dir() and not i.filename.startswith(OLD_INFO)}
        new_body = {n for n in new.namelist() if not n.startswith(INFO)}
        assert new_body == old_body
        changed = {n for n in sorted(new_body) if new.read(n) != old.read(n)}
        assert changed == touched
        new.extractall(tmp_path / "built", members=sorted(touched) + ["sglang/_version.py"])
        old.extractall(tmp_path / "pristine", members=sorted(touched) + ["sglang/_version.py"])
    assert set(patching.plan(tmp_path / "built")[0].values()) == {"applied"}
    patching.apply(tmp_path / "pristine")
    for path in touched:
        assert (tmp_path / "built" / path).read_bytes() == (tmp_path / "pristine" / path).read_bytes(), path


def test_build_is_reproducible_and_takes_a_build_number(built, builder, tmp_path, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    again = builder.build_wheel(_pristine_wheel(), tmp_path / "again")
    assert again.name == built.name and again.read_bytes() == built.read_bytes()
    third = builder.build_wheel(_pristine_wheel(), tmp_path / "n3", build=3)
    assert third.name.startswith(f"sglang-{patching.SGLANG_VERSION}+dspark.3-")
    with zipfile.ZipFile(third) as zf:
        assert "\nVersion: 0.5.15+dspark.3\n" in zf.read("sglang-0.5.15+dspark.3.dist-info/METADATA").decode()
    with pytest.raises(builder.WheelBuildError, match="positive integer"):
        builder.local_version(0)


def test_only_the_official_wheel_is_accepted(built, builder, tmp_path):
    with pytest.raises(builder.WheelBuildError, match="expected the official wheel sglang-0.5.15-<tags>.whl"):
        builder.build_wheel(built, tmp_path)
    disguised = tmp_path / _pristine_wheel().name
    shutil.copy(built, disguised)
    with pytest.raises(builder.WheelBuildError, match=f"no {OLD_INFO}/METADATA"):
        builder.build_wheel(disguised, tmp_path / "out")


def test_pip_installed_copy_is_patched(installed):
    assert (installed / INFO / "METADATA").is_file()
    run = subprocess.run(
        [sys.executable, "-m", "sglang_dspark.patching", "check", "--site", str(installed)],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert f"{N_PATCHES} patches checked" in run.stdout
    assert run.stdout.count("applied ") == N_PATCHES


_PARSE = """
import argparse, importlib.metadata, json, sys
import sglang
from sglang.srt.plugins import load_plugins
from sglang.srt.server_args import ServerArgs
load_plugins()
parser = argparse.ArgumentParser()
ServerArgs.add_cli_args(parser)
args = ServerArgs.from_cli_args(parser.parse_args(sys.argv[1:]))
print(json.dumps({
    "file": sglang.__file__, "version": importlib.metadata.version("sglang"),
    "algorithm": args.speculative_algorithm, "block_size": args.speculative_dspark_block_size,
    "draft_tokens": args.speculative_num_draft_tokens,
}))
"""


def test_installed_copy_parses_dspark_server_args(installed, model_dirs):
    target_dir, draft_dir = model_dirs()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(installed), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run(
        [sys.executable, "-c", _PARSE, "--model-path", target_dir, "--device", "cuda", "--skip-tokenizer-init",
         "--speculative-algorithm", "DSPARK", "--speculative-draft-model-path", draft_dir],
        capture_output=True, text=True, timeout=120, env=env, cwd=installed,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).resolve().is_relative_to(installed.resolve())
    assert result["version"] == VERSION
    assert (result["algorithm"], result["block_size"], result["draft_tokens"]) == ("DSPARK", 7, 8)

"""Build the patched SGLang wheel ``sglang-0.5.15+dspark.N`` from the pinned official wheel.

    python python/build_wheel.py [--wheel PATH | --download [--python-version 3.12] [--platform TAG]]
                                 [--out DIR] [--build N]

The official ``sglang==0.5.15`` wheel (given with ``--wheel``, or fetched with ``pip download --no-deps``
for this Python, or for ``--python-version``/``--platform``) is unpacked, the series in
``patches/sglang-0.5.15/`` is applied with ``sglang_dspark.patching.apply`` and the tree is packed again as
version ``0.5.15+dspark.N`` (a PEP 440 local version): the ``.dist-info`` directory, the ``Version:`` of
METADATA and the file name carry it, WHEEL and the wheel tags are kept, RECORD is written anew, and
``dspark-patches.txt`` in the ``.dist-info`` lists the sha256 of every patch of the series.
``sglang.__version__`` (``sglang/_version.py``) stays ``0.5.15``: the patch series checks it.

N (``--build``) defaults to the number of patches in the series: adding a patch gives a new version. Editing a
patch in place does not change N, so pass ``--build`` then (or tell the builds apart by
``dspark-patches.txt``).

The archive is reproducible: entries sorted by path (the ``.dist-info`` files last, RECORD the very last),
no directory entries, every timestamp ``SOURCE_DATE_EPOCH`` (default 1980-01-01 00:00:00 UTC), modes 0644
or 0755 (kept from the official wheel), deflate at zlib's default level.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout where sglang_dspark is not installed
    sys.path.insert(0, str(REPO))

from sglang_dspark import patching  # noqa: E402

logger = logging.getLogger("sglang_dspark")

DIST = "sglang"
PATCH_LIST = "dspark-patches.txt"
DEFAULT_OUT = REPO / "dist"
_EPOCH_1980 = 315532800  # 1980-01-01 00:00:00 UTC, the earliest time a zip entry can hold


class WheelBuildError(RuntimeError):
    """The source wheel is not the pinned official one, or the build cannot go on."""


def default_build_number(patch_dir: Path = patching.DEFAULT_PATCH_DIR) -> int:
    """The default N: the number of patches in ``patch_dir/series``."""
    return len(patching.read_series(patch_dir))


def local_version(build: int) -> str:
    """``0.5.15+dspark.<build>``."""
    if build < 1:
        raise WheelBuildError(f"the build number must be a positive integer, got {build}")
    return f"{patching.SGLANG_VERSION}+dspark.{build}"


def record_digest(data: bytes) -> str:
    """RECORD's hash field: ``sha256=`` + urlsafe base64 of the digest without ``=`` padding."""
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def download_official_wheel(dest: Path, python_version: str | None = None, platform: str | None = None) -> Path:
    """``pip download --no-deps sglang==0.5.15`` into ``dest`` (for this Python unless ``python_version``
    / ``platform`` name another interpreter, e.g. a container image's); returns the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{DIST}=={patching.SGLANG_VERSION}", "-d", str(dest)]
    if python_version:
        cmd += ["--python-version", python_version]
    if platform:
        cmd += ["--platform", platform]
    logger.info("running %s", " ".join(cmd))
    subprocess.run(cmd, check=True, stdout=sys.stderr)  # stdout is the built wheel's path only
    found = sorted(dest.glob(f"{DIST}-{patching.SGLANG_VERSION}-*.whl"))
    if len(found) != 1:
        raise WheelBuildError(f"pip download left {len(found)} {DIST} {patching.SGLANG_VERSION} wheels in {dest}")
    return found[0]


def _wheel_tags(source: Path) -> str:
    """The tag part of the official wheel's file name (``cp311-cp311-manylinux_2_34_x86_64``)."""
    prefix = f"{DIST}-{patching.SGLANG_VERSION}-"
    if not (source.name.startswith(prefix) and source.name.endswith(".whl")):
        raise WheelBuildError(
            f"{source}: expected the official wheel {prefix}<tags>.whl, found the file name {source.name!r}"
        )
    return source.name[len(prefix) : -len(".whl")]


def _set_metadata_version(text: str, version: str, path: str) -> str:
    """Replace the ``Version:`` header of METADATA (headers end at the first blank line)."""
    head, sep, body = text.partition("\n\n")
    head, n = re.subn(r"^Version: .*$", f"Version: {version}", head, count=1, flags=re.M)
    if n != 1:
        raise WheelBuildError(f"{path}: no 'Version:' header found")
    return head + sep + body


def _zip_time() -> tuple[int, int, int, int, int, int]:
    raw = os.environ.get("SOURCE_DATE_EPOCH") or str(_EPOCH_1980)
    if not raw.isdigit():
        raise WheelBuildError(f"SOURCE_DATE_EPOCH: expected seconds since 1970 (an integer), found {raw!r}")
    return time.gmtime(max(int(raw), _EPOCH_1980))[:6]


def _patch_list(patch_dir: Path) -> bytes:
    lines = [f"# {DIST} {patching.SGLANG_VERSION} patched by sglang-dspark with {patch_dir.name}/series:"]
    for patch in patching.read_series(patch_dir):
        digest = hashlib.sha256((patch_dir / patch.name).read_bytes()).hexdigest()
        lines.append(f"sha256:{digest}  {patch.name}")
    return ("\n".join(lines) + "\n").encode()


def build_wheel(
    source: Path,
    out_dir: Path = DEFAULT_OUT,
    build: int | None = None,
    patch_dir: Path = patching.DEFAULT_PATCH_DIR,
) -> Path:
    """Build ``sglang-0.5.15+dspark.<build>-<tags>.whl`` in ``out_dir`` from the official wheel ``source``.

    ``build`` defaults to ``default_build_number(patch_dir)``. Raises WheelBuildError if ``source`` is not
    the official 0.5.15 wheel and ``patching.PatchError`` if the series does not apply to it.
    """
    version = local_version(default_build_number(patch_dir) if build is None else build)
    tags = _wheel_tags(source)
    old_info, new_info = f"{DIST}-{patching.SGLANG_VERSION}.dist-info", f"{DIST}-{version}.dist-info"

    with zipfile.ZipFile(source) as zf, tempfile.TemporaryDirectory(prefix="sglang-dspark-wheel-") as tmp:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if f"{old_info}/METADATA" not in {i.filename for i in infos}:
            raise WheelBuildError(f"{source}: no {old_info}/METADATA; is it the official {DIST} wheel?")
        executable = {i.filename for i in infos if (i.external_attr >> 16) & 0o111}
        tree = Path(tmp)
        zf.extractall(tree, members=infos)

        states = patching.apply(tree, patch_dir)
        applied_before = [name for name, state in states.items() if state != "pending"]
        if applied_before:
            raise WheelBuildError(f"{source} already carries patches {applied_before}; use the official wheel")
        logger.info("applied %d patches from %s", len(states), patch_dir)

        files: dict[str, bytes] = {}
        for info in infos:
            if info.filename == f"{old_info}/RECORD":
                continue
            data = (tree / info.filename).read_bytes()
            name = info.filename
            if name.startswith(old_info + "/"):
                name = new_info + name[len(old_info) :]
            if name == f"{new_info}/METADATA":
                data = _set_metadata_version(data.decode("utf-8"), version, f"{source}:{info.filename}").encode()
            files[name] = data
        files[f"{new_info}/{PATCH_LIST}"] = _patch_list(patch_dir)
    modes = {name: 0o755 if name.replace(new_info, old_info, 1) in executable else 0o644 for name in files}

    record_name = f"{new_info}/RECORD"
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    body = sorted(n for n in files if not n.startswith(new_info + "/"))
    meta = sorted(n for n in files if n.startswith(new_info + "/"))
    for name in body + meta:
        writer.writerow([name, record_digest(files[name]), len(files[name])])
    writer.writerow([record_name, "", ""])
    files[record_name] = record.getvalue().encode()
    modes[record_name] = 0o644

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{DIST}-{version}-{tags}.whl"
    partial = target.with_name(target.name + ".part")
    date_time = _zip_time()
    with zipfile.ZipFile(partial, "w") as out:
        for name in body + meta + [record_name]:
            info = zipfile.ZipInfo(name, date_time=date_time)
            info.create_system = 3  # Unix, whatever the host: the mode bits below are Unix modes
            info.external_attr = (0o100000 | modes[name]) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            out.writestr(info, files[name])
    partial.replace(target)
    logger.info("wrote %s (%d files)", target, len(files))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--wheel", type=Path, help=f"the official {DIST}-{patching.SGLANG_VERSION} wheel")
    source.add_argument("--download", action="store_true", help="pip download it (the default)")
    parser.add_argument("--python-version", help="--download for another Python, e.g. 3.12 (a container's)")
    parser.add_argument("--platform", help="--download for another platform tag, e.g. manylinux_2_34_aarch64")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output dir (default {DEFAULT_OUT})")
    parser.add_argument("--build", type=int, help="N in 0.5.15+dspark.N (default: the number of patches)")
    parser.add_argument("--patches", type=Path, default=patching.DEFAULT_PATCH_DIR, help="patch series dir")
    args = parser.parse_args(argv)
    if args.wheel and (args.python_version or args.platform):
        parser.error("--python-version/--platform only apply to --download")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        with tempfile.TemporaryDirectory(prefix="sglang-download-") as tmp:
            wheel = args.wheel or download_official_wheel(Path(tmp), args.python_version, args.platform)
            built = build_wheel(wheel, args.out, args.build, args.patches)
    except (WheelBuildError, patching.PatchError, subprocess.CalledProcessError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(built)
    return 0


if __name__ == "__main__":
    sys.exit(main())

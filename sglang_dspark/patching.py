"""Apply or check the SGLang patch series against an installed ``sglang`` package.

    python -m sglang_dspark.patching apply [--site DIR] [--patches DIR] [--entry-point]
    python -m sglang_dspark.patching check [--site DIR] [--patches DIR]

``DIR`` for ``--site`` is the directory that holds the ``sglang/`` package (a site-packages dir, or
``$SGLANG_SITE`` on the GPU machine); by default the one Python would import ``sglang`` from. The
series is ``patches/sglang-<version>/series``: one unified diff per line, paths ``a/sglang/srt/...``.

Each patch is judged as a whole against the files: *applied* (every hunk's new text is present),
*pending* (every hunk's old text is present) or *conflicting* (anything else). ``apply`` writes only
when the whole series is either applied or pending, so a failed run leaves the tree untouched, and a
second run is a no-op. Context must match exactly (no fuzz); a hunk may move by any offset.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("sglang_dspark")

SGLANG_VERSION = "0.5.15"
DEFAULT_PATCH_DIR = Path(__file__).resolve().parent.parent / "patches" / f"sglang-{SGLANG_VERSION}"

PLUGIN_GROUP = "sglang.srt.plugins"
_HUNK_HEADER = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class PatchError(RuntimeError):
    """A patch does not apply (or the series / site is malformed)."""


@dataclass
class Hunk:
    header: str
    old_start: int  # 1-based line number in the pristine file
    old: list[str]  # context + removed lines, without newlines
    new: list[str]  # context + added lines, without newlines


@dataclass
class FilePatch:
    path: str  # relative to the site dir, e.g. sglang/srt/server_args.py
    hunks: list[Hunk] = field(default_factory=list)


@dataclass
class Patch:
    name: str
    files: list[FilePatch]


def _strip_prefix(path: str) -> str:
    path = path.split("\t", 1)[0].strip()
    return path[2:] if path.startswith(("a/", "b/")) else path


def parse_patch(name: str, text: str) -> Patch:
    """Parse a unified diff (free text before the first ``---`` line is the description)."""
    files: list[FilePatch] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            old_path, new_path = _strip_prefix(line[4:]), _strip_prefix(lines[i + 1][4:])
            if old_path != new_path or old_path == "/dev/null":
                raise PatchError(f"{name}: only in-place edits are supported, got {old_path} -> {new_path}")
            files.append(FilePatch(old_path))
            i += 2
            continue
        m = _HUNK_HEADER.match(line)
        if m:
            if not files:
                raise PatchError(f"{name}: hunk {line!r} before any file header")
            n_old = int(m.group(2) or 1)
            n_new = int(m.group(4) or 1)
            old: list[str] = []
            new: list[str] = []
            i += 1
            while i < len(lines) and (len(old) < n_old or len(new) < n_new):
                body = lines[i]
                tag, content = (body[:1], body[1:]) if body else (" ", "")
                if tag == " ":
                    old.append(content)
                    new.append(content)
                elif tag == "-":
                    old.append(content)
                elif tag == "+":
                    new.append(content)
                elif tag != "\\":  # "\ No newline at end of file"
                    raise PatchError(f"{name}: bad line in hunk {line!r}: {body!r}")
                i += 1
            if len(old) != n_old or len(new) != n_new:
                raise PatchError(f"{name}: hunk {line!r} is truncated")
            files[-1].hunks.append(Hunk(line, int(m.group(1)), old, new))
            continue
        i += 1
    if not files or not all(f.hunks for f in files):
        raise PatchError(f"{name}: no hunks found")
    return Patch(name, files)


def _find(lines: list[str], block: list[str], near: int) -> int | None:
    """Index where ``block`` occurs in ``lines``, the occurrence nearest to ``near``; None if absent."""
    if not block:
        return near
    hits = [
        k for k in range(len(lines) - len(block) + 1)
        if lines[k] == block[0] and lines[k : k + len(block)] == block
    ]
    return min(hits, key=lambda k: abs(k - near)) if hits else None


def _apply_file(patch_name: str, fp: FilePatch, lines: list[str]) -> tuple[str, list[str]]:
    """Return (state, new_lines) for one file; state is 'applied', 'pending' or raises PatchError."""
    new_found = [_find(lines, h.new, h.old_start - 1) is not None for h in fp.hunks]
    if all(new_found):
        return "applied", lines
    old_found = [_find(lines, h.old, h.old_start - 1) is not None for h in fp.hunks]
    n = len(fp.hunks)
    for k, h in enumerate(fp.hunks):
        if not old_found[k] and not new_found[k]:
            raise PatchError(
                f"patch {patch_name}: hunk {k + 1}/{n} {h.header} does not apply to {fp.path}: "
                f"expected these lines near line {h.old_start}:\n    " + "\n    ".join(h.old[:8])
                + f"\nIs the site an unmodified SGLang {SGLANG_VERSION}?"
            )
    if not all(old_found):
        done = [k + 1 for k in range(n) if not old_found[k]]
        raise PatchError(
            f"patch {patch_name}: {fp.path} is partly patched (hunks {done} of {n} applied, the others not); "
            "restore the pristine file and apply again"
        )
    out = list(lines)
    offset = 0
    for h in fp.hunks:
        at = _find(out, h.old, h.old_start - 1 + offset)
        if at is None:  # an earlier hunk rewrote this one's context: the series is inconsistent
            raise PatchError(f"patch {patch_name}: hunk {h.header} overlaps an earlier hunk in {fp.path}")
        out[at : at + len(h.old)] = h.new
        offset = at + len(h.new) - (h.old_start - 1)
    return "pending", out


def read_series(patch_dir: Path) -> list[Patch]:
    """Parse ``patch_dir/series`` (one patch file name per line, ``#`` comments) into patches."""
    series = patch_dir / "series"
    if not series.is_file():
        raise PatchError(f"no series file at {series}")
    patches = []
    for raw in series.read_text().splitlines():
        name = raw.split("#", 1)[0].strip()
        if name:
            path = patch_dir / name
            if not path.is_file():
                raise PatchError(f"{series} names {name}, which does not exist in {patch_dir}")
            patches.append(parse_patch(name, path.read_text()))
    if not patches:
        raise PatchError(f"{series} lists no patches")
    return patches


def default_site() -> Path:
    """The directory holding the ``sglang`` package Python would import (without importing it)."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise PatchError("sglang is not importable here; pass --site DIR (the dir that holds sglang/)")
    return Path(list(spec.submodule_search_locations)[0]).parent


def installed_version(site: Path) -> str | None:
    text = (site / "sglang" / "_version.py")
    if not text.is_file():
        return None
    m = re.search(r"^__version__ = version = '([^']+)'", text.read_text(), re.M)
    return m.group(1) if m else None


def plan(site: Path, patch_dir: Path = DEFAULT_PATCH_DIR) -> tuple[dict[str, str], dict[Path, str]]:
    """Judge the series against ``site``.

    Returns ({patch name: 'applied' | 'pending'}, {file: text after applying the pending patches}).
    Raises PatchError if any patch conflicts or the site is not SGLang ``SGLANG_VERSION``.
    """
    if not (site / "sglang" / "srt").is_dir():
        raise PatchError(f"{site} does not contain an sglang package (no {site / 'sglang' / 'srt'})")
    version = installed_version(site)
    if version != SGLANG_VERSION:
        raise PatchError(
            f"{site / 'sglang' / '_version.py'}: the series in {patch_dir} is for SGLang {SGLANG_VERSION}, "
            f"found {version!r}"
        )
    files: dict[Path, list[str]] = {}
    states: dict[str, str] = {}
    for patch in read_series(patch_dir):
        file_states = []
        for fp in patch.files:
            path = site / fp.path
            if path not in files:
                if not path.is_file():
                    raise PatchError(f"patch {patch.name}: {path} does not exist")
                files[path] = path.read_text().split("\n")
            state, files[path] = _apply_file(patch.name, fp, files[path])
            file_states.append(state)
        if len(set(file_states)) > 1:
            raise PatchError(f"patch {patch.name} is applied to some of its files only: {file_states}")
        states[patch.name] = file_states[0]
    changed = {p: "\n".join(lines) for p, lines in files.items()}
    return states, changed


def apply(site: Path, patch_dir: Path = DEFAULT_PATCH_DIR) -> dict[str, str]:
    """Apply the pending patches of the series (idempotent). Returns the state each patch had before."""
    states, texts = plan(site, patch_dir)
    for path, text in texts.items():
        if path.read_text() != text:
            path.write_text(text)
            logger.info("patched %s", path)
    return states


def write_entry_point(site: Path) -> Path:
    """Make the ``sglang.srt.plugins`` entry point visible from ``site`` without pip (e.g. ``$SGLANG_SITE``
    on the GPU machine, which is on PYTHONPATH but not a pip-managed site-packages). Idempotent.

    SGLang's ``load_plugins()`` finds plugins through ``importlib.metadata`` only, in every process;
    ``sglang_dspark`` itself must still be importable there (repo root on PYTHONPATH).
    """
    from sglang_dspark import __version__

    dist_info = site / f"sglang_dspark-{__version__}.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: sglang-dspark\nVersion: {__version__}\n")
    (dist_info / "entry_points.txt").write_text(f"[{PLUGIN_GROUP}]\ndspark = sglang_dspark.plugin:load\n")
    (dist_info / "top_level.txt").write_text("sglang_dspark\n")
    return dist_info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sglang_dspark.patching", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["apply", "check"])
    parser.add_argument(
        "--site", type=Path, default=None, help="dir holding the sglang package (default: the importable one)"
    )
    parser.add_argument("--patches", type=Path, default=DEFAULT_PATCH_DIR, help="patch series dir")
    parser.add_argument(
        "--entry-point", action="store_true",
        help="apply: also write a sglang_dspark dist-info with the plugin entry point into the site dir "
        "(for a site that sglang-dspark is not pip-installed into)",
    )
    args = parser.parse_args(argv)
    try:
        site = (args.site or default_site()).resolve()
        states = apply(site, args.patches) if args.command == "apply" else plan(site, args.patches)[0]
    except PatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "apply" and args.entry_point:
        print(f"entry point  {write_entry_point(site)}")
    for name, state in states.items():
        done = "applied now" if args.command == "apply" and state == "pending" else state
        print(f"{done:12s} {name}")
    pending = [n for n, s in states.items() if s == "pending"]
    if args.command == "check" and pending:
        print(f"{len(pending)} of {len(states)} patches not applied to {site}", file=sys.stderr)
        return 1
    print(f"{len(states)} patches {'applied' if args.command == 'apply' else 'checked'}: {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

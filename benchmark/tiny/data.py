"""Data for the tiny pair: Python standard-library source, split into train / held-out files by name.

The split depends only on a file's path relative to the stdlib root (``sha256(path) % 100 < 5`` is
held out), so the GPU machine (Python 3.12) and the CPU machine (Python 3.11) agree on which names are
held out even though their stdlibs differ. The evaluation prompts themselves are written next to the
fixtures (``eval_prompts.jsonl``) so the CPU evaluation does not depend on the local stdlib.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

HELDOUT_PERCENT = 5
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
MIN_FILE_BYTES = 200
MAX_FILE_BYTES = 200_000  # drops a few generated tables (e.g. pydoc_data/topics.py)
CODE_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


@dataclass(frozen=True)
class SourceFile:
    path: str  # posix path relative to the stdlib root, e.g. "json/decoder.py"
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(rel_path: str) -> bool:
    """Whether ``rel_path`` (posix, relative to the stdlib root) belongs to the held-out split."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


def list_stdlib_sources(root: Path | None = None, max_files: int | None = None) -> list[SourceFile]:
    """All readable ``*.py`` files under the stdlib root, sorted by path (site-packages excluded).

    Files that are not UTF-8 (the stdlib tests ship a few on purpose) or outside
    ``[MIN_FILE_BYTES, MAX_FILE_BYTES]`` are skipped.
    """
    root = stdlib_root() if root is None else root
    if not root.is_dir():
        raise FileNotFoundError(f"data.py: stdlib directory {root} does not exist")
    out: list[SourceFile] = []
    for path in _python_files(root):
        size = path.stat().st_size
        if not MIN_FILE_BYTES <= size <= MAX_FILE_BYTES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if "\x00" in text:
            continue
        out.append(SourceFile(path.relative_to(root).as_posix(), text))
        if max_files is not None and len(out) >= max_files:
            break
    if not out:
        raise FileNotFoundError(f"data.py: no usable *.py files under {root}")
    return out


def _python_files(root: Path) -> list[Path]:
    """``*.py`` regular files under ``root`` in sorted path order, not descending into ``SKIP_DIRS``
    (an interpreter's site-packages can hold far more files than its stdlib)."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted((p for p in found if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def split_sources(files: list[SourceFile]) -> tuple[list[SourceFile], list[SourceFile]]:
    """(train, held-out) by ``is_heldout`` on the relative path."""
    train = [f for f in files if not is_heldout(f.path)]
    heldout = [f for f in files if is_heldout(f.path)]
    if not train or not heldout:
        raise ValueError(f"data.py: split of {len(files)} files gave {len(train)} train / {len(heldout)} held-out")
    return train, heldout


def humaneval_code_blocks(path: Path) -> list[str]:
    """The ```python blocks inside the first turn of each line of a DeepSpec prompt JSONL."""
    blocks: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            turns = json.loads(line).get("turns")
            if not turns:
                raise ValueError(f"{path}:{line_no}: expected a non-empty 'turns' list")
            found = CODE_BLOCK.findall(turns[0])
            if found:
                blocks.append(found[0].strip("\n") + "\n")
    if not blocks:
        raise ValueError(f"{path}: no ```python code blocks found")
    return blocks


def heldout_snippets(files: list[SourceFile], count: int, max_chars: int, seed: int) -> list[dict]:
    """``count`` continuation prompts cut from held-out files: a window of whole lines, at most
    ``max_chars`` long, starting at a random line that begins a ``def`` / ``class`` / statement.

    Returns ``[{"source": "stdlib:<path>", "text": str}]`` (deterministic for a given file list and seed).
    """
    rng = random.Random(seed)
    candidates = [f for f in files if len(f.text) >= 2 * max_chars]
    if not candidates:
        raise ValueError(f"data.py: no held-out file is at least {2 * max_chars} characters long")
    snippets: list[dict] = []
    order = sorted(candidates, key=lambda f: f.path)
    rng.shuffle(order)
    for f in order:
        if len(snippets) >= count:
            break
        lines = f.text.splitlines(keepends=True)
        starts = [i for i, ln in enumerate(lines) if ln.startswith(("def ", "class ", "    def "))]
        if not starts:
            continue
        i = rng.choice(starts)
        text = ""
        while i < len(lines) and len(text) + len(lines[i]) <= max_chars:
            text += lines[i]
            i += 1
        if len(text) >= max_chars // 4:
            snippets.append({"source": f"stdlib:{f.path}", "text": text})
    return snippets


def humaneval_prompts(path: Path, count: int | None = None) -> list[dict]:
    """The first ``count`` HumanEval code blocks as ``[{"source": "humaneval:<i>", "text": str}]``."""
    blocks = humaneval_code_blocks(path)
    if count is not None:
        blocks = blocks[:count]
    return [{"source": f"humaneval:{i}", "text": b} for i, b in enumerate(blocks)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]

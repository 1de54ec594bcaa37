"""Text corpus and prompts: the Python standard library's own source (what the shipped tiny models
were trained on, split into training and held-out files), and prompt files.

The file list is sorted and filtered the same way on every call, so the
train / held-out split is deterministic for a given Python installation.
Held-out files are picked by position (every ``holdout_every``-th file), so
no held-out text is ever trained on.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from .errors import MoEOffloadError

# Directories whose files are not ordinary library code: tests, vendored
# packages, and generated data tables (codec charmaps, pydoc topic strings).
SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test",
    "encodings", "pydoc_data", "__pycache__",
})
SKIP_PREFIXES = ("_sysconfigdata", "config-")


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _keep(relative: Path) -> bool:
    """True for a standard-library source file that belongs in the corpus."""
    parts = relative.parts
    if any(part in SKIP_DIRS for part in parts[:-1]):
        return False
    return not any(part.startswith(SKIP_PREFIXES) for part in parts)


def stdlib_files(root: Path | None = None) -> list[Path]:
    """All kept ``*.py`` files under the standard library, sorted by relative path."""
    root = stdlib_root() if root is None else Path(root)
    files = (path for path in root.rglob("*.py") if path.is_file())
    return sorted((p for p in files if _keep(p.relative_to(root))), key=lambda p: p.relative_to(root).as_posix())


def split_files(files: list[Path], holdout_every: int = 20) -> tuple[list[Path], list[Path]]:
    """(train, held_out): every ``holdout_every``-th file (index 0, N, 2N, ...) is held out."""
    if holdout_every < 2:
        raise ValueError(f"holdout_every must be at least 2, got {holdout_every}")
    held_out = [f for i, f in enumerate(files) if i % holdout_every == 0]
    train = [f for i, f in enumerate(files) if i % holdout_every != 0]
    return train, held_out


def read_file(path: Path) -> str:
    """A source file's text; undecodable bytes are replaced, not fatal."""
    return Path(path).read_text(encoding="utf-8", errors="replace")


def read_text(files: list[Path], max_chars: int | None = None) -> list[str]:
    """Texts of ``files`` in order, stopping once ``max_chars`` characters are collected.

    The last text is truncated so the total is at most ``max_chars``; empty
    files are dropped.
    """
    texts: list[str] = []
    total = 0
    for path in files:
        text = read_file(path)
        if max_chars is not None:
            text = text[: max_chars - total]
        if text:
            texts.append(text)
            total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    return texts


def stdlib_split(holdout_every: int = 20) -> tuple[list[Path], list[Path]]:
    """(train, held_out) file lists of the standard-library corpus."""
    return split_files(stdlib_files(), holdout_every)


# Prompts: a file of them, or windows of the corpus's held-out or training files.

PROMPT_LINES = 40          # a stdlib prompt is the first lines of a file
PROMPT_CHARS = 2000        # ... cut to at most this many characters


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .jsonl file (JSON strings or objects with "prompt") or a text file, one per line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise MoEOffloadError(f"cannot read prompts file {path}: {err.strerror}") from None
    lines = [line for line in lines if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    return [_jsonl_prompt(path, n, line) for n, line in enumerate(lines, 1)]


def _jsonl_prompt(path: Path, number: int, line: str) -> str:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as err:
        raise MoEOffloadError(f"{path}:{number} is not JSON ({err.msg})") from None
    if isinstance(item, dict) and isinstance(item.get("prompt"), str):
        return item["prompt"]
    if isinstance(item, str):
        return item
    raise MoEOffloadError(f"{path}:{number}: each line must be a JSON string or an object with a \"prompt\" string")


def stdlib_prompts(count: int, held_out: bool, lines: int = PROMPT_LINES, max_chars: int = PROMPT_CHARS) -> list[str]:
    """``count`` prompts of ``lines`` lines from one side of the corpus split (held-out or training files).

    The first windows (lines 1..lines) of files spread evenly over the split come
    first; past one per file, the next windows of every file follow. Empty
    windows are skipped.
    """
    train, held = stdlib_split()
    files = held if held_out else train
    if count < 1 or not files:
        raise MoEOffloadError(f"need at least one prompt and one corpus file (asked {count}, have {len(files)} files)")
    taken = min(count, len(files))
    picked = [files[(i * len(files)) // taken] for i in range(taken)]
    texts = {path: read_file(path).splitlines(keepends=True) for path in picked}
    prompts: list[str] = []
    window = 0
    while len(prompts) < count and any(len(t) > window * lines for t in texts.values()):
        for path in picked:
            text = "".join(texts[path][window * lines:(window + 1) * lines])[:max_chars]
            if text.strip() and len(prompts) < count:
                prompts.append(text)
        window += 1
    return prompts

"""Atomic file writes and hashing shared by every stage.

Every file the pipeline produces is written to a temporary file in the same folder and then renamed over
the target, so a crash or a kill never leaves a half-written file in place of a good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


def bloodcell_home() -> Path:
    """The folder for work files (datasets' indexes and caches, exported ONNX files, downloads):
    ``$BLOODCELL_HOME``, default ``~/.cache/bloodcell``."""
    return Path(os.environ.get("BLOODCELL_HOME") or Path.home() / ".cache" / "bloodcell").expanduser()


def path_digest(folder: str | os.PathLike[str]) -> str:
    """8 hex digits of the SHA-256 of a folder's absolute path (its bytes on disk: any file name), which tell
    two folders of one name apart in the names of work and result folders."""
    return hashlib.sha256(os.fsencode(Path(folder).expanduser().resolve())).hexdigest()[:8]


def _default_file_mode() -> int:
    # mkstemp creates 0600 files; results get the permissions a plain open() would give (0666 & ~umask).
    # Read once at import: os.umask can only be read by setting it, which is not thread-safe.
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


@contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` only if the block succeeds.

    Use it for writers that insist on a file name (numpy, matplotlib, safetensors, onnx).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The name's first 64 bytes only: the whole name with the random part and suffix can pass the file
    # system's 255-byte limit (a cut inside a character decodes to escapes that encode back to those bytes).
    start = os.fsdecode(os.fsencode(target.name)[:64])
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{start}.", suffix=suffix or target.suffix, dir=target.parent)
    except OSError as error:  # a read-only or full folder: name the file asked for, not the temporary
        if error.errno is None:
            raise
        raise type(error)(error.errno, error.strerror, str(target)) from error
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, _FILE_MODE)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)  # again: some writers (safetensors) replace the file with a private one
        with open(tmp, "rb+") as handle:  # flush to disk before the rename makes it visible
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as error:
        if error.filename != str(tmp):
            raise
        # Name the file the user asked for, not our hidden temporary one (e.g. "No space left on device").
        raise type(error)(error.errno, error.strerror, str(target)) from error
    finally:
        tmp.unlink(missing_ok=True)


#: What makes a spreadsheet read a cell as a formula: a file name such as ``=HYPERLINK(...).jpg`` in a CSV
#: would run when the CSV is opened (CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(text: str) -> str:
    """``text`` for a CSV cell: prefixed by an apostrophe (shown as text, hidden by spreadsheets) where it
    would start a formula."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def markdown_text(value: object) -> str:
    """``value`` as text for a Markdown table cell or line: a ``|`` (a file or class folder named ``bad|name``)
    escaped, which would end its cell and push the rest of the row into columns of its own; line breaks as
    spaces, which would end the table; ``&``, ``<`` and ``>`` as HTML entities, which Markdown shows as the
    characters, so that a name such as ``<img src=x onerror=...>`` is no raw HTML for a viewer to run; and
    ``[``, ``]`` (and the backslash) escaped, so that a name such as ``![t](http://x)`` is no link or image."""
    text = str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = " ".join(text.splitlines()).replace("\\", "\\\\")
    return text.replace("|", "\\|").replace("[", "\\[").replace("]", "\\]")


def markdown_code(value: object) -> str:
    """``value`` as the text of a Markdown code span (between backticks), where entities and backslash
    escapes show as typed: a backtick, which would end the span, as ``'``, and line breaks as spaces."""
    return " ".join(str(value).splitlines()).replace("`", "'")


def markdown_table(header: Sequence[object], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table whose cells hold any text (see :func:`markdown_text`)."""
    lines = ["| " + " | ".join(map(markdown_text, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(markdown_text, row)) + " |" for row in rows])


def probability_columns(classes: Sequence[str]) -> list[str]:
    """The column of each class's probability in every predictions table bloodcell writes: ``p_<class>``.

    Prefixed, so that a class named like another column ("file", "error") cannot overwrite it.
    """
    return [f"p_{name}" for name in classes]


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically and return the path."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``target`` atomically and return the path."""
    return atomic_write_bytes(target, text.encode("utf-8"))


def write_text_if_changed(target: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write_text`, unless ``target`` already holds exactly ``text``: a file every run writes
    the same (a manifest, a split) is left alone, so an up-to-date work folder may be read-only."""
    data = text.encode("utf-8")
    try:
        if os.path.getsize(target) == len(data) and Path(target).read_bytes() == data:
            return Path(target)
    except OSError:  # not there yet, or unreadable: write it
        pass
    return atomic_write_bytes(target, data)


def atomic_write_json(target: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``target`` atomically and return the path."""
    return atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def sha256_stream(handle: BinaryIO, chunk_size: int = 1 << 20) -> str:
    """Return the hex SHA-256 of everything left in ``handle``."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: handle.read(chunk_size), b""):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex SHA-256 of a file's bytes."""
    with open(path, "rb") as handle:
        return sha256_stream(handle)


def printable_path(name: str | os.PathLike[str]) -> str:
    """A file name as valid text: bytes that are not UTF-8 (kept by Python as surrogates) become ``\\xff``
    escapes, so a table, CSV or page that shows the name cannot fail on it."""
    return os.fspath(name).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


#: C0 control characters, DEL and the C1 controls: a terminal acts on them (ESC starts a sequence that moves
#: the cursor or erases a line, CSI 0x9b does the same on some), so a file named ``x\x1b[1A\x1b[2Kfake.png``
#: would rewrite the lines printed above it.
_CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f]")


def terminal_text(name: object) -> str:
    """A name from the data (a file, folder or class) to print on a terminal: :func:`printable_path`, and
    every control character shown as a ``\\x1b`` escape, so the name prints as what it is and cannot move
    the cursor, erase lines or retitle the window."""
    text = printable_path(name) if isinstance(name, (str, os.PathLike)) else str(name)
    return _CONTROL_CHARACTERS.sub(lambda match: f"\\x{ord(match.group()):02x}", text)

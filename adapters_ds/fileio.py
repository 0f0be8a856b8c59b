"""Writes that never leave a half-written output: write under a temporary name, then rename.

A reader (or a resumed run) sees either the old complete output or the new complete one, even when the
process is killed mid-write.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adapters_ds.errors import InputError


def check_writable_dir(path: Path) -> None:
    """Refuse an output path that is a file or lies in a folder we cannot write, before any work starts."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"output path {str(path)!r} exists and is not a directory")
    parent = path if path.exists() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"output path {str(path)!r} cannot be made: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"output path {str(path)!r} is not writable (no write permission on {str(parent)!r})")


def check_output_dir(path: str | Path, allowed: bool, hint: str = "pass --overwrite to replace it") -> bool:
    """The one "output folder must be empty" rule: refuse a non-empty `path` unless `allowed` (the command's
    --overwrite or --resume), naming what to pass in `hint`. Returns whether the folder is non-empty."""
    path = Path(path)
    check_writable_dir(path)
    non_empty = path.is_dir() and any(path.iterdir())
    if non_empty and not allowed:
        raise InputError(f"output_dir {str(path)!r} is not empty; {hint}")
    return non_empty


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; on success it replaces `path` as a whole."""
    path = Path(path)
    check_writable_dir(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files: unfriendly on a shared cluster filesystem
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path, what: str) -> Any:
    """Read a JSON file, turning a missing or malformed file into an InputError that names it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {str(path)!r}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} {str(path)!r} is not valid JSON: {exc}") from None

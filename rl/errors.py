"""The two helpers every module shares: a check failure that names what it rejected, and an atomic write."""
from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn


class ConfigError(ValueError):
    """A bad setting or input file, reported in one message before any actor starts."""


def fail(key: str, value, why: str, error: type[Exception] = ValueError) -> NoReturn:
    """Raise `error("key=value: why")`, the one shape of every check message in the project, so a
    user always sees which setting (or file, or row) was rejected, with what, and what would do."""
    raise error(f"{key}={value!r}: {why}")


def fsync_dir(path: str | os.PathLike) -> None:
    # A rename is durable only once its directory entry is flushed.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` by `data` so that a reader, or a crash at any point, sees the old file or the new
    one and never a torn one: write a sibling .tmp, fsync it, os.replace it, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)

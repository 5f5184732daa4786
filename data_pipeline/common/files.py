"""Writing files so that a crash, a kill or a lost machine never leaves a half-written one where a good one
stood: write beside the target, fsync, rename over it, fsync the directory (the rename itself must be durable)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(root: Path) -> None:
    """Every file under `root`, then every directory from the deepest up, made durable."""
    directories = [root]
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            directories.append(path)
        elif path.is_file():
            with path.open("rb") as file:
                os.fsync(file.fileno())
    for directory in sorted(directories, key=lambda path: len(path.parts), reverse=True):
        fsync_directory(directory)


def write_atomically(path: Path, content: str | bytes | Callable[[Path], object]) -> Path:
    """Write `path` whole: `content` is the text or bytes, or a function that writes the file it is given
    (a plot's savefig, a torch.save). Returns `path`."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        if callable(content):
            content(partial)
        elif isinstance(content, bytes):
            partial.write_bytes(content)
        else:
            partial.write_text(content)
        with partial.open("rb") as file:
            os.fsync(file.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    fsync_directory(path.parent)
    return path


def publish_directory(staging: Path, final: Path) -> Path:
    """Make a fully written `staging` directory durable and rename it to `final` (which must not exist)."""
    fsync_tree(staging)
    staging.rename(final)
    fsync_directory(final.parent)
    return final

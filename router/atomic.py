"""Atomic directory writes: build beside the target, fsync, rename into place.

A crash at any point leaves either the old directory or the new one under the target's name, never a
half-written one. Work happens in hidden siblings (`.{name}.tmp-*`, `.{name}.old-*`) on the target's
filesystem, so every rename is atomic; on an ordinary failure they are removed before the error
propagates. The only non-atomic window of an overwrite is between moving the old directory away and
moving the new one in: a crash there leaves no directory under the target's name (and the old one intact
beside it), never a partial one.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from router.errors import LibraryError

logger = logging.getLogger(__name__)

OVERWRITE_HINT = "pass overwrite=True to replace it"
"""How an API caller replaces an existing output (check_target's default hint)."""
CLI_OVERWRITE_HINT = "pass --overwrite to replace it"
"""The hint of the `tessera` commands that take an `--overwrite` flag."""


def _fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(path: Path) -> None:
    """fsync every file and directory under `path` (plain files and directories only, no links)."""
    for entry in path.iterdir():
        if entry.is_symlink() or not (entry.is_file() or entry.is_dir()):
            raise LibraryError(f"atomic write: {entry.name} is not a plain file or directory")
        if entry.is_dir():
            _fsync_tree(entry)
        else:
            _fsync_path(entry)
    _fsync_path(path)


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}"


def check_target(target: str | Path, overwrite: bool, hint: str = OVERWRITE_HINT) -> Path:
    """`target` as an absolute path, if write_directory may create it: LibraryError for a link or a file
    in its place, and for a non-empty directory unless `overwrite`.

    `hint` ends that error with how the caller replaces an output (a CLI names its `--overwrite` flag).
    """
    target = Path(target).absolute()
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise LibraryError(f"{target} exists and is not a directory; refusing to replace it")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise LibraryError(f"{target} already exists and is not empty; choose another output or {hint}")
    return target


def write_directory(target: str | Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Create directory `target` holding the plain files and subdirectories `fill(tmp)` writes into `tmp`.

    An existing non-empty `target` is replaced only if `overwrite` (check_target); then the old directory
    is renamed away, the new one renamed in, and the old one deleted.
    """
    target = check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()
    old = None
    try:
        fill(tmp)
        _fsync_tree(tmp)
        if target.exists():
            old = _sibling(target, "old")
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            os.replace(old, target)
        raise
    _fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("wrote %s", target)
    return target


def write_file(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a fsynced temporary sibling renamed into place (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def build_cache_entry(target: str | Path, build: Callable[[Path], None], complete: Callable[[Path], bool]) -> Path:
    """Build a cache entry `target` once: `build` fills a temporary sibling that is renamed into place.

    An entry is complete or absent; an incomplete one (a crash of an older writer) is removed first.
    When two processes build at once the first rename wins and the other's build is dropped.
    """
    target = Path(target)
    if complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        logger.warning("removing the incomplete cache entry %s", target)
        shutil.rmtree(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        os.rename(staging, target)
    except OSError:
        if not complete(target):
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target

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


def _fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        if not file.is_file() or file.is_symlink():
            raise LibraryError(f"atomic write: {file.name} is not a plain file")
        _fsync_path(file)
    _fsync_path(path)


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}"


def write_directory(target: str | Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Create directory `target` holding the plain files `fill(tmp)` writes into `tmp`.

    An existing non-empty `target` is replaced only if `overwrite`; then the old directory is renamed
    away, the new one renamed in, and the old one deleted.
    """
    target = Path(target).absolute()
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise LibraryError(f"{target} exists and is not a directory; refusing to replace it")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise LibraryError(f"{target} already exists and is not empty (pass overwrite=True to replace it)")
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

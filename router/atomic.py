"""Atomic directory writes: build beside the target, fsync, rename into place.

A crash at any point leaves either the old directory or the new one, never a half-written directory
under the target's name. Temporary directories start with '.' and are removed on failure.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from router.errors import LibraryError


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_directory(target: Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Create `target` with the files `fill(tmp)` writes; replace an existing one only if `overwrite`."""
    target = target.absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise LibraryError(f"{target} already exists and is not empty (pass overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old = None
    try:
        fill(tmp)
        _fsync_tree(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target

"""Library writes are atomic: a failure or crash mid-write never leaves a half-written library."""

from __future__ import annotations

import os

import pytest

from router import atomic
from router.errors import LibraryError
from router.library import ModuleLibrary, random_library
from tests.router.test_library import assert_same_library


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_refuses_to_overwrite_a_non_empty_directory(library, written, fingerprint):
    other = random_library(fingerprint, num_modules=2, seed=1)
    with pytest.raises(LibraryError, match="already exists and is not empty"):
        other.write(written)
    assert_same_library(library, ModuleLibrary.load(written))
    (written.parent / "empty").mkdir()
    assert list(ModuleLibrary.load(other.write(written.parent / "empty")).modules) == ["m0", "m1"]


def test_refuses_to_replace_a_file(library, tmp_path):
    (tmp_path / "file").write_text("not a library")
    with pytest.raises(LibraryError, match="exists and is not a directory"):
        library.write(tmp_path / "file", overwrite=True)
    assert (tmp_path / "file").read_text() == "not a library"


def test_overwrite_swaps_in_the_new_library(written, fingerprint):
    other = random_library(fingerprint, num_modules=2, seed=1)
    other.write(written, overwrite=True)
    assert_same_library(other, ModuleLibrary.load(written))
    assert _leftovers(written.parent) == []


def test_tensor_that_fails_to_serialize_leaves_the_old_library(library, written, fingerprint):
    broken = random_library(fingerprint, num_modules=2, seed=1)
    broken.weights["m1"][(0, "q_proj")] = broken.weights["m0"][(0, "q_proj")]  # shared memory: safetensors refuses
    with pytest.raises(RuntimeError, match="share memory"):
        broken.write(written, overwrite=True)
    assert_same_library(library, ModuleLibrary.load(written))
    assert _leftovers(written.parent) == []
    with pytest.raises(RuntimeError, match="share memory"):
        broken.write(written.parent / "fresh")
    assert not (written.parent / "fresh").exists() and _leftovers(written.parent) == []


def test_failed_rename_restores_the_old_library(library, written, fingerprint, monkeypatch):
    real_replace = os.replace
    calls = []

    def replace_failing_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old library is already moved away; moving the new one in fails
            raise OSError("disk went away")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace_failing_second)
    with pytest.raises(OSError, match="disk went away"):
        random_library(fingerprint, num_modules=2, seed=1).write(written, overwrite=True)
    monkeypatch.undo()
    assert len(calls) == 3, "the old library must be renamed back"
    assert_same_library(library, ModuleLibrary.load(written))
    assert _leftovers(written.parent) == []


def test_crash_before_rename_leaves_no_library_under_the_name(library, written, fingerprint):
    pid = os.fork()
    if pid == 0:  # child: write a new library and die abruptly once its files are on disk, before renaming
        try:
            atomic._fsync_tree = lambda path: os._exit(17)
            random_library(fingerprint, num_modules=2, seed=1).write(written, overwrite=True)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 17
    assert_same_library(library, ModuleLibrary.load(written))
    leftovers = _leftovers(written.parent)
    assert len(leftovers) == 1 and leftovers[0].startswith(".lib.tmp-"), leftovers


def test_failing_fill_removes_its_temp_dir(tmp_path):
    def fill(tmp):
        (tmp / "library.json").write_text("{}")
        raise ValueError("serializer broke")

    with pytest.raises(ValueError, match="serializer broke"):
        atomic.write_directory(tmp_path / "lib", fill)
    assert list(tmp_path.iterdir()) == []


def test_write_file_replaces_atomically_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "deep" / "out.txt"
    assert atomic.write_file(target, "first") == target and target.read_text() == "first"
    atomic.write_file(target, "second")
    assert target.read_text() == "second" and sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]

"""kvcluster.native: compile-once cache of shipped C files, and its fallbacks."""

from __future__ import annotations

import shutil

import pytest

from kvcluster import native

SOURCE = "int answer(void) { return 42; }\n"
needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


@pytest.fixture
def source(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "answer.c"
    path.write_text(SOURCE)
    return path


@needs_cc
def test_builds_once_and_reuses_the_cached_library(source):
    lib = native.load_library(source, ("-O2",), "TEST_NATIVE")
    if lib is None:
        pytest.skip("not x86-64")
    assert lib.answer() == 42
    built = sorted(native.cache_dir().glob("answer-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    assert native.load_library(source, ("-O2",), "TEST_NATIVE").answer() == 42
    assert built[0].stat().st_mtime_ns == mtime  # not rebuilt
    native.load_library(source, ("-O1",), "TEST_NATIVE")  # other flags: another file
    assert len(list(native.cache_dir().glob("answer-*.so"))) == 2
    assert all(p.name.startswith("answer-") for p in native.cache_dir().iterdir())  # no temp files


def test_disabled_by_environment(source, monkeypatch):
    monkeypatch.setenv("TEST_NATIVE", "0")
    assert native.load_library(source, (), "TEST_NATIVE") is None


def test_no_compiler_or_bad_source_gives_none(source, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert native.load_library(source, (), "TEST_NATIVE") is None
    monkeypatch.delenv("CC")
    source.write_text("this is not C")
    assert native.load_library(source, (), "TEST_NATIVE") is None
    assert not native.cache_dir().exists() or not any(native.cache_dir().iterdir())  # no temp file


def test_march_native_builds_are_keyed_by_cpu(source, monkeypatch):
    first = native._digest(source, ("-march=native",))
    monkeypatch.setattr(native, "_cpu_identity", lambda: "another cpu")
    assert native._digest(source, ("-march=native",)) != first
    assert native._digest(source, ("-O2",)) == native._digest(source, ("-O2",))

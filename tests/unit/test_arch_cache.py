"""arch/cache.py: built family tables kept between runs, used only by the code that built them."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest

from loratool.arch import cache
from loratool.arch.registry import Family, entry_data


@pytest.fixture()
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LORATOOL_CACHE_DIR", str(tmp_path / "c"))
    return tmp_path / "c"


def _fresh(name: str) -> Family:
    return Family(entry_data(name), stored=True)  # a registry instance as a new process would make it


@pytest.mark.parametrize("name", ["sdxl", "wan"])  # a generated table; a table from rules
def test_a_stored_table_is_the_built_one(folder, name, monkeypatch):
    assert not folder.exists()
    built = _fresh(name)
    assert built.table is not None
    (path,) = folder.glob(f"arch-*-{name}.pickle")
    assert path.stat().st_uid == os.getuid()
    fresh_indexes = Family(entry_data(name))  # an instance never cached builds its own
    expected = (fresh_indexes._kohya_index, fresh_indexes._original_index)

    def no_build(*_):
        raise AssertionError("built again although stored")

    monkeypatch.setattr(Family, "_build_table", no_build)
    loaded = _fresh(name)
    assert loaded.table.modules == built.table.modules
    assert "_packed_params" in loaded.table.__dict__  # the parameter map is unpacked only when used ...
    assert loaded.table.params == built.table.params  # ... and then whole
    assert loaded.table.checkpoint_params == built.table.checkpoint_params
    assert (loaded._kohya_index, loaded._original_index) == expected


def test_only_registry_instances_use_the_cache(folder):
    entry = {**entry_data("sd1"), "aliases": ["made-up"]}
    Family(entry).table  # noqa: B018 - an entry made by a caller: its table is its own
    assert not folder.exists() or not list(folder.glob("*.pickle"))


def test_a_damaged_or_foreign_file_is_built_over(folder):
    _fresh("sd1").table  # noqa: B018
    (path,) = folder.glob("arch-*-sd1.pickle")
    path.write_bytes(b"not a pickle")
    assert cache.load("sd1") is None
    assert _fresh("sd1").table.modules  # built anew, and stored again
    assert cache.load("sd1") is not None
    path.write_bytes(pickle.dumps({"family": "sd2"}))  # a bundle of another family under this name
    assert cache.load("sd1") is None


def test_only_the_newest_bundles_of_other_code_are_kept_and_off_means_off(folder, monkeypatch):
    folder.mkdir()
    olds = [folder / f"arch-{str(i) * 24}-sd1.pickle" for i in range(4)]
    for i, old in enumerate(olds):
        old.write_bytes(b"x")
        os.utime(old, (1_000_000 + i, 1_000_000 + i))  # the last is the newest
    other = folder / f"arch-{'0' * 24}-flux-kontext.pickle"  # another family's bundle is not touched
    other.write_bytes(b"x")
    _fresh("sd1").table  # noqa: B018
    assert [p.exists() for p in olds] == [False, False, True, True] and other.exists()
    monkeypatch.setenv("LORATOOL_CACHE_DIR", "off")
    assert cache.folder() is None and cache.load("sd1") is None


def test_an_unwritable_cache_is_no_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder would be")
    monkeypatch.setenv("LORATOOL_CACHE_DIR", str(blocker / "sub"))
    assert _fresh("sd2").table.modules


def test_the_digest_covers_the_arch_data(tmp_path):
    """A changed table file gives another digest: a copy of the package with one byte of a table changed."""
    import shutil

    import loratool

    copy = tmp_path / "pkg"
    shutil.copytree(os.path.dirname(loratool.__file__), copy / "loratool",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = "from loratool.arch import cache; print(cache.digest())"
    env = {**os.environ, "PYTHONPATH": str(copy)}
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                           cwd=tmp_path).stdout
    table = copy / "loratool" / "arch" / "data" / "sd1.json"
    table.write_text(table.read_text().replace('"name"', ' "name"', 1))
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                            cwd=tmp_path).stdout
    assert first.strip() and first != second

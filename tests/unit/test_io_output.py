"""The one output writer: atomic files and folders, --force, never an input, no two outputs on one path,
recognisable temporaries that a later write cleans up, failures that name the output."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loratool.errors import LoraToolError
from loratool.io import atomic
from loratool.io.output import TEMP_TAG, Outputs


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TEMP_TAG in p.name)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _old_folder(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "stale.txt").write_bytes(b"from an older run")
    (path / "sub" / "adapter.bin").write_bytes(b"old")
    return path


# -- files ----------------------------------------------------------------------------------------


def test_file_is_fsynced_and_renamed_into_place_at_the_end(tmp_path, monkeypatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    target = tmp_path / "f.bin"
    with Outputs().file(target) as fh:
        fh.write(b"abc")
        assert not target.exists() and len(_temps(tmp_path)) == 1  # nothing visible before the end
        assert fh.name == str(target)  # libraries picking a format from the name see the output's
    assert events[:2] == ["fsync", "replace"] and target.read_bytes() == b"abc" and _temps(tmp_path) == []


def test_failure_inside_the_block_keeps_the_old_file_or_nothing(tmp_path) -> None:
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(b"old contents")
    for target in (old, new):
        with pytest.raises(KeyboardInterrupt), Outputs(force=True).file(target) as fh:
            fh.write(b"half")
            raise KeyboardInterrupt
    assert old.read_bytes() == b"old contents" and not new.exists() and _temps(tmp_path) == []


def test_a_failed_write_is_one_line_naming_the_output(tmp_path, monkeypatch) -> None:
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(LoraToolError) as e:
        Outputs(force=True).write_bytes(target, b"new")
    assert e.value.one_line() == f"{target}: cannot write: No space left on device"
    assert target.read_bytes() == b"old" and _temps(tmp_path) == []


@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_full_disk_mid_write_leaves_the_old_output(tmp_path, what) -> None:
    """A real write(2) failure (the file-size limit: EFBIG), in a child process."""
    target = tmp_path / "out"
    if what == "file":
        target.write_bytes(b"old")
    else:
        _old_folder(target)
    before = _tree(tmp_path)
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from loratool.errors import LoraToolError
        from loratool.io.output import Outputs
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        out = Outputs(force=True)
        try:
            if {what!r} == "file":
                out.write_bytes({str(target)!r}, b"x" * (1 << 20))
            else:
                with out.folder({str(target)!r}) as f:
                    f.write_bytes("a.bin", b"small")
                    f.write_bytes("b.bin", b"x" * (1 << 20))
        except LoraToolError as e:
            print(e.one_line())
            sys.exit(3)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 3, res.stderr
    assert res.stdout.strip().startswith(f"{target}") and "cannot write: File too large" in res.stdout
    assert _tree(tmp_path) == before and _temps(tmp_path) == []


def test_new_file_gets_the_usual_mode_and_a_replaced_file_keeps_its_own(tmp_path) -> None:
    mask = os.umask(0o022)
    try:
        new = Outputs().write_bytes(tmp_path / "m.bin", b"x")
        kept = tmp_path / "k.bin"
        kept.write_bytes(b"x")
        kept.chmod(0o640)
        Outputs(force=True).write_bytes(kept, b"y")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(new.stat().st_mode) == 0o644 and stat.S_IMODE(kept.stat().st_mode) == 0o640


def test_json_and_figures(tmp_path) -> None:
    out = Outputs()
    out.write_json(tmp_path / "r.json", {"b": 1, "a": [1, 2]}, indent=1)
    assert json.loads((tmp_path / "r.json").read_text()) == {"b": 1, "a": [1, 2]}
    plt = pytest.importorskip("matplotlib.pyplot")
    fig = plt.figure()
    out.save_figure(tmp_path / "p.png", fig)
    plt.close(fig)
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")


# -- --force, inputs, clashes ----------------------------------------------------------------------


def test_existing_output_needs_force_an_empty_folder_does_not(tmp_path) -> None:
    target, folder, empty = tmp_path / "o.bin", tmp_path / "peft", tmp_path / "empty"
    target.write_bytes(b"keep")
    _old_folder(folder)
    empty.mkdir()
    for path, is_folder in ((target, False), (folder, True)):
        with pytest.raises(LoraToolError, match=r"output exists \(use --force to overwrite\)") as e:
            Outputs().claim(path, folder=is_folder)
        assert str(path) in str(e.value)
        Outputs(force=True).claim(path, folder=is_folder)
    Outputs().claim(empty, folder=True)
    assert target.read_bytes() == b"keep"


def test_kinds_and_missing_folders_are_refused(tmp_path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(LoraToolError, match="output is a folder"):
        Outputs(force=True).claim(tmp_path / "d")
    with pytest.raises(LoraToolError, match="exists and is not a folder"):
        Outputs(force=True).claim(tmp_path / "f", folder=True)
    with pytest.raises(LoraToolError, match="folder does not exist"):
        Outputs().claim(tmp_path / "nope" / "x.bin")


def test_a_symlink_loop_is_one_line(tmp_path) -> None:
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    with pytest.raises(LoraToolError, match="symlink loop") as e:
        Outputs().claim(tmp_path / "a" / "x.bin")
    assert "\n" not in e.value.one_line()
    Outputs([tmp_path / "a"]).write_bytes(tmp_path / "ok.bin", b"x")  # such an input is its reader's problem


def test_never_an_input_by_any_spelling(tmp_path, monkeypatch) -> None:
    src = tmp_path / "in.safetensors"
    src.write_bytes(b"input")
    (tmp_path / "sub").mkdir()
    os.symlink(src, tmp_path / "link.safetensors")
    os.link(src, tmp_path / "hard.safetensors")
    monkeypatch.chdir(tmp_path)
    spellings = [src, "in.safetensors", "./sub/../in.safetensors", tmp_path / "link.safetensors",
                 tmp_path / "hard.safetensors"]
    for out in spellings:
        with pytest.raises(LoraToolError, match="refusing to overwrite an input"):
            Outputs([src], force=True).write_bytes(out, b"x")
        with pytest.raises(LoraToolError, match="refusing to overwrite an input"):
            Outputs([out], force=True).write_bytes(src, b"x")
    assert src.read_bytes() == b"input"


def test_inside_an_input_folder_or_a_folder_holding_an_input(tmp_path) -> None:
    peft = tmp_path / "peft"
    _old_folder(peft)
    with pytest.raises(LoraToolError, match="inside an input folder"):
        Outputs([peft], force=True).claim(peft / "adapter_model.safetensors")
    with pytest.raises(LoraToolError, match="inside an input folder"):
        Outputs([peft], force=True).claim(peft / "sub" / "new", folder=True)
    with pytest.raises(LoraToolError, match="folder that holds an input"):
        Outputs([peft / "stale.txt"], force=True).claim(peft, folder=True)
    with pytest.raises(LoraToolError, match="folder that holds an input"):
        Outputs([peft / "sub"], force=True).claim(tmp_path, folder=True)
    before = _tree(tmp_path)
    Outputs([peft / "stale.txt"], force=True).claim(peft, folder=True, in_place=True)  # a run folder is not replaced
    assert _tree(tmp_path) == before


def test_two_outputs_of_one_command_on_one_path_are_refused(tmp_path) -> None:
    out = Outputs()
    out.claim(tmp_path / "x.safetensors", "adapter")
    out.claim(tmp_path / "x.safetensors", "adapter")  # the same claim again: nothing new
    with pytest.raises(LoraToolError, match="the report and the adapter would be written to the same path"):
        out.claim(tmp_path / "x.safetensors", "report")
    with pytest.raises(LoraToolError, match="the embedding of s1 and the embedding of <s1>"):
        out.claim(tmp_path / "x.s1.safetensors", "embedding of <s1>")
        out.claim(tmp_path / "x.s1.safetensors", "embedding of s1")
    out.claim(tmp_path / "peft", "adapter", folder=True)
    with pytest.raises(LoraToolError, match="the plot would be written inside the adapter"):
        out.claim(tmp_path / "peft" / "plot.png", "plot")
    with pytest.raises(LoraToolError, match=r"the adapter \(.*x.safetensors\) would be written inside the copy"):
        out.claim(tmp_path, "copy", folder=True)
    assert list(tmp_path.iterdir()) == []  # claims write nothing


# -- folders ---------------------------------------------------------------------------------------


def _write_new(out: Outputs, folder: Path) -> None:
    with out.folder(folder) as f:
        f.write_bytes("adapter_model.safetensors", b"new weights")
        f.write_json("unet/adapter_config.json", {"r": 4})
        assert not (folder / "adapter_model.safetensors").exists()  # nothing visible before the end


@pytest.mark.parametrize("exchange", [True, False])
def test_a_folder_is_replaced_as_a_whole(tmp_path, monkeypatch, exchange) -> None:
    folder = _old_folder(tmp_path / "peft")
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # file systems without RENAME_EXCHANGE
    _write_new(Outputs(force=True), folder)
    assert _tree(folder) == {"adapter_model.safetensors": b"new weights", "unet/adapter_config.json": b'{"r": 4}\n'}
    assert _temps(tmp_path) == []


def test_a_failed_folder_keeps_the_old_one_or_leaves_nothing(tmp_path) -> None:
    old = _old_folder(tmp_path / "old")
    before = _tree(tmp_path)
    for target in (old, tmp_path / "new"):
        with pytest.raises(RuntimeError), Outputs(force=True).folder(target) as f:
            f.write_bytes("a.bin", b"half")
            raise RuntimeError("interrupted")
    assert _tree(tmp_path) == before and not (tmp_path / "new").exists() and _temps(tmp_path) == []


def test_names_inside_a_folder_stay_inside(tmp_path) -> None:
    with Outputs().folder(tmp_path / "f") as f:
        for bad in ("../escape", "/abs"):
            with pytest.raises(LoraToolError, match="not a name inside the output folder"):
                f.write_bytes(bad, b"x")
        assert f.copy(__file__, "copy.py") == tmp_path / "f" / "copy.py"
    assert (tmp_path / "f" / "copy.py").read_bytes() == Path(__file__).read_bytes()


def test_a_run_folder_is_written_in_place(tmp_path) -> None:
    run = _old_folder(tmp_path / "run")
    with pytest.raises(LoraToolError, match="output exists"):
        Outputs().claim(run, "output folder", folder=True, in_place=True)
    resume = run / "checkpoint-final"
    resume.mkdir()
    out = Outputs([resume], force=True)
    out.claim(run, "output folder", folder=True, in_place=True)
    with pytest.raises(LoraToolError, match="refusing to overwrite an input"):
        out.claim(resume, "checkpoint", folder=True)
    out.write_bytes(run / "samples" / "step_1.png", b"png")  # parents made inside a run folder
    with out.folder(run / "checkpoint-000002") as f:
        f.write_bytes("state.pt", b"s")
    assert (run / "samples" / "step_1.png").read_bytes() == b"png" and (run / "stale.txt").exists()
    fresh = Outputs()
    fresh.claim(tmp_path / "a" / "b", "output folder", folder=True, in_place=True)  # parents made on write
    fresh.write_bytes(tmp_path / "a" / "b" / "losses.json", b"[]")
    assert (tmp_path / "a" / "b" / "losses.json").exists()


# -- temporaries -----------------------------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_next_write_removes_temporaries_of_dead_processes(tmp_path) -> None:
    target = tmp_path / "x.safetensors"
    dead, prefix = _dead_pid(), f".x.safetensors{TEMP_TAG}"
    (tmp_path / f"{prefix}{dead}-0000aaaa").write_bytes(b"half a file")
    (tmp_path / f"{prefix}{dead}-0000bbbb").mkdir()
    (tmp_path / f"{prefix}{dead}-0000bbbb" / "half").write_bytes(b"")
    live = tmp_path / f"{prefix}{os.getpid()}-0000cccc"  # a write in flight (this process): kept
    live.write_bytes(b"")
    other = tmp_path / f".y.safetensors{TEMP_TAG}{dead}-0000dddd"  # another output's: kept
    other.write_bytes(b"")
    Outputs().write_bytes(target, b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, target.name])


def test_temporary_names_stay_short_enough(tmp_path) -> None:
    name = "é" * 120 + ".safetensors"  # 252 bytes: a temporary with the whole name would be too long
    assert Outputs().write_bytes(tmp_path / name, b"x").read_bytes() == b"x"

"""Faults at the output writer, and the grey cases of issue 14 (a full disk, an I/O error, kill -9 between
the temporary and the rename, two writers of one output, an input changed while it is read).

Every case asserts the same thing: the output path holds its old bytes, nothing, or a complete valid new
file; no temporary stays behind (or, after kill -9, one with a recognisable name that the next write to
that output removes); every input is byte-identical afterwards.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hostile_inputs import (
    CODE,
    check_refused,
    invoke,
    kohya_tensors,
    run_process,
    save,
    snapshot,
    temporaries,
)
from safetensors.torch import load_file

from loratool.io import atomic

COMMANDS = {  # name -> (args after the input, whether the output is a folder)
    "convert": (["convert", "{src}", "--to", "diffusers", "-o", "{out}"], False),
    "convert to a peft folder": (["convert", "{src}", "--to", "peft", "-o", "{out}"], True),
    "scale": (["scale", "{src}", "0.5", "-o", "{out}"], False),
    "resize with a report": (["resize", "{src}", "-r", "2", "-o", "{out}", "--report", "{out}.json"], False),
}


def _args(name: str, src: Path, out: Path) -> list[str]:
    return [a.format(src=src, out=out) for a in COMMANDS[name][0]]


def _old_output(out: Path, folder: bool) -> None:
    if folder:
        out.mkdir()
        (out / "adapter_model.safetensors").write_bytes(b"old weights")
        (out / "stale.bin").write_bytes(b"old")
    else:
        out.write_bytes(b"old output")


class _FailingFile(io.FileIO):
    """A file whose writes fail with ``ERRNO`` once 4 KiB have gone through (a disk that fills up)."""

    ERRNO = errno.ENOSPC

    def write(self, data) -> int:  # type: ignore[override]
        written = getattr(self, "_written", 0)
        if written + len(data) > 4096:
            raise OSError(self.ERRNO, os.strerror(self.ERRNO))
        self._written = written + len(data)
        return super().write(data)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_failing_disk_leaves_the_old_output(command, err, tmp_path, monkeypatch) -> None:
    src = save(tmp_path / "in.safetensors", kohya_tensors(seed=4, rank=8))
    out = tmp_path / ("out" if COMMANDS[command][1] else "out.safetensors")
    _old_output(out, COMMANDS[command][1])
    before = snapshot([src, out])
    monkeypatch.setattr(_FailingFile, "ERRNO", err)
    monkeypatch.setattr(atomic.io, "FileIO", _FailingFile)
    result = invoke(*_args(command, src, out), "--force")
    line = check_refused(result, inputs=[src, out], before=before, names=[out.name])
    assert os.strerror(err) in line, line
    assert not Path(f"{out}.json").exists()


def _checkpoint_pair(folder: Path) -> tuple[Path, Path]:
    """An SD1.5-keyed base/tuned pair whose attention and conv weights changed (a streamed kohya output)."""
    import torch

    gen = torch.Generator().manual_seed(9)
    keys = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
            "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
            "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn1.to_q.weight": (1280, 1280)}
    base = {k: torch.randn(*shape, generator=gen).half() for k, shape in keys.items()}
    tuned = {k: (v.float() + 0.05 * torch.randn(*v.shape, generator=gen)).half() for k, v in base.items()}
    return save(folder / "base.safetensors", base), save(folder / "tuned.safetensors", tuned)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_a_disk_failing_while_extract_streams_leaves_the_old_output(err, tmp_path, monkeypatch) -> None:
    """extract writes its kohya file while the modules are made (on the writer thread): a write that fails
    there is the same one-line error, the old output stays, no temporary is left."""
    base, tuned = _checkpoint_pair(tmp_path)
    out = tmp_path / "out.safetensors"
    _old_output(out, False)
    before = snapshot([base, tuned, out])
    monkeypatch.setattr(_FailingFile, "ERRNO", err)
    monkeypatch.setattr(atomic.io, "FileIO", _FailingFile)
    result = invoke("extract", str(base), str(tuned), "-r", "4", "--targets", "attn+conv", "-o", str(out), "--force")
    line = check_refused(result, inputs=[base, tuned, out], before=before, names=[out.name])
    assert os.strerror(err) in line, line


_KILL_AT_COMMIT = """
import os, signal, sys
from loratool.io import atomic
{patch}
from loratool.cli.main import main
sys.argv = ["loratool", *sys.argv[1:]]
main()
"""
_PATCHES = {  # kill -9 after the temporary is complete, just before it would be renamed into place
    False: "atomic.os.replace = lambda a, b: os.kill(os.getpid(), signal.SIGKILL)",
    True: "atomic._swap_in = lambda a, b: os.kill(os.getpid(), signal.SIGKILL)",
}


def _child(code: str, *args: object) -> subprocess.CompletedProcess:
    # no family-table cache: its first store is an atomic rename too, which the patch would kill instead
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(CODE), "LORATOOL_CACHE_DIR": "off"})


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
def test_kill_9_before_the_rename_keeps_the_old_output_and_the_next_write_cleans_up(folder, tmp_path) -> None:
    command = "convert to a peft folder" if folder else "convert"
    src = save(tmp_path / "in.safetensors", kohya_tensors(seed=5))
    out = tmp_path / ("out" if folder else "out.safetensors")
    _old_output(out, folder)
    before = snapshot([src, out])
    killed = _child(_KILL_AT_COMMIT.format(patch=_PATCHES[folder]), *_args(command, src, out)[:], "--force")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert snapshot([src, out]) == before  # old output intact
    left = temporaries(tmp_path)
    assert left and all(name.startswith(f".{out.name}.loratool-tmp-") for name in left), left
    again = run_process(*_args(command, src, out), "--force")
    assert again.returncode == 0, again.stderr
    assert temporaries(tmp_path) == []
    weights = out / "adapter_model.safetensors" if folder else out
    assert load_file(weights) and (not folder or not (out / "stale.bin").exists())
    assert snapshot([src]) == {str(src): before[str(src)]}


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
def test_two_writers_of_one_output_leave_one_complete_result(folder, tmp_path) -> None:
    src = save(tmp_path / "in.safetensors", kohya_tensors(seed=6, rank=8))
    out = tmp_path / ("out" if folder else "out.safetensors")
    fmt = "peft" if folder else "diffusers"
    procs = [subprocess.Popen([sys.executable, "-m", "loratool", "scale", str(src), str(s), "--to", fmt, "-o",
                               str(out), "--force", "-q"], env={**os.environ, "PYTHONPATH": str(CODE)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in ("0.5", "2")]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in results] == [0, 0], results
    assert temporaries(tmp_path) == []
    weights = out / "adapter_model.safetensors" if folder else out
    assert len(load_file(weights)) > 0
    expected = []
    for s in ("0.5", "2"):  # the winner is one of the two results, byte for byte
        alone = tmp_path / f"alone{s}" / out.name
        alone.parent.mkdir()
        assert invoke("scale", src, s, "--to", fmt, "-o", alone, "-q").exit_code == 0
        expected.append(snapshot([alone / "adapter_model.safetensors" if folder else alone]).popitem()[1])
    assert weights.read_bytes() in expected


_CHANGE_INPUT = """
import os, sys
from loratool.io import atomic
src, how = sys.argv[1], sys.argv[2]
real_write = atomic._OutputFile.write
def write(self, data):
    if os.path.getsize(src) > 64:
        if how == "truncate":
            os.truncate(src, 64)
        else:  # same size, new bytes (another program rewrote it in place)
            with open(src, "r+b") as fh:
                fh.seek(os.path.getsize(src) - 8)
                fh.write(b"\\x01" * 8)
    return real_write(self, data)
atomic._OutputFile.write = write
from loratool.cli.main import main
sys.argv = ["loratool", *sys.argv[3:]]
main()
"""


@pytest.mark.parametrize(("command", "how"), [("convert", "truncate"), ("resize with a report", "truncate"),
                                            ("scale", "rewrite")])
def test_an_input_changed_while_read_is_one_line_and_no_output(command, how, tmp_path) -> None:
    src = save(tmp_path / "in.safetensors", kohya_tensors(seed=7, rank=8))
    out = tmp_path / "out.safetensors"
    result = _child(_CHANGE_INPUT, src, how, *_args(command, src, out))
    line = check_refused(result, inputs=[src], outputs=[out, Path(f"{out}.json")], names=[src.name])
    assert "changed" in line or "truncated" in line or "cut short" in line, line


def test_faults_leave_no_temporaries_in_a_subprocess_killed_at_random(tmp_path) -> None:
    """SIGKILL at fixed moments during a write: the output is old or complete new, never half."""
    src = save(tmp_path / "in.safetensors", kohya_tensors(seed=8, rank=16))
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old output")
    ref = tmp_path / "ref" / out.name  # the same name: the bytes written depend on it
    ref.parent.mkdir()
    assert invoke("convert", src, "--to", "diffusers", "-o", ref, "-q").exit_code == 0
    new = ref.read_bytes()
    script = textwrap.dedent("""
        import os, signal, sys
        from loratool.io import atomic
        n = int(sys.argv[1]); calls = [0]
        real = atomic._OutputFile.write
        def write(self, data):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, data)
        atomic._OutputFile.write = write
        from loratool.cli.main import main
        sys.argv = ["loratool", *sys.argv[2:]]
        main()
    """)
    for n in (1, 3):
        r = _child(script, n, "convert", src, "--to", "diffusers", "-o", out, "--force", "-q")
        assert out.read_bytes() in (b"old output", new), (n, r.returncode)
    r = run_process("convert", src, "--to", "diffusers", "-o", out, "--force", "-q")
    assert r.returncode == 0 and out.read_bytes() == new and temporaries(tmp_path) == []

"""Streaming checkpoint rewrite for ``merge``: header first, then tensor by tensor.

Every shape and dtype of the output is known before a byte is written (a merge changes values, never
layouts), so the header is written first and the data follows in the input's order. Runs of untouched
tensors are copied byte for byte with ``copy_file_range`` (the kernel moves the pages; they never
enter this process), and only a changed tensor is read — with plain reads, not a memory map, so
the pages it touched do not stay in the process — changed in float32 and written. Peak memory is
one layer, whatever the checkpoint's size. The output goes through ``io.output``: a single file is
written to a temporary and renamed; a diffusers folder is built beside its destination and swapped in.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from loratool.errors import LoraToolError
from loratool.io.metadata import loratool_keys
from loratool.io.output import FolderWriter, Outputs
from loratool.io.safetensors import DTYPES, SafetensorsFile, TensorInfo
from loratool.io.writer import header_bytes, tensor_bytes
from loratool.ops.merge import Application, MergePlan, apply_to_tensor, plan_merge
from loratool.ops.mix import MixInput

Progress = Callable[[int], None]  # called with the number of bytes just written
_CHUNK = 16 << 20
_LOOKAHEAD = 2  # changed tensors computed ahead of the writer (bounds memory to a few layers)


@dataclass
class _Run:
    start: int = 0
    end: int = 0


def _read_tensor(fd: int, f: SafetensorsFile, info: TensorInfo) -> torch.Tensor:
    """One tensor read with ``pread`` into its own buffer (thread-safe: no shared file position)."""
    buf = bytearray(info.nbytes)
    if os.preadv(fd, [buf], f.data_start + info.begin) != info.nbytes:
        raise LoraToolError(f"tensor {info.name} is cut short", f.path)
    dtype = DTYPES[info.dtype][0]
    if dtype is None or not dtype.is_floating_point:
        raise LoraToolError(f"tensor {info.name} has dtype {info.dtype}; only float weights can be merged", f.path)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(info.shape)


def _merged(fd: int, f: SafetensorsFile, info: TensorInfo, apps: list[Application],
            device: torch.device | None) -> torch.Tensor:
    tensor = _read_tensor(fd, f, info)
    try:
        return apply_to_tensor(tensor.to(device) if device is not None else tensor, apps).cpu()
    except LoraToolError as e:
        raise LoraToolError(f"{info.name}: {e.message}", f.path) from None


def _merged_in_order(fd: int, f: SafetensorsFile, targets: list[TensorInfo], changes: dict[str, list[Application]],
                     device: torch.device | None) -> Iterator[torch.Tensor]:
    """The changed tensors in file order, computed by one worker thread a few tensors ahead, so that
    reading and the float32 math overlap with the byte copies of the main thread."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: deque = deque()
        todo = iter(targets)

        def submit() -> None:
            info = next(todo, None)
            if info is not None:
                pending.append(pool.submit(_merged, fd, f, info, changes[info.name], device))

        for _ in range(_LOOKAHEAD):
            submit()
        while pending:
            future = pending.popleft()
            submit()
            yield future.result()


def _copy_range(src_fd: int, dst, offset: int, length: int) -> None:
    """Copy ``length`` bytes at ``offset`` of ``src_fd`` to the end of the open file ``dst``."""
    dst.flush()
    dst_fd = dst.fileno()
    while length > 0:
        try:
            n = os.copy_file_range(src_fd, dst_fd, min(length, 1 << 30), offset)
        except (OSError, AttributeError):
            n = 0
        if n <= 0:  # not supported here (or across file systems): plain reads
            data = os.pread(src_fd, min(length, _CHUNK), offset)
            if not data:
                raise LoraToolError("the checkpoint ended early while copying")
            dst.write(data)
            dst.flush()
            n = len(data)
        offset += n
        length -= n


def rewrite_file(src: Path, dst_fh, changes: dict[str, list[Application]], metadata: dict[str, str] | None,
                 device: torch.device | None = None, progress: Progress | None = None) -> int:
    """Write ``src`` to the open ``dst_fh`` with ``changes`` applied; returns the tensors changed."""
    with SafetensorsFile(src) as f, open(src, "rb") as fh:
        infos = sorted(f.tensors.values(), key=lambda i: i.begin)
        meta = dict(f.metadata) if metadata is None else metadata
        dst_fh.write(header_bytes([(i.name, i.dtype, i.shape, i.nbytes) for i in infos], meta))
        run, src_fd, changed = _Run(), fh.fileno(), 0
        targets = [i for i in infos if changes.get(i.name)]
        merged = _merged_in_order(src_fd, f, targets, changes, device)

        def flush() -> None:
            if run.end > run.start:
                _copy_range(src_fd, dst_fh, f.data_start + run.start, run.end - run.start)
                if progress:
                    progress(run.end - run.start)
            run.start = run.end = 0

        try:
            for info in infos:
                if not changes.get(info.name):
                    if run.end != info.begin or run.end == run.start:
                        flush()
                        run.start = info.begin
                    run.end = info.end
                    continue
                flush()
                dst_fh.write(tensor_bytes(next(merged)))
                changed += 1
                if progress:
                    progress(info.nbytes)
            flush()
        finally:
            merged.close()
    return changed


def _list_files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        out.extend(Path(dirpath, n) for n in sorted(filenames))
    return out


def file_keys(checkpoint: Path) -> tuple[dict[str, set[str]], dict[str, tuple[int, ...]]]:
    """Tensor names per file (``""`` for a single file) and ``{component-qualified key: shape}``."""
    if not checkpoint.is_dir():
        with SafetensorsFile(checkpoint) as f:
            return {"": set(f.keys())}, {k: i.shape for k, i in f.tensors.items()}
    keys: dict[str, set[str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for p in _list_files(checkpoint):
        if p.name.endswith(".safetensors"):
            rel = p.relative_to(checkpoint).as_posix()
            with SafetensorsFile(p) as f:
                keys[rel] = set(f.keys())
                comp = rel.split("/")[0]
                shapes.update({f"{comp}.{k}": i.shape for k, i in f.tensors.items()})
    if not keys:
        raise LoraToolError("no .safetensors files in this folder (a diffusers model folder is expected)", checkpoint)
    return keys, shapes


def detect_arch(checkpoint: Path, shapes: dict[str, tuple[int, ...]]) -> str:
    try:
        from loratool.arch import detect_arch_from_checkpoint
    except ImportError:
        return "unknown"
    return detect_arch_from_checkpoint(shapes)


def _write_folder(src: Path, out: FolderWriter, plan: MergePlan, params: dict, device, progress) -> int:
    """Every file of the folder ``src`` into ``out``: the changed ones rewritten, the rest copied."""
    changed = 0
    for p in _list_files(src):
        rel = p.relative_to(src).as_posix()
        changes = plan.files.get(rel)
        if changes:
            with out.file(rel) as fh:
                changed += rewrite_file(p, fh, changes, _with_keys(p, params), device, progress)
        else:
            out.copy(p, rel)
    return changed


def _with_keys(path: Path, params: dict) -> dict[str, str]:
    with SafetensorsFile(path) as f:
        meta = dict(f.metadata)
    meta.update(loratool_keys("merge", params))
    return meta


def merge_checkpoint(checkpoint: str | os.PathLike[str], inputs: list[MixInput],
                     output: str | os.PathLike[str] | None, *, arch: str | None = None,
                     allow_unmatched: bool = False, dry_run: bool = False, force: bool = False,
                     device: torch.device | None = None, progress: Progress | None = None,
                     outputs: Outputs | None = None) -> dict:
    """Bake ``inputs`` into ``checkpoint`` (a single file or a diffusers folder) and write ``output``.

    The output (a file, or a folder replaced as a whole) goes through ``outputs`` (the command's, which
    may have claimed it already); without one, through a fresh one of the checkpoint, the inputs' names
    and ``force``. Returns a report: arch, matched/unmatched module counts, tensors changed, output path.
    """
    src = Path(checkpoint)
    keys, shapes = file_keys(src)
    arch_name = arch or detect_arch(src, shapes)
    plan = plan_merge(inputs, keys, arch_name, folder=src.is_dir())
    report = plan.summary()
    if plan.unmatched and not allow_unmatched:
        shown = ", ".join(plan.unmatched[:8]) + (f" and {len(plan.unmatched) - 8} more" if len(plan.unmatched) > 8 else "")
        what = f"{arch_name} checkpoint weight" if arch_name not in ("unknown", "generic") else \
            "weight of this checkpoint (architecture not recognised: --arch sets it)"
        raise LoraToolError(f"{len(plan.unmatched)} LoRA module(s) match no {what}: {shown} "
                            "(--allow-unmatched skips them)", src)
    if dry_run or output is None:
        return report
    params = {"checkpoint": src.name, "arch": arch_name,
              "inputs": [f"{i.name}:{i.weight:g}" + (f":lbw={i.lbw}" if i.lbw else "") for i in inputs]}
    out = Path(output)
    if outputs is None:
        outputs = Outputs([src, *(i.name for i in inputs if i.name)], force=force)
    threads = torch.get_num_threads()
    if device is None or device.type == "cpu":
        # the worker thread's math already runs beside the copies; more intra-op threads only fight
        # the copy (and, on a busy machine, everything else) for the cores
        torch.set_num_threads(1)
    try:
        if src.is_dir():
            with outputs.folder(out) as folder:
                report["tensors_written"] = _write_folder(src, folder, plan, params, device, progress)
        else:
            with outputs.file(out) as fh:
                report["tensors_written"] = rewrite_file(src, fh, plan.files.get("", {}),
                                                         _with_keys(src, params), device, progress)
    finally:
        torch.set_num_threads(threads)
    report["output"] = str(out)
    return report

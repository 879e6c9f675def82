"""Streaming checkpoint rewrite for ``merge``: header first, then tensor by tensor.

Every shape and dtype of the output is known before a byte is written (a merge changes values, never
layouts), so the header is written first and the data follows in the input's order. Runs of untouched
tensors are copied byte for byte with ``copy_file_range`` (the kernel moves the pages; they never
enter this process), and only a changed tensor is read — through the checkpoint's tensor source
(:mod:`loratool.io.sources`: positional reads, no memory map, so the pages it touched do not stay
in the process) on a read-ahead thread — changed in float32 and written. Peak memory is a few
layers, whatever the checkpoint's size. The output goes through ``io.output``: a single file is
written to a temporary and renamed; a diffusers folder is built beside its destination and swapped in.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from loratool.errors import LoraToolError, examples
from loratool.io.dtypes import FLOAT_NAMES
from loratool.io.metadata import loratool_keys, skipped_metadata
from loratool.io.output import FolderWriter, Outputs
from loratool.io.prefetch import prefetch
from loratool.io.safetensors import SafetensorsFile, TensorInfo
from loratool.io.sources import SafetensorsSource, TensorSource, open_source
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


def _merged(src: SafetensorsSource, info: TensorInfo, apps: list[Application],
            device: torch.device | None) -> torch.Tensor:
    if info.dtype not in FLOAT_NAMES:
        raise LoraToolError(f"tensor {info.name} has dtype {info.dtype}; only float weights can be merged", src.path)
    tensor = src.read(info.name)
    try:
        return apply_to_tensor(tensor.to(device) if device is not None else tensor, apps).cpu()
    except LoraToolError as e:
        raise LoraToolError(f"{info.name}: {e.message}", src.path) from None


def _merged_in_order(src: SafetensorsSource, targets: list[TensorInfo], changes: dict[str, list[Application]],
                     device: torch.device | None) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
    """The changed tensors in file order, read and computed by one worker thread a few tensors
    ahead, so that reading and the float32 math overlap with the byte copies of the main thread."""
    return prefetch(targets, lambda info: _merged(src, info, changes[info.name], device), ahead=_LOOKAHEAD)


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
    with SafetensorsSource(src) as source:
        f = source.file
        infos = sorted(f.tensors.values(), key=lambda i: i.begin)
        meta = dict(f.metadata) if metadata is None else metadata
        dst_fh.write(header_bytes([(i.name, i.dtype, i.shape, i.nbytes) for i in infos], meta))
        run, src_fd, changed = _Run(), f.fileno(), 0
        targets = [i for i in infos if changes.get(i.name)]
        merged = _merged_in_order(source, targets, changes, device)

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
                dst_fh.write(tensor_bytes(next(merged)[1]))
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


def open_checkpoint(checkpoint: Path) -> TensorSource:
    """The checkpoint as a tensor source: a single safetensors file (the only kind a merge rewrites),
    or a diffusers folder whose safetensors files are rewritten one by one."""
    if not checkpoint.is_dir():
        return SafetensorsSource(checkpoint)
    source = open_source(checkpoint)
    if source.kind not in ("diffusers", "component"):
        source.close()
        raise LoraToolError(f"a folder holding a {source.kind} adapter, not a model to merge into", checkpoint)
    return source


def file_keys(source: TensorSource, root: Path) -> dict[str, set[str]]:
    """Tensor names per safetensors file of ``source`` (``""`` for a single file, else the file's path
    relative to the folder ``root``); weights in other containers (``.bin``) cannot be rewritten."""
    if isinstance(source, SafetensorsSource):
        return {"": set(source.keys())}
    keys: dict[str, set[str]] = {}
    for key in source.keys():
        file, inner = source.location(key)
        if file.endswith(".safetensors"):
            keys.setdefault(Path(file).relative_to(root).as_posix(), set()).add(inner)
    if not keys:
        raise LoraToolError("no .safetensors files in this folder (a diffusers model folder is expected)", root)
    return keys


def _detect_arch(source: TensorSource) -> str:
    from loratool.arch import detect_arch_from_checkpoint

    return detect_arch_from_checkpoint(source.shapes())


def _write_folder(src: Path, out: FolderWriter, plan: MergePlan, params: dict, device, progress,
                  extra: dict[str, str]) -> int:
    """Every file of the folder ``src`` into ``out``: the changed ones rewritten, the rest copied."""
    changed = 0
    for p in _list_files(src):
        rel = p.relative_to(src).as_posix()
        changes = plan.files.get(rel)
        if changes:
            with out.file(rel) as fh:
                changed += rewrite_file(p, fh, changes, _with_keys(p, params, extra), device, progress)
        else:
            out.copy(p, rel)
    return changed


def _with_keys(path: Path, params: dict, extra: dict[str, str]) -> dict[str, str]:
    with SafetensorsFile(path) as f:
        meta = dict(f.metadata)
    meta.update(loratool_keys("merge", params))
    meta.update(extra)
    return meta


def _check_matches(plan: MergePlan, arch_name: str, allow_unmatched: bool, src: Path) -> None:
    """Refuse a merge that would change nothing, or skip modules without ``--allow-unmatched``: in one
    short line (counts and two module names)."""
    what = f"{arch_name} checkpoint" if arch_name not in ("unknown", "generic") else "checkpoint"
    hint = "" if arch_name not in ("unknown", "generic") else " (architecture not recognised: --arch sets it)"
    names = [entry.rsplit(": ", 1)[-1] for entry in plan.unmatched]
    total = len(plan.matched) + len(plan.unmatched)
    counted = f"{len(plan.unmatched)} of {total} LoRA modules match no {what} weight{hint} (e.g. {examples(names)})"
    if not plan.matched:
        raise LoraToolError(f"{counted}: nothing to merge; is the LoRA for another model?", src)
    if plan.unmatched and not allow_unmatched:
        raise LoraToolError(f"{counted}; is the LoRA for this model? --allow-unmatched skips them "
                            "(--dry-run --allow-unmatched -v lists them)", src)


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
    from loratool.arch import checkpoint_table

    src = Path(checkpoint)
    with open_checkpoint(src) as source:
        keys = file_keys(source, src)
        arch_name = arch or _detect_arch(source)
        table = checkpoint_table(arch_name, source.shapes())  # a family of rules at the checkpoint's sizes
    plan = plan_merge(inputs, keys, arch_name, folder=src.is_dir(), table=table)
    report = plan.summary()
    _check_matches(plan, arch_name, allow_unmatched, src)
    skipped = [(entry, "matches no weight of the checkpoint") for entry in plan.unmatched]
    if dry_run or output is None:
        return report
    params = {"checkpoint": src.name, "arch": arch_name,
              "inputs": [f"{i.name}:{i.weight:g}" + (f":lbw={i.lbw}" if i.lbw else "") for i in inputs]}
    extra = skipped_metadata(skipped)
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
                report["tensors_written"] = _write_folder(src, folder, plan, params, device, progress, extra)
        else:
            with outputs.file(out) as fh:
                report["tensors_written"] = rewrite_file(src, fh, plan.files.get("", {}),
                                                         _with_keys(src, params, extra), device, progress)
    finally:
        torch.set_num_threads(threads)
    report["output"] = str(out)
    return report

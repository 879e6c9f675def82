"""An extraction written to its output file: streamed module by module where the layout allows, else whole.

The command and the benchmarks both go through :func:`extract_to`, so that what is measured is what
users run. A kohya-style file (:func:`loratool.formats.stream.streams`) is opened before the first
module is made and each module's tensors are checked, hashed and written on a worker thread behind the
work that makes the next (:mod:`loratool.formats.stream`); the header, known last, goes into room
reserved for the largest adapter the plan can give. Other layouts are written whole at the end by
:func:`loratool.formats.write.write_adapter`. Either way the file appears, complete, only when all went
well (:class:`loratool.io.output.Outputs`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from loratool.ops.extract import ExtractResult, Progress, extract, outline, warm_start
from loratool.ops.extract_plan import ExtractOptions, Plan, plan_extract
from loratool.ops.extract_report import report_room
from loratool.ops.extract_stream import StageClock

if TYPE_CHECKING:
    from loratool.formats.stream import AdapterStream
    from loratool.io.output import Outputs

REPORT_KEY = "loratool.extract_report"


def extract_to(base: str | os.PathLike[str], tuned: str | os.PathLike[str], options: ExtractOptions,
               output: str | os.PathLike[str], fmt: str, outputs: Outputs, *,
               metadata: Mapping[str, str] | None = None, plan: Plan | None = None, progress: Progress | None = None,
               writer_args: Callable[[ExtractResult], dict] | None = None,
               stream: bool = True, clock: StageClock | None = None) -> tuple[ExtractResult, Path]:
    """Extract ``tuned − base`` into ``output`` (claimed in ``outputs``) in layout ``fmt``, with ``metadata``
    and the compact report under ``loratool.extract_report``. ``writer_args(result)``: extra
    ``write_adapter`` arguments for a layout written whole (peft's embeddings and config); ``stream=False``
    writes a kohya-style file whole too (the benchmarks' comparison).
    The profile gains ``write_s`` (after the last module: the rest of the file, fsync and rename) and, when
    streamed, ``write_busy_s`` (the writer thread's time, overlapped; ``write_busy``: by step) and ``streamed`` (False when what
    was streamed could not stand and the file was written again); ``clock`` as for :func:`extract`."""
    warm_start(options.device)  # the GPU's kernels load while the plan and the stream are made
    plan = plan or plan_extract(base, tuned, options)
    meta = dict(metadata or {})
    with _stream(outputs, output, fmt, plan, meta, stream) as into:
        result = extract(base, tuned, options, progress, plan=plan, sink=into.add if into else None, clock=clock)
        t0 = time.perf_counter()
        meta[REPORT_KEY] = result.compact_report()
        if into is not None:
            streamed = into.finish(result.adapter, meta)
            result.profile.update(write_busy_s=round(into.busy_s, 4), write_busy=into.busy_parts, streamed=streamed)
            path = Path(output)
        else:
            from loratool.formats.write import write_adapter

            path = write_adapter(result.adapter, output, fmt, metadata=meta, outputs=outputs,
                                 **(writer_args(result) if writer_args else {}))
    result.profile["write_s"] = round(time.perf_counter() - t0, 4)
    return result, path


@contextlib.contextmanager
def _stream(outputs: Outputs, output: str | os.PathLike[str], fmt: str, plan: Plan,
            meta: Mapping[str, str], wanted: bool) -> Iterator[AdapterStream | None]:
    """An adapter stream into ``output`` for a layout written module by module (when ``wanted``), else None."""
    from loratool.formats.stream import stream_adapter, streams

    if not (wanted and streams(fmt)):
        yield None
        return
    room = report_room([(m.key, m.shape, m.rank) for m in plan.modules])
    with stream_adapter(outputs, output, fmt, outline(plan), {**meta, REPORT_KEY: "x" * room}) as into:
        yield into

"""Benchmark: `loratool extract` beside the read floor, kohya's algorithm and mergekit, at full size.

One command per table: builds a base/tuned pair in a real key layout (bench/extract_pairs.py: SD1.5,
SDXL, SD3, Flux single files; Llama-3-8B- and Qwen2-0.5B-shaped HF folders), then runs each contender in
its own process on the same files (page cache warm for all: the files were just written, then flushed to
disk so that no contender's write waits behind theirs):

* floor    — loratool's reader alone (ops.extract_stream.stream_pairs: the same reader threads, pinned
             slots and host→device copies) over the same target weights; no math (not even the copy
             stream's bit comparison);
* loratool — ops.extract_write.extract_to in process, the command's path (a kohya file streamed as
             modules are made), with its stage profile (CUDA context made before the clock starts, as
             for every contender);
* whole    — the same with the kohya file written whole after the last module (as before streaming);
* command  — the whole `python -m loratool extract …` command, timed from outside (start-up included);
* kohya    — sd-scripts' extract_lora_from_models algorithm (reference/kohya.md §2.2: fp32 ΔW, full
             torch.linalg.svd, all of S in up, 0.99 quantile clamp) on every --stride-th module, its
             time scaled to all modules plus the floor's read time (an estimate: it says so); SD only;
* lycoris  — LyCORIS' extractor (PyPI lycoris-lora, lycoris.utils.extract_diff, its own venv) on the same
             subset, estimated the same way; SD only, when the venv exists;
* mergekit — `mergekit-extract-lora` (PyPI mergekit 0.1.5) from its own venv (bench/peers/setup.sh),
             whole command; LLM layouts only, when the venv exists.

``--tree NAME=DIR`` (a checkout of another revision, e.g. a ``git worktree``; repeatable) adds ``METHOD@NAME``
for each in-process contender (floor, loratool, whole; ``--tree-methods`` narrows them): the same run with DIR's ``loratool`` imported, on the
same files in the same call; ``--repeat N`` runs every in-process contender N times, interleaved, and keeps
the fastest (each row says how many it took).

Errors: ‖ΔW − up·down‖_F / ‖ΔW‖_F of each written adapter (factors as stored) on every --stride-th
module, over the Eckart–Young optimum from the exact singular values of the same ΔW.

    python bench/extract.py --layout sdxl --rank 64 --targets attn+conv --device cuda
    python bench/extract.py --layout qwen2-0.5b --rank 32 --device cpu --methods floor,loratool,command,mergekit
    python bench/extract.py --layout sdxl --rank 64 --targets attn+conv --methods floor,whole,loratool \
        --tree before=.dev/base --repeat 2
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract_pairs import LAYOUTS, is_llm, nbytes, write_pair  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _options(args):
    from loratool.linalg import SvdPolicy
    from loratool.ops.extract_plan import ExtractOptions

    return ExtractOptions(rank=args.rank, conv_rank=args.rank, targets=args.targets, device=args.device,
                          policy=SvdPolicy(niter=args.niter), arch="generic" if is_llm(args.layout) else None)


def _out(args, name: str) -> Path:
    return Path(args.workdir) / (name if is_llm(args.layout) else name + ".safetensors")


def run_floor(base: Path, tuned: Path, args) -> dict:
    from loratool.ops.extract_plan import build_plan, open_pair
    from loratool.ops.extract_stream import StageClock, stream_pairs

    nb, clock = 0, StageClock()
    # the reader's copies alone: no bit comparison on the copy stream (older trees make none)
    quiet = {"flags": False} if "flags" in inspect.signature(stream_pairs).parameters else {}
    with open_pair(base, tuned) as (b, t):
        plan = build_plan(b, t, _options(args))
        for pair in stream_pairs(b, t, plan.modules, torch.device(args.device), clock, **quiet):
            if pair.ready is not None:
                torch.cuda.current_stream().wait_event(pair.ready)
            nb += sum(x.numel() * x.element_size() for x in (pair.base, pair.tuned))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"bytes": nb, "modules": len(plan.modules), "profile": clock.as_dict()}


def run_loratool(base: Path, tuned: Path, args, stream: bool = True) -> dict:
    """The command's own path (ops.extract_write.extract_to: a kohya file streamed as modules come, a peft
    folder written whole), without the CLI around it; ``stream=False`` writes the kohya file whole after
    the last module (method ``whole``: the same run before streaming). The profile gains ``overlap``:
    how long reading and computing each ran (the union of their intervals) and both at once."""
    from loratool.io.output import Outputs
    from loratool.ops.extract_stream import StageClock
    from loratool.ops.extract_write import extract_to

    fmt = "peft" if is_llm(args.layout) else "kohya"
    extra = (lambda r: {"peft_embeddings": r.embedding_keys}) if fmt == "peft" else None
    clock = StageClock(spans=[])
    res, _ = extract_to(base, tuned, _options(args), _out(args, "loratool_out"), fmt,
                        Outputs([base, tuned], force=True), writer_args=extra, stream=stream, clock=clock)
    res.profile["overlap"] = overlap(clock.spans)
    return {"modules": res.summary["modules"], "planned": len(res.plan.modules), "profile": res.profile}


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def overlap(spans: list[tuple[str, float, float]]) -> dict:
    """Seconds during which some reader read, the consumer computed (``compute`` + ``sink``), both, and
    the consumer's first batch arrived."""
    read = _union([(a, b) for s, a, b in spans if s == "read"])
    work = _union([(a, b) for s, a, b in spans if s in ("compute", "sink")])
    both, i, j = 0.0, 0, 0
    while i < len(read) and j < len(work):
        both += max(0.0, min(read[i][1], work[j][1]) - max(read[i][0], work[j][0]))
        if read[i][1] < work[j][1]:
            i += 1
        else:
            j += 1
    first = min((a for s, a, _ in spans if s == "compute"), default=float("nan"))
    return {"read_s": round(sum(b - a for a, b in read), 3), "compute_s": round(sum(b - a for a, b in work), 3),
            "both_s": round(both, 3), "first_batch_s": round(first, 3),
            "last_read_s": round(read[-1][1], 3) if read else None}


def run_kohya(base: Path, tuned: Path, args) -> dict:
    """sd-scripts' per-module math on every --stride-th target; the time of the rest is scaled."""
    from loratool.io.weights import read_weight
    from loratool.ops.extract_plan import build_plan, open_pair

    with open_pair(base, tuned) as (b, t):
        plan = build_plan(b, t, _options(args))
        subset = plan.modules[::args.stride]
        spent, read = 0.0, 0.0
        for m in subset:
            t0 = time.perf_counter()
            mat = (read_weight(t, m.ref).float() - read_weight(b, m.ref).float()).to(args.device)
            read += time.perf_counter() - t0
            t0 = time.perf_counter()
            mat = mat.reshape(mat.shape[0], -1)
            rank = min(args.rank, *mat.shape)
            u, s, vh = torch.linalg.svd(mat)  # full_matrices=True, as kohya calls it
            up, down = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank, :]
            pooled = torch.cat([up.flatten(), down.flatten()])
            hi = float(torch.kthvalue(pooled.cpu(), max(1, int(0.99 * pooled.numel()))).values)
            up, down = up.clamp(-hi, hi).cpu(), down.clamp(-hi, hi).cpu()
            spent += time.perf_counter() - t0
    scale = len(plan.modules) / max(1, len(subset))
    return {"modules": len(plan.modules), "measured": len(subset), "svd_s": spent * scale, "estimate": True}


RUNNERS = {"floor": run_floor, "loratool": run_loratool, "kohya": run_kohya,
           "whole": lambda base, tuned, args: run_loratool(base, tuned, args, stream=False)}


def one(args) -> None:
    """Child process: run one contender, print one JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.zeros(1, device=args.device)  # context creation is left out for every in-process contender
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = RUNNERS[args.one](Path(args.base), Path(args.tuned), args)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    use = resource.getrusage(resource.RUSAGE_SELF)
    result.update(wall_s=time.perf_counter() - t0, cpu_s=use.ru_utime + use.ru_stime, rss_gib=use.ru_maxrss / 2**20,
                  gpu_gib=torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else 0.0)
    print("RESULT " + json.dumps(result))


IN_PROCESS = ("floor", "loratool", "whole")


def child(method: str, base: Path, tuned: Path, args) -> dict:
    """One in-process contender in a fresh interpreter; ``METHOD@NAME`` imports ``loratool`` from ``--tree NAME=DIR``."""
    method, _, tree = method.partition("@")
    env = None
    if tree:
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(args.trees[tree]).resolve()), *paths])}
    cmd = [sys.executable, __file__, "--one", method, "--base", str(base), "--tuned", str(tuned),
           "--layout", args.layout, "--rank", str(args.rank), "--targets", args.targets, "--device", args.device,
           "--workdir", str(args.workdir), "--niter", str(args.niter), "--threads", str(args.threads),
           "--stride", str(args.stride)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{method}{'@' + tree if tree else ''} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][7:])


def timed_command(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall s, the child's own peak RSS GiB) of a whole command."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            out.seek(0)
            err.seek(0)
            raise SystemExit(f"{cmd[0]} failed:\n{out.read()[-2000:].decode()}\n{err.read()[-4000:].decode()}")
    return wall, usage.ru_maxrss / 2**20


def run_command(base: Path, tuned: Path, args) -> dict:
    out, report = _out(args, "command_out"), Path(args.workdir) / "command_report.json"
    cmd = [sys.executable, "-m", "loratool", "extract", str(base), str(tuned), "-r", str(args.rank), "--targets",
           args.targets, "--conv-rank", str(args.rank), "--niter", str(args.niter), "--device", args.device,
           "-o", str(out), "--force", "-q", "--report", str(report)]
    if is_llm(args.layout):
        cmd += ["--arch", "generic", "--to", "peft"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    wall, rss = timed_command(cmd, env)
    rep = json.loads(report.read_text())
    return {"wall_s": wall, "rss_gib": rss, "modules": rep["summary"]["modules"], "profile": rep["profile"]}


def run_mergekit(base: Path, tuned: Path, args) -> dict:
    exe = Path(args.peer_venv) / "bin" / "mergekit-extract-lora"
    out = Path(args.workdir) / "mergekit_out"
    cmd = [str(exe), "--model", str(tuned), "--base-model", str(base), "--out-path", str(out),
           "--max-rank", str(args.rank)]
    if args.device.startswith("cuda"):
        cmd.append("--cuda")
    wall, rss = timed_command(cmd)
    return {"wall_s": wall, "rss_gib": rss, "modules": None}


def run_lycoris(base: Path, tuned: Path, args) -> dict:
    """LyCORIS' extract_diff (its own venv) on every --stride-th target; its time scaled like kohya's."""
    from loratool.ops.extract_plan import build_plan, open_pair

    with open_pair(base, tuned) as (b, t):
        plan = build_plan(b, t, _options(args))
    subset = plan.modules[::args.stride]
    spec = [{"name": m.key, "shape": list(m.shape), "segments": [[s.key, s.start, s.stop] for s in m.ref.segments]}
            for m in subset if not m.ref.transpose]
    listing = Path(args.workdir) / "lycoris_modules.json"
    listing.write_text(json.dumps(spec))
    cmd = [str(Path(args.peer_venv) / "bin" / "python"), str(REPO / "bench" / "peers" / "lycoris_extract.py"),
           "--base", str(base), "--tuned", str(tuned), "--modules", str(listing), "--rank", str(args.rank),
           "--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"lycoris failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    r = json.loads(lines[-1][7:])
    return {"modules": len(plan.modules), "measured": len(spec), "svd_s": r["seconds"] * len(plan.modules) / len(spec),
            "estimate": True, "err_opt": r["err_opt"]}


def errors(base: Path, tuned: Path, args, adapters: dict[str, Path]) -> dict[str, list[float]]:
    """err/opt per adapter on every --stride-th planned module (ΔW and optimum from the exact spectrum)."""
    from loratool.formats import read_adapter
    from loratool.io.weights import read_weight
    from loratool.ops.extract_plan import build_plan, open_pair

    read = {name: read_adapter(p).modules for name, p in adapters.items() if p.exists()}
    out: dict[str, list[float]] = {name: [] for name in read}
    dev = args.device
    with open_pair(base, tuned) as (b, t):
        plan = build_plan(b, t, _options(args))
        for m in plan.modules[::args.stride]:
            dt = torch.float64 if dev == "cpu" else torch.float32  # cuSOLVER's float32 SVD: accurate to ~1e-6·σ₁
            d = (read_weight(t, m.ref).to(dev, dt) - read_weight(b, m.ref).to(dev, dt)).reshape(m.matrix_shape)
            s = torch.linalg.svdvals(d).double()
            opt = float(s[m.rank:].square().sum().sqrt() / s.square().sum().sqrt())
            for name, mods in read.items():
                mod = mods.get(m.adapter_key)
                if mod is None or opt == 0:
                    continue
                got = mod.delta(dt).to(dev).reshape(d.shape)
                out[name].append(float((d - got).norm() / d.norm()) / opt)
    return out


def table(results: dict, errs: dict, args, gen_s: float, size: int) -> str:
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    floor = results.get("floor", {}).get("wall_s")
    for est in ("kohya", "lycoris"):  # the estimates: their SVDs scaled to all modules, plus reading (the floor)
        if est in results:
            results[est]["wall_s"] = results[est]["svd_s"] + (floor or 0.0)
    kohya = results.get("kohya")
    layers = f" ({args.layers} decoder layers)" if args.layers else ""
    lines = [f"extract {args.layout}{layers} rank {args.rank} --targets {args.targets} on {dev}; torch {torch.__version__}; "
             f"pair {size / 2**30:.2f} GiB (written in {gen_s:.0f} s); load average {os.getloadavg()[0]:.1f}", "",
             "| method | modules (extracted of planned) | wall s | × floor | × vs kohya (est.) | peak RSS GiB | peak GPU GiB | err/opt mean "
             "| err/opt worst |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in _with_trees(("loratool", "whole", "command", "floor", "kohya", "lycoris", "mergekit"), args):
        r = results.get(name)
        if r is None:
            continue
        e = errs.get(name) or r.get("err_opt") or errs.get("loratool" if name in ("command", "whole") else "", [])
        if "@" in name:
            e = []  # the error check reads this checkout's output only
        mean, worst = (sum(e) / len(e), max(e)) if e else (float("nan"), float("nan"))
        speed = f"{kohya['wall_s'] / r['wall_s']:.1f}" if kohya else "—"
        label = f"{name} (est., {r['measured']} of {r['modules']} modules measured)" if r.get("estimate") else name
        if r.get("runs", 1) > 1:
            label += f" (fastest of {r['runs']}: " + ", ".join(f"{w:.2f}" for w in r["walls"]) + ")"
        count = f"{r['modules']} of {r['planned']}" if r.get("planned") else r.get("modules") or "—"
        lines.append(f"| {label} | {count} | {r['wall_s']:.2f} | "
                     f"{r['wall_s'] / floor if floor else float('nan'):.2f} | {speed} | {r.get('rss_gib', 0):.2f} | "
                     f"{r.get('gpu_gib', 0):.2f} | {mean:.4f} | {worst:.4f} |")
    for name in _with_trees(("loratool", "whole", "command", "floor"), args):
        if "profile" in results.get(name, {}):
            lines.append(f"\n{name} profile: " + ", ".join(f"{k} {v}" for k, v in results[name]["profile"].items()))
    return "\n".join(lines)


def _with_trees(methods, args) -> list[str]:
    """Each method preceded by its runs under the other trees (``METHOD@NAME``), as the table lists them."""
    under = args.tree_methods.split(",")
    return [n for m in methods for n in [*(f"{m}@{t}" for t in args.trees if m in under), m]]


def _order(methods: list[str], args) -> list[str]:
    """The runs in order: each in-process contender --repeat times (beside its twins of the other trees),
    interleaved round by round so that machine load falls on all alike; the others once, after the first
    round."""
    inproc = _with_trees([m for m in methods if m in IN_PROCESS], args)
    rest = [m for m in methods if m not in IN_PROCESS]
    return inproc + rest + inproc * (args.repeat - 1)


def _fastest(old: dict | None, new: dict) -> dict:
    """The faster of two runs of one contender, with every run's wall seconds under ``walls``."""
    walls = [*(old or {}).get("walls", []), new["wall_s"]]
    best = new if old is None or new["wall_s"] < old["wall_s"] else old
    return {**best, "walls": walls, "runs": len(walls)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", choices=LAYOUTS, default="sd1")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--targets", default="transformer")  # kohya's LoRA set (the old "attn")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--niter", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--layers", type=int, default=None, help="LLM layouts: this many decoder layers")
    p.add_argument("--stride", type=int, default=8, help="kohya and the error check: every N-th module")
    p.add_argument("--methods", default="floor,loratool,command,kohya")
    p.add_argument("--workdir", default=None)
    p.add_argument("--peer-venv", default="/tmp/peer-venv")
    p.add_argument("--keyshapes", default=str(REPO.parent / "shared" / "fixtures" / "real" / "keyshapes"))
    p.add_argument("--json-out", default=None)
    p.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                   help="another revision's checkout: adds METHOD@NAME rows (repeatable)")
    p.add_argument("--tree-methods", default=",".join(IN_PROCESS),
                   help="the in-process contenders run under each --tree (e.g. whole,loratool: one floor)")
    p.add_argument("--repeat", type=int, default=1, help="in-process contenders: fastest of N, interleaved")
    p.add_argument("--one", choices=list(RUNNERS), help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--tuned", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.trees = dict(t.split("=", 1) for t in args.tree)
    if args.one:
        return one(args)
    peers = Path(args.peer_venv).exists()
    methods = [m for m in args.methods.split(",") if not (m in ("kohya", "lycoris") and is_llm(args.layout))
               and not (m == "mergekit" and not (is_llm(args.layout) and peers))
               and not (m == "lycoris" and not peers)]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        args.workdir = tmp
        t0 = time.perf_counter()
        base, tuned = write_pair(args.layout, Path(tmp), Path(args.keyshapes), args.device, layers=args.layers)
        gen_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        os.sync()  # the pair's write-back would otherwise compete with every contender's output write
        print(f"pair written in {gen_s:.0f} s, flushed to disk in {time.perf_counter() - t0:.0f} s", flush=True)
        results = {}
        for m in _order(methods, args):
            runner = {"command": run_command, "mergekit": run_mergekit, "lycoris": run_lycoris}.get(m)
            r = runner(base, tuned, args) if runner else child(m, base, tuned, args)
            print(f"{m}: {json.dumps({k: v for k, v in r.items() if k != 'err_opt'})}", flush=True)
            results[m] = _fastest(results.get(m), r)
        adapters = {"loratool": _out(args, "loratool_out"), "mergekit": Path(tmp) / "mergekit_out"}
        errs = errors(base, tuned, args, adapters) if args.stride > 0 else {}
        text = table(results, errs, args, gen_s, nbytes(base) + nbytes(tuned))
        shutil.rmtree(tmp, ignore_errors=True)
    print(text, flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"table": text, "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()

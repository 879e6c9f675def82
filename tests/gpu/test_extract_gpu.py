"""The CUDA paths of the SVD engine, extract and resize (skipped without CUDA)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def with_spectrum(m, n, s, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = s.numel()
    u = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]
    return u @ torch.diag(s.double()) @ v.T


@pytest.mark.parametrize("shape", [(1280, 1280), (1280, 11520), (5120, 1280)])
def test_batched_randomized_svd_on_gpu_is_near_optimal_and_deterministic(shape):
    from loratool.linalg import randomized_svd

    m, n = shape
    p = min(m, n)
    a = torch.stack([with_spectrum(m, n, torch.arange(1, p + 1) ** -0.5, seed=i) for i in range(3)]).float()
    names = ["a", "b", "c"]
    u, s, vh = randomized_svd(a.cuda(), 64, names=names, seed=0)
    u2, s2, vh2 = randomized_svd(a.cuda(), 64, names=names, seed=0)
    assert torch.equal(u, u2) and torch.equal(s, s2) and torch.equal(vh, vh2)
    for i in range(3):
        a64 = a[i].double()
        sv = torch.linalg.svdvals(a64.cuda()).cpu()
        optimal = float(sv[64:].square().sum().sqrt())
        got = float((a64 - (u[i].double().cpu() * s[i].double().cpu()) @ vh[i].double().cpu()).norm())
        assert got <= 1.01 * optimal


def test_the_batched_core_svd_holds_and_matches_the_default_driver():
    from loratool.linalg.randomized import _core_svd_batched

    spectrum = torch.arange(1, 129, dtype=torch.float64) ** -0.8
    cores = torch.stack([with_spectrum(128, 128, spectrum, seed=i) for i in range(6)]).float().cuda()
    checks = []
    u, s, vh = _core_svd_batched(cores, checks)
    assert bool(checks[0])
    ref = torch.linalg.svdvals(cores.double())
    torch.testing.assert_close(s.double(), ref.float().double(), rtol=1e-5, atol=1e-6 * float(ref.max()))
    for i in range(6):  # the rank-64 truncation is as good as the default driver's
        c = cores[i].double()
        got = float((c - (u[i, :, :64].double() * s[i, :64].double()) @ vh[i, :64].double()).norm())
        best = float(ref[i, 64:].square().sum().sqrt())
        assert got <= best * (1 + 1e-4) + 1e-6 * float(c.norm())


def test_a_rank_deficient_core_is_flagged_not_raised():
    from loratool.linalg.randomized import _core_svd_batched

    gen = torch.Generator().manual_seed(5)
    cores = torch.stack([torch.randn(128, 4, generator=gen) @ torch.randn(4, 128, generator=gen) for _ in range(3)])
    checks = []
    _core_svd_batched(cores.cuda(), checks)  # gesvda may not converge on these: a flag, never an exception
    assert checks[0].dtype == torch.bool and checks[0].numel() == 1


def test_randomized_svd_on_gpu_takes_the_batched_core_without_a_redo(monkeypatch):
    import loratool.linalg.randomized as rnd

    redo = []
    monkeypatch.setattr(rnd, "_core_svd", lambda c: redo.append(1) or torch.linalg.svd(c, full_matrices=False))
    a = torch.stack([with_spectrum(1280, 640, torch.arange(1, 641) ** -0.8, seed=i) for i in range(4)]).float()
    u, s, vh = rnd.randomized_svd(a.cuda(), 64, names=list("abcd"), seed=0)
    assert not redo
    for i in range(4):
        best = float(torch.linalg.svdvals(a[i].double())[64:].square().sum().sqrt())
        got = float((a[i].double() - (u[i].double().cpu() * s[i].double().cpu()) @ vh[i].double().cpu()).norm())
        assert got <= 1.01 * best


def test_randomized_svd_on_gpu_of_an_exactly_low_rank_batch():
    from loratool.linalg import randomized_svd

    gen = torch.Generator().manual_seed(6)
    a = torch.randn(3, 900, 5, generator=gen) @ torch.randn(3, 5, 700, generator=gen)
    a[2] = 0
    u, s, vh = randomized_svd(a.cuda(), 32, names=["x", "y", "z"], seed=0)
    assert torch.isfinite(u).all() and torch.isfinite(s).all() and torch.isfinite(vh).all()
    for i in range(2):
        rebuilt = (u[i].cpu().double() * s[i].cpu().double()) @ vh[i].cpu().double()
        assert float((a[i].double() - rebuilt).norm() / a[i].double().norm()) < 1e-5
    assert float(s[2].abs().max()) == 0


def test_exact_path_on_gpu_matches_cpu():
    from loratool.linalg import exact_svd

    a = torch.randn(2, 300, 500, generator=torch.Generator().manual_seed(1))
    _, s_gpu, _ = exact_svd(a.cuda(), 20)
    _, s_cpu, _ = exact_svd(a, 20)
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=1e-10, atol=1e-10)


def _pair(tmp_path, dtype=torch.float16):
    from loratool.io.writer import write_safetensors

    gen = torch.Generator().manual_seed(0)
    base, tuned = {}, {}
    for i, shape in enumerate([(640, 640), (640, 640), (640, 640), (320, 2880), (1280, 320)]):
        w = torch.randn(shape, generator=gen) * 0.02
        d = torch.randn(shape[0], 6, generator=gen) @ torch.randn(6, shape[1], generator=gen) * 1e-3
        base[f"l{i}.weight"], tuned[f"l{i}.weight"] = w.to(dtype), (w + d).to(dtype)
    write_safetensors(tmp_path / "b.safetensors", base, None)
    write_safetensors(tmp_path / "t.safetensors", tuned, None)
    return tmp_path / "b.safetensors", tmp_path / "t.safetensors"


def test_streamed_extract_on_gpu_matches_cpu_and_repeats_exactly(tmp_path):
    from loratool.ops.extract import extract
    from loratool.ops.extract_plan import ExtractOptions

    b, t = _pair(tmp_path)
    gpu1 = extract(b, t, ExtractOptions(rank=6, arch="generic", device="cuda", dtype="fp32"))
    gpu2 = extract(b, t, ExtractOptions(rank=6, arch="generic", device="cuda", dtype="fp32"))
    cpu = extract(b, t, ExtractOptions(rank=6, arch="generic", device="cpu", dtype="fp32"))
    assert len(gpu1.adapter.modules) == 5
    for key, m in gpu1.adapter.modules.items():
        assert torch.equal(m.up, gpu2.adapter.modules[key].up) and torch.equal(m.down, gpu2.adapter.modules[key].down)
        d_gpu, d_cpu = m.delta(torch.float64), cpu.adapter.modules[key].delta(torch.float64)
        assert float((d_gpu - d_cpu).norm() / d_cpu.norm()) < 1e-4
    for rg, rc in zip(gpu1.reports, cpu.reports, strict=True):
        assert rg.key == rc.key and rg.rel_error == pytest.approx(rc.rel_error, rel=1e-2, abs=1e-4)


def test_clamped_extract_on_gpu_module_by_module_matches_cpu(tmp_path):
    from loratool.ops.extract import extract
    from loratool.ops.extract_plan import ExtractOptions

    b, t = _pair(tmp_path)
    opts = {"rank": 6, "arch": "generic", "dtype": "fp16", "clamp_quantile": 0.99}
    gpu = extract(b, t, ExtractOptions(device="cuda", **opts))
    cpu = extract(b, t, ExtractOptions(device="cpu", **opts))
    assert len(gpu.adapter.modules) == 5
    for key, m in gpu.adapter.modules.items():
        assert m.up.device.type == m.down.device.type == "cpu" and m.up.dtype == torch.float16
        d_gpu, d_cpu = m.delta(torch.float64), cpu.adapter.modules[key].delta(torch.float64)
        assert float((d_gpu - d_cpu).norm() / d_cpu.norm()) < 1e-2
    for rg, rc in zip(gpu.reports, cpu.reports, strict=True):
        assert rg.key == rc.key and rg.rel_error == pytest.approx(rc.rel_error, rel=1e-2, abs=1e-3)


def test_resize_on_gpu_matches_cpu():
    from loratool.core.modules import Adapter, LoraModule
    from loratool.ops.resize import ResizeOptions, resize

    gen = torch.Generator().manual_seed(2)
    a = Adapter(base_model="sdxl")
    decay = torch.arange(1, 65, dtype=torch.float32) ** -1.0
    old = LoraModule(component="unet", path="x", alpha=32.0, down=torch.randn(64, 1280, generator=gen),
                     up=torch.randn(1280, 64, generator=gen) * decay)
    a.add(old)
    d = old.delta(torch.float64)
    s = torch.linalg.svdvals(d)
    optimal = float(s[16:].square().sum().sqrt())
    for device in ("cuda", "cpu"):
        new = resize(a, ResizeOptions(rank=16, device=device)).adapter.modules["unet.x"]
        assert new.scale == old.scale and new.rank == 16
        assert float((new.delta(torch.float64) - d).norm()) <= 1.0001 * optimal


def test_the_cuda_stream_stacks_each_batch_as_the_cpu_reader_does(tmp_path, monkeypatch):
    """Fused rows, a transposed weight, a conv and a dtype that differs on one side, through pinned slots
    small enough that weights are split across slots and copies are merged across modules."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))  # the CPU test's files and modules
    from test_extract_stream import MODULES, _files

    from loratool.io.sources import open_source
    from loratool.ops import extract_stream
    from loratool.ops.extract_stream import stream_pairs

    monkeypatch.setattr(extract_stream, "SLOT_BYTES", 256)  # 2⅔ modules of 96 bytes a slot
    b, t = _files(tmp_path)
    with open_source(b) as bs, open_source(t) as ts:
        cpu = list(stream_pairs(bs, ts, MODULES, torch.device("cpu")))
        gpu = list(stream_pairs(bs, ts, MODULES, torch.device("cuda")))
        assert [[m.path for m in p.modules] for p in gpu] == [[m.path for m in p.modules] for p in cpu]
        for pc, pg in zip(cpu, gpu, strict=True):
            torch.cuda.current_stream().wait_event(pg.ready)
            for side in ("base", "tuned"):
                got, want = getattr(pg, side), getattr(pc, side)
                assert got.device.type == "cuda" and got.dtype == want.dtype
                assert torch.equal(got.cpu(), want), (side, [m.path for m in pc.modules])


def test_the_kernel_warm_up_runs_once_per_process(tmp_path):
    from loratool.ops.extract import extract
    from loratool.ops.extract_plan import ExtractOptions
    from loratool.ops.extract_startup import warming

    b, t = _pair(tmp_path)
    opts = ExtractOptions(rank=6, arch="generic", device="cuda", dtype="fp32")
    first = extract(b, t, opts)
    warmed = warming(torch.device("cuda"))
    assert warmed.done() and warmed.exception() is None
    second = extract(b, t, opts)  # the same future, done: no wait at the start
    assert warming(torch.device("cuda")) is warmed
    assert second.profile["warm_s"] <= first.profile["warm_s"] and second.profile["warm_s"] < 0.01


def test_a_batchs_stats_and_factors_come_to_the_host_in_one_storage_back_to_back():
    from loratool.ops.extract_batch import to_host

    gen = torch.Generator(device="cuda").manual_seed(3)
    stats = torch.randn(2, 5, dtype=torch.float64, device="cuda", generator=gen)
    up = torch.randn(5, 77, 3, device="cuda", generator=gen).to(torch.float16)
    down = torch.randn(5, 3, 131, device="cuda", generator=gen).to(torch.float16).transpose(1, 2)  # not contiguous
    got = to_host(stats, up, down)
    for mine, want in zip(got, (stats, up, down), strict=True):
        assert mine.device.type == "cpu" and mine.dtype == want.dtype and mine.shape == want.shape
        assert torch.equal(mine, want.cpu())
    storages = {t.untyped_storage().data_ptr() for t in got}
    assert len(storages) == 1
    assert got[1].storage_offset() * 2 == stats.numel() * 8  # up right after the stats
    assert (got[2].storage_offset() - got[1].storage_offset()) == up.numel()  # down right after up


def test_a_gpu_batch_whose_fast_path_failed_writes_the_redone_factors(tmp_path, monkeypatch):
    """At a fixed rank the factors are formed from the unchecked decomposition and come back with its
    checks; when a check failed on the device, the batch is redone checked and those factors are written."""
    from loratool.linalg import truncated
    from loratool.ops.extract import extract
    from loratool.ops.extract_plan import ExtractOptions

    b, t = _pair(tmp_path)
    opts = {"rank": 6, "arch": "generic", "dtype": "fp32"}
    cpu = extract(b, t, ExtractOptions(device="cpu", **opts))
    real, failed = truncated.randomized_svd_deferred, []

    def failing(a, rank, **kw):
        u, s, vh, held = real(a, rank, **kw)
        failed.append(held is not None)
        return u.flip(-1), s, vh, torch.zeros((), dtype=torch.bool, device=a.device)

    monkeypatch.setattr(truncated, "randomized_svd_deferred", failing)
    gpu = extract(b, t, ExtractOptions(device="cuda", **opts))
    assert failed and all(failed)  # the GPU path defers its checks
    assert {r.method for r in gpu.reports} == {"randomized"}
    for key, m in gpu.adapter.modules.items():
        d_gpu, d_cpu = m.delta(torch.float64), cpu.adapter.modules[key].delta(torch.float64)
        assert float((d_gpu - d_cpu).norm() / d_cpu.norm()) < 1e-4
    for rg, rc in zip(gpu.reports, cpu.reports, strict=True):
        assert rg.rel_error == pytest.approx(rc.rel_error, rel=1e-2, abs=1e-4)


def test_the_reader_flags_each_changed_module_by_its_stored_bits(tmp_path):
    """The copy stream's flags are the CPU's bit comparison: -0.0 for 0.0 is a change, a NaN left as it
    was is not, one changed element anywhere is."""
    from safetensors.torch import save_file  # a NaN in a weight: another tool's file (ours refuses one)

    from loratool.io.sources import open_source
    from loratool.io.weights import Segment, WeightRef
    from loratool.ops.extract_plan import PlannedModule
    from loratool.ops.extract_stream import changed_flags, stream_pairs

    g = torch.Generator().manual_seed(0)
    base = {f"m{i}": torch.randn(64, 48, generator=g).half() for i in range(6)}
    base["m1"][3, 4] = 0.0
    base["m2"][5, 6] = float("nan")
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["m1"][3, 4] = -0.0  # other bits, the same value
    tuned["m3"][63, 47] += 1.0  # the last element
    tuned["m5"][0, 0] += 1.0  # the first
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    mods = [PlannedModule("model", k, (64, 48), WeightRef((Segment(k),), (64, 48)), rank=2) for k in base]
    with open_source(tmp_path / "b.safetensors") as bs, open_source(tmp_path / "t.safetensors") as ts:
        gpu = list(stream_pairs(bs, ts, mods, torch.device("cuda")))
        cpu = list(stream_pairs(bs, ts, mods, torch.device("cpu")))
        got = [f for p in gpu for f in p.changed_modules()]
        want = [f for p in cpu for f in changed_flags(p.base, p.tuned)]
    assert all(p.changed is not None and p.changed.is_pinned() for p in gpu)
    assert got == want == [False, True, False, True, False, True]


def test_a_fixed_rank_batch_waits_for_the_device_at_most_twice(tmp_path):
    """The host learns a batch's changed modules from the copy stream, and its checks, spectra, norms,
    errors and factors in one transfer: the compute queue is waited for by that transfer and by cuSOLVER's
    own error check in the batched core SVD (no variant without it), nothing else."""
    import warnings

    from loratool.ops.extract import open_pair
    from loratool.ops.extract_batch import extract_batch
    from loratool.ops.extract_plan import ExtractOptions, build_plan
    from loratool.ops.extract_stream import stream_pairs

    b, t = _pair(tmp_path)
    opts = ExtractOptions(rank=6, arch="generic", device="cuda", dtype="fp16")
    with open_pair(b, t) as (bs, ts):
        plan = build_plan(bs, ts, opts)
        pairs = list(stream_pairs(bs, ts, plan.modules, torch.device("cuda")))
        extract_batch(pairs[0], opts, torch.float16)  # kernels loaded
        for pair in pairs[1:]:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    reports, mods = extract_batch(pair, opts, torch.float16)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs = [str(w.message) for w in seen if "synchroniz" in str(w.message)]
            assert reports and all(r.status == "ok" and r.method == "randomized" for r in reports)
            assert len(syncs) <= 2, syncs


def test_factors_come_back_in_pinned_memory_with_their_values():
    """to_host packs a batch's tensors into one copy that lands in pinned host memory (a copy into
    pageable memory ran at ~1 GB/s on an H100 host and held the worker), each tensor a view with its own
    dtype, shape and values, on a worker's own stream as extract runs it."""
    from loratool.ops.extract_batch import to_host

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        a = torch.randn(3, 5, device="cuda", dtype=torch.float64)
        b = torch.randn(4, 7, 2, device="cuda", dtype=torch.float16)
        c = torch.arange(6, device="cuda", dtype=torch.float32).reshape(2, 3).t()  # not contiguous
        ha, hb, hc = to_host(a, b, c)
    for host, dev in ((ha, a), (hb, b), (hc, c)):
        assert host.device.type == "cpu" and host.is_pinned()
        assert host.dtype == dev.dtype and host.shape == dev.shape
        assert torch.equal(host, dev.cpu())


def test_an_extraction_in_a_fresh_process_leaves_torchs_random_state_as_the_caller_set_it(tmp_path):
    """A library caller who seeds torch, extracts, then draws numbers gets the numbers that seed gives:
    the warm-up (run once per process, hence a fresh interpreter) and the sketches draw from generators
    of their own, not from torch's global CPU or CUDA state."""
    import subprocess

    b, t = _pair(tmp_path)
    script = f"""
import torch
from loratool.ops.extract import extract
from loratool.ops.extract_plan import ExtractOptions
torch.manual_seed(1234)
cpu, gpu = torch.get_rng_state(), torch.cuda.get_rng_state()
extract({str(b)!r}, {str(t)!r}, ExtractOptions(rank=6, arch="generic", device="cuda", dtype="fp32"))
assert torch.equal(torch.get_rng_state(), cpu), "the CPU random state moved"
assert torch.equal(torch.cuda.get_rng_state(), gpu), "the CUDA random state moved"
print("same")
"""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "same", done.stderr[-2000:]

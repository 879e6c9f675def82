"""A profile of a few training steps, the same for both benchmark workers (bench/train/timing.py starts it
at the end of the first step and finishes it at the end of the warm-up).

The summary says where a step's time goes: the host's wall time of the profiled steps beside the GPU's
kernel time (their ratio is how busy the GPU was; a GPU idle between kernels means a host-bound step),
the kernel time by kind (convolutions, matrix products, attention, norms, optimizer, copies and casts,
other element-wise work), the kernels and the host-side operators that cost most, and the number of
kernel launches a step."""

from __future__ import annotations

import json
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

KINDS = [  # first match wins: cuDNN's fused attention kernels say "sdpa"/"flash" and also "cudnn" and "fprop",
    # and its convolution kernels are implicit GEMMs: attention first, then convolutions, then matrix products
    ("attention", ("sdpa", "flash", "fmha", "attention", "attn")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm", "cudnn")),
    ("matrix product", ("gemm", "xmma", "cutlass", "cublas", "sm90_", "sm80_", "matmul")),
    ("norm", ("norm",)),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copy / cast", ("copy", "memcpy", "memset", "cast", "fill")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, needles in KINDS:
        if any(n in low for n in needles):
            return kind
    return "other element-wise"


def _device_us(evt) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, attr):
            return float(getattr(evt, attr))
    return 0.0


class StepProfile:
    def __init__(self, cuda: bool) -> None:
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self.cuda, self.prof = cuda, profile(activities=acts)
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def finish(self, steps: int, path: str) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        events = self.prof.key_averages()
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        by_kind: dict[str, float] = {}
        for e in kernels:
            kind = kind_of(e.key)
            by_kind[kind] = by_kind.get(kind, 0.0) + _device_us(e)
        gpu_ms = sum(by_kind.values()) / 1000
        launches = sum(e.count for e in kernels)
        top_kernels = sorted(kernels, key=_device_us, reverse=True)[:20]
        host = sorted((e for e in events if e.device_type == DeviceType.CPU), key=lambda e: e.self_cpu_time_total,
                      reverse=True)[:20]
        summary = {
            "steps": steps, "wall_ms_per_step": 1000 * wall / steps, "gpu_kernel_ms_per_step": gpu_ms / steps,
            "gpu_busy": gpu_ms / (1000 * wall) if wall else None, "kernel_launches_per_step": launches / steps,
            "kernel_ms_per_step_by_kind": {k: v / 1000 / steps for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": e.key[:120], "kind": kind_of(e.key), "ms_per_step": _device_us(e) / 1000 / steps,
                             "calls_per_step": e.count / steps} for e in top_kernels],
            "top_host_ops": [{"name": e.key[:120], "self_cpu_ms_per_step": e.self_cpu_time_total / 1000 / steps,
                              "calls_per_step": e.count / steps} for e in host],
        }
        with open(path, "w") as fh:
            json.dump(summary, fh, indent=1)
        return summary

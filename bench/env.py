"""The machine a benchmark ran on, and the floors its results are compared against.

Floors are measured on the same machine in the same run, never taken from a data sheet:
- compute: fp32 matrix multiply FLOP/s (TF32 off on GPU); a quantile-Huber pair costs ~8 flops
  (difference, abs/compare, select of the two Huber branches, the asymmetric weight, two
  multiply-adds into loss and gradient), so the pair floor is FLOP/s / 8 pairs per second;
- memory: device copy bandwidth (bytes read + written per second), the floor of the scan-like GAE.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from typing import Dict, Optional

import torch

from dvpo.bench.timing import median

FLOPS_PER_PAIR = 8

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_device(name: str = "auto") -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("dvpo bench: --device cuda was asked for but torch sees no CUDA GPU")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _meminfo(key: str) -> Optional[int]:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _host_memory(meminfo_key: str, pages_name: str) -> Optional[int]:
    """Host memory in bytes from /proc/meminfo, else pages x page size from sysconf."""
    value = _meminfo(meminfo_key)
    if value is None:
        try:
            value = os.sysconf("SC_PAGE_SIZE") * os.sysconf(pages_name)
        except (ValueError, OSError, AttributeError):
            value = None
    return value


def memory_total(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return _host_memory("MemTotal", "SC_PHYS_PAGES")


def memory_available(device: torch.device) -> Optional[int]:
    """Bytes a new allocation can use now (CPU: MemAvailable; GPU: free device memory)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # blocks PyTorch's caching allocator holds but does not use are available to the next case too
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(0, cached))
    return _host_memory("MemAvailable", "SC_AVPHYS_PAGES")


def git_info(root: str = REPO_ROOT) -> Dict[str, object]:
    def git(*args):
        out = subprocess.run(("git",) + args, cwd=root, capture_output=True, text=True, timeout=20)
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        commit, status = None, None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def _version(dist_name: str) -> Optional[str]:
    """An installed package's version, read from its metadata (importing triton or transformers
    just for a version string would cost seconds)."""
    try:
        from importlib import metadata

        return metadata.version(dist_name)
    except Exception:  # a missing or broken optional package is just "absent"
        return None


def environment(device: torch.device) -> Dict[str, object]:
    import dvpo

    env = {
        "device": str(device),
        "device_type": device.type,
        "device_name": None,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "num_threads": torch.get_num_threads(),
        "gpu_name": None,
        "gpu_capability": None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "memory_total_bytes": memory_total(device),
        "memory_available_bytes": memory_available(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": (torch.backends.cudnn.version() if torch.cuda.is_available() else None),
        "transformers": _version("transformers"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "dvpo": getattr(dvpo, "__version__", None),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_name"] = props.name
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        env["device_name"] = props.name
    else:
        env["device_name"] = env["cpu_model"]
    env.update(git_info())
    return env


def _time_calls(fn, device: torch.device, reps: int):
    """Median seconds of `fn()` over `reps` calls after one warm-up call."""
    fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return median(times)


def measure_floor(device: torch.device, quick: bool = False) -> Dict[str, object]:
    """fp32 matmul FLOP/s and copy bandwidth, measured here (the denominators of floor_fraction)."""
    if device.type == "cuda":
        n, reps, copy_bytes = (4096, 10, 1 << 28) if quick else (8192, 20, 1 << 30)
    else:
        n, reps, copy_bytes = (1024, 5, 1 << 25) if quick else (2048, 10, 1 << 28)
    old_tf32 = torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None
    try:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False  # the floor is true fp32 (IEEE), not TF32
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        out = torch.empty(n, n, device=device)
        t_mm = _time_calls(lambda: torch.mm(a, b, out=out), device, reps)
        del a, b, out
        src = torch.empty(copy_bytes // 4, device=device).fill_(1.0)
        dst = torch.empty_like(src)
        t_copy = _time_calls(lambda: dst.copy_(src), device, reps)
        del src, dst
    finally:
        if old_tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = old_tf32
    flops = 2.0 * n ** 3 / t_mm
    return {
        "matmul_n": n,
        "matmul_dtype": "fp32",
        "matmul_flops_per_s": flops,
        "flops_per_pair": FLOPS_PER_PAIR,
        "pair_floor_per_s": flops / FLOPS_PER_PAIR,
        "copy_bytes": copy_bytes,
        "copy_bytes_per_s": 2.0 * copy_bytes / t_copy,  # read + write
        "num_threads": torch.get_num_threads(),
    }

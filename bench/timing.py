"""Timers and peak-memory probes.

A measurement is `setup() -> state` (untimed: reset the grads) followed by the phases of one call:
the forward and, for differentiable ops, the backward from its output. The clock is read at every
phase boundary, so the fwd, bwd and fwd+bwd rows of a case come from the same calls (one set of
calls instead of three; the backward is timed exactly as a separate measurement would time it,
right after its own forward).

- CPU: `time.perf_counter` at the boundaries, garbage collection off during the repetitions; the
  first call is the warm-up (and the memory measurement), more warm-up calls follow until
  `warmup_s` is spent, then enough repetitions to fill `rep_s` (at least `min_reps`). A first call
  slower than max(1 s, rep_s) counts as the first timed sample instead (nothing to warm up in a
  call that slow: its buffers are fresh allocations every time), and a call slower than
  `max_call_s` is not repeated.
- GPU (in the style of `triton.testing.do_bench`): a first call (JIT, autotuning, compilation),
  an estimate from 3 calls, a warm-up of `warmup_s`, then `rep_s` worth of repetitions, each
  preceded by a write over an L2-sized buffer (no call reads another's data from cache) and stamped
  by its own CUDA events; one synchronize at the end.

Peak extra memory (bytes above what was allocated just before the phase, or the call):
- GPU: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (exact, allocator level),
  in one extra call after the timing;
- CPU (Linux): the process's resident-set high-water mark (`VmHWM`), reset through
  `/proc/self/clear_refs` before each phase, minus the resident set then, with freed heap returned
  to the OS first (`malloc_trim`) so that reused pages do not hide an allocation; taken during the
  first call (the probe's bookkeeping sits between the phases, outside their stamps). `tracemalloc` cannot be used: it sees Python's allocator only, not tensor
  storage. Fallback: a thread sampling the resident set every 0.5 ms (a lower bound).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch

Setup = Callable[[], object]
Fn = Callable[[object], object]


def median(xs: List[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


@dataclass
class Timing:
    """Timed repetitions (ms) of one measurement and their summary statistics."""

    times_ms: List[float]
    warmup: int
    first_call_ms: float
    reps: int = field(init=False)
    median_ms: float = field(init=False)
    min_ms: float = field(init=False)
    max_ms: float = field(init=False)
    mean_ms: float = field(init=False)

    def __post_init__(self):
        t = self.times_ms
        self.reps, self.median_ms, self.min_ms, self.max_ms = len(t), median(t), min(t), max(t)
        self.mean_ms = sum(t) / len(t)


@dataclass
class TimingPolicy:
    warmup_s: float
    rep_s: float
    min_reps: int
    max_reps: int
    max_call_s: float  # a call slower than this is timed once (reps=1) and marks the case as slow
    l2_flush_bytes: int = 0

    @staticmethod
    def default(device: torch.device, quick: bool) -> "TimingPolicy":
        if device.type == "cuda":
            if quick:
                return TimingPolicy(0.01, 0.03, 5, 200, 5.0, 256 << 20)
            return TimingPolicy(0.025, 0.1, 10, 1000, 10.0, 256 << 20)
        if quick:
            return TimingPolicy(0.01, 0.05, 3, 20, 5.0)
        return TimingPolicy(0.25, 1.0, 3, 50, 30.0)

    def to_dict(self, device: torch.device) -> dict:
        return {
            "method": "cuda_events" if device.type == "cuda" else "perf_counter",
            "warmup_s": self.warmup_s,
            "rep_s": self.rep_s,
            "min_reps": self.min_reps,
            "max_reps": self.max_reps,
            "max_call_s": self.max_call_s,
            "l2_flush_bytes": self.l2_flush_bytes if device.type == "cuda" else 0,
            "phases": "fwd, bwd and fwd+bwd rows come from the same calls: each call is timed at the "
                      "forward/backward boundary too",
        }


def _reps_for(policy: TimingPolicy, est_s: float, keep_min_reps: bool = False) -> int:
    if keep_min_reps and est_s > policy.rep_s:
        return policy.min_reps  # the headline: always a median of min_reps samples, however slow
    if est_s > policy.max_call_s:
        return 1
    n = int(math.ceil(policy.rep_s / max(est_s, 1e-9)))
    n = max(policy.min_reps, min(policy.max_reps, n))
    # never let one measurement run far past max_call_s x min_reps
    cap = max(1, int(policy.max_call_s * policy.min_reps / max(est_s, 1e-9)))
    return max(1, min(n, cap))


@dataclass
class Measurement:
    """Per-phase timings plus the whole call (`total`), and peak extra memory per phase and in all."""

    phases: List[Timing]
    total: Timing
    phase_mem: List[Optional[int]]
    total_mem: Optional[int]


def _run_phases(phases: Sequence[Fn], state, clock) -> List[float]:
    """Run the phases in order (each gets the previous one's output); `clock()` stamps boundaries."""
    stamps = [clock()]
    out = state
    for phase in phases:
        out = phase(out)
        stamps.append(clock())
    del out
    return stamps


class CpuTimer:
    """perf_counter at every phase boundary. The first call is the warm-up that also measures memory
    (it is never timed); warm-up continues until `warmup_s` is spent."""

    def __init__(self, policy: TimingPolicy, probe: Optional["MemoryProbe"] = None):
        self.policy = policy
        self.probe = probe

    def run(self, phases: Sequence[Fn], setup: Setup, keep_min_reps: bool = False) -> Measurement:
        p = self.policy
        first_stamps = [None]
        t0 = time.perf_counter()
        if self.probe is not None:
            phase_mem, total_mem = self.probe.measure(phases, setup, first_stamps)
        else:
            first_stamps[0] = _run_phases(phases, setup(), time.perf_counter)
            phase_mem, total_mem = [None] * len(phases), None
        first = time.perf_counter() - t0
        per_phase: List[List[float]] = [[] for _ in phases]
        totals: List[float] = []
        if first >= max(1.0, p.rep_s) and first_stamps[0] is not None:
            # A call this slow has no warm-up to speak of (its buffers are fresh allocations every
            # call): the first call is the first timed sample, and the warm-up count is 0.
            stamps = first_stamps[0]
            for i in range(len(phases)):
                per_phase[i].append((stamps[i + 1] - stamps[i]) * 1e3)
            totals.append((stamps[-1] - stamps[0]) * 1e3)
            est, warm = first, 0
            reps = max(0, _reps_for(p, est, keep_min_reps) - 1)
        else:
            est, spent, warm = first, first, 1
            while spent < p.warmup_s and est <= p.max_call_s and warm < 1000:
                stamps = _run_phases(phases, setup(), time.perf_counter)
                est = stamps[-1] - stamps[0]
                spent += est
                warm += 1
            reps = _reps_for(p, est, keep_min_reps)
        gc_was_enabled = gc.isenabled()
        gc.collect(0)  # cheap: the long-lived heap is frozen (harness.run calls gc.freeze)
        gc.disable()
        try:
            for _ in range(reps):
                stamps = _run_phases(phases, setup(), time.perf_counter)
                for i in range(len(phases)):
                    per_phase[i].append((stamps[i + 1] - stamps[i]) * 1e3)
                totals.append((stamps[-1] - stamps[0]) * 1e3)
        finally:
            if gc_was_enabled:
                gc.enable()
        return Measurement([Timing(t, warm, first * 1e3) for t in per_phase], Timing(totals, warm, first * 1e3),
                           phase_mem, total_mem)


class CudaTimer:
    """CUDA events at every phase boundary, an L2 flush before each call, do_bench-style warm-up.
    Memory is measured in one extra call after the timing (allocator statistics, exact)."""

    def __init__(self, policy: TimingPolicy, device: torch.device, probe: Optional["MemoryProbe"] = None):
        self.policy = policy
        self.device = device
        self.probe = probe
        self._flush = None
        if policy.l2_flush_bytes:
            self._flush = torch.empty(policy.l2_flush_bytes, dtype=torch.int8, device=device)

    def _events(self, n):
        return [torch.cuda.Event(enable_timing=True) for _ in range(n)]

    def _call(self, phases, setup):
        """One call with an L2 flush before it; returns the list of its boundary events."""
        events = self._events(len(phases) + 1)
        it = iter(events)
        state = setup()
        if self._flush is not None:
            self._flush.zero_()
        _run_phases(phases, state, lambda: next(it).record())
        return events

    def run(self, phases: Sequence[Fn], setup: Setup, keep_min_reps: bool = False) -> Measurement:
        p = self.policy
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        _run_phases(phases, setup(), lambda: None)  # JIT compilation, autotuning, lazy init
        torch.cuda.synchronize(self.device)
        first = time.perf_counter() - t0
        warm = 1
        n_est = 1 if first > p.max_call_s else 3
        est_calls = [self._call(phases, setup) for _ in range(n_est)]
        torch.cuda.synchronize(self.device)
        est = median([ev[0].elapsed_time(ev[-1]) / 1e3 for ev in est_calls])
        warm += n_est
        if est <= p.max_call_s:
            n_warm = max(1, min(10000, int(p.warmup_s / max(est, 1e-9))))
            for _ in range(n_warm):
                _run_phases(phases, setup(), lambda: None)
            warm += n_warm
        reps = _reps_for(p, est, keep_min_reps)
        torch.cuda.synchronize(self.device)
        calls = [self._call(phases, setup) for _ in range(reps)]
        torch.cuda.synchronize(self.device)
        per_phase = [[ev[i].elapsed_time(ev[i + 1]) for ev in calls] for i in range(len(phases))]
        totals = [ev[0].elapsed_time(ev[-1]) for ev in calls]
        if self.probe is not None:
            phase_mem, total_mem = self.probe.measure(phases, setup)
        else:
            phase_mem, total_mem = [None] * len(phases), None
        return Measurement([Timing(t, warm, first * 1e3) for t in per_phase], Timing(totals, warm, first * 1e3),
                           phase_mem, total_mem)


    def graph_replay(self, phases: Sequence[Fn], setup: Setup, replays: int = 100, samples: int = 5) -> float:
        """Median ms of one call (every phase) replayed from a CUDA graph: warmed up on a side stream,
        captured once, then `replays` back-to-back replays per sample (no L2 flush: this is the time
        without the host's launch overhead, which dominates small shapes; a training step captured
        in a graph gets it). Raises what the capture raises (e.g. a host sync inside the call)."""
        dev = self.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(3):
                _run_phases(phases, setup(), lambda: None)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        state = setup()
        with torch.cuda.graph(graph):
            _run_phases(phases, state, lambda: None)
        graph.replay()
        torch.cuda.synchronize(dev)
        per_replay = []
        for _ in range(samples):
            start, end = self._events(2)
            start.record()
            for _ in range(replays):
                graph.replay()
            end.record()
            torch.cuda.synchronize(dev)
            per_replay.append(start.elapsed_time(end) / replays)
        return median(per_replay)


def make_timer(device: torch.device, policy: TimingPolicy, probe: Optional["MemoryProbe"] = None):
    return CudaTimer(policy, device, probe) if device.type == "cuda" else CpuTimer(policy, probe)


# ------------------------------------------------------------------------------------------ memory

_LIBC = None


def _malloc_trim():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018  (glibc only)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _proc_status(keys=("VmRSS", "VmHWM")) -> dict:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0]) * 1024
    return out


def _rss_from_statm() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return "VmHWM" in _proc_status()
    except OSError:
        return False


@dataclass
class MemoryProbe:
    """Peak extra memory of one call, per phase and in all (bytes above what was allocated just
    before the phase / the call); `method` names how (recorded in the JSON)."""

    device: torch.device
    method: str = field(init=False)

    def __post_init__(self):
        if self.device.type == "cuda":
            self.method = "cuda_max_memory_allocated"
        elif _can_reset_hwm():
            self.method = "rss_high_water_mark"
        elif os.path.exists("/proc/self/statm"):
            self.method = "rss_sampled"
        else:
            self.method = "unavailable"

    def measure(self, phases: Sequence[Fn], setup: Setup,
                stamps_out: Optional[list] = None) -> Tuple[List[Optional[int]], Optional[int]]:
        """Run one call and return (peak per phase, peak of the call). On CPU the phase boundaries'
        perf_counter stamps go to `stamps_out[0]` (the probes' own work is outside the phases)."""
        sink = stamps_out if stamps_out is not None else [None]
        if self.method == "unavailable":
            sink[0] = _run_phases(phases, setup(), time.perf_counter)
            return [None] * len(phases), None
        if self.device.type == "cuda":
            return self._measure_cuda(phases, setup)
        state = setup()
        gc.collect(1)
        _malloc_trim()
        if self.method == "rss_high_water_mark":
            return self._measure_hwm(phases, state, sink)
        return self._measure_sampled(phases, state, sink)

    def _measure_cuda(self, phases, setup):
        dev = self.device
        state = setup()
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        peaks, out, overall = [], state, 0
        for phase in phases:
            torch.cuda.synchronize(dev)
            start = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            out = phase(out)
            torch.cuda.synchronize(dev)
            peak = torch.cuda.max_memory_allocated(dev)
            peaks.append(max(0, int(peak - start)))
            overall = max(overall, peak - base)
        del out, state
        return peaks, max(0, int(overall))

    @staticmethod
    def _measure_hwm(phases, state, sink):
        base = _proc_status()["VmRSS"]
        peaks, out, overall, stamps = [], state, 0, []
        for phase in phases:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # VmHWM := VmRSS
            start = _proc_status()["VmRSS"]
            t0 = time.perf_counter()
            out = phase(out)
            t1 = time.perf_counter()
            stamps.append((t0, t1))
            hwm = _proc_status()["VmHWM"]
            peaks.append(max(0, int(hwm - start)))
            overall = max(overall, hwm - base)
        del out, state
        sink[0] = _stitch(stamps)
        return peaks, max(0, int(overall))

    @staticmethod
    def _measure_sampled(phases, state):
        current = [_rss_from_statm()]
        peak = [current[0]]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss_from_statm())
                time.sleep(0.0005)

        base = current[0]
        peaks, out, overall, stamps = [], state, 0, []
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            for phase in phases:
                start = _rss_from_statm()
                peak[0] = start
                t0 = time.perf_counter()
                out = phase(out)
                stamps.append((t0, time.perf_counter()))
                top = max(peak[0], _rss_from_statm())
                peaks.append(max(0, int(top - start)))
                overall = max(overall, top - base)
        finally:
            stop.set()
            thread.join()
        del out, state
        sink[0] = _stitch(stamps)
        return peaks, max(0, int(overall))


def _stitch(spans):
    """Phase (start, end) spans -> boundary stamps as if the phases ran back to back (the probe's
    own bookkeeping between phases is left out)."""
    stamps = [0.0]
    for t0, t1 in spans:
        stamps.append(stamps[-1] + (t1 - t0))
    return stamps

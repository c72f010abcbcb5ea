"""The benchmark sweep: op x implementation (eager, compile, dvpo backends x algorithm) x dtype x shape
x mode, one JSON row per measurement, plus the end-to-end step benchmark.

    from dvpo.bench.harness import BenchConfig, run
    result = run(BenchConfig(quick=True, out="/tmp/bench"))

Nothing here asserts a timing: the result is data (`validate_result` checks its schema only).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from dvpo.bench import SCHEMA_VERSION
from dvpo.bench import cases as C
from dvpo.dispatch import use_backend
from dvpo.bench import env as E
from dvpo.bench import timing as TM

DEFAULT_OUT = os.path.join(E.REPO_ROOT, "bench", "results")

ROW_KEYS = {
    # key: allowed types (None = JSON null)
    "op": (str,), "backend": (str,), "algorithm": (str, type(None)), "dtype": (str,), "mode": (str,),
    "shape": (dict,), "sweeps": (list,), "status": (str,), "reason": (str, type(None)),
    "median_ms": (float, type(None)), "min_ms": (float, type(None)), "max_ms": (float, type(None)),
    "mean_ms": (float, type(None)), "reps": (int,), "warmup": (int,),
    "peak_mem_bytes": (int, type(None)), "tokens_per_s": (float, type(None)),
    "pairs_per_s": (float, type(None)), "floor_fraction": (float, type(None)),
    "floor_kind": (str, type(None)), "bytes_moved": (int, type(None)), "gb_per_s": (float, type(None)),
    "mem_floor_ratio": (float, type(None)), "speedup_vs_eager": (float, type(None)),
    "speedup_vs_compile": (float, type(None)), "compile_s": (float, type(None)), "warnings": (list,),
    "graph_replay_ms": (float, type(None)),
}
# On a GPU, the kernel backends' cases up to this many tokens are also timed by CUDA-graph replay
# (the whole call, `graph_replay_ms` on its row): there the launch overhead is most of the time.
GRAPH_MAX_TOKENS = 16384
E2E_ROW_KEYS = {
    "backend": (str,), "algorithm": (str, type(None)), "dtype": (str,), "shape": (dict,), "status": (str,),
    "reason": (str, type(None)), "step_ms": (float, type(None)), "step_min_ms": (float, type(None)),
    "step_max_ms": (float, type(None)), "loss_ms": (float, type(None)), "loss_share": (float, type(None)),
    "segments_ms": (dict, type(None)), "reps": (int,), "speedup_vs_eager": (float, type(None)),
    "speedup_vs_compile": (float, type(None)), "loss_speedup_vs_eager": (float, type(None)),
    "loss_speedup_vs_compile": (float, type(None)), "compile_s": (float, type(None)),
}
STATUSES = ("ok", "skipped", "error")
QUICK_COMPILE_OPS = ("critic_loss",)
SLOW_WORK_RATIO = 1.5  # after a call over max_call_s, skip shapes with more than this x its work (not the headline)
TOP_KEYS = ("schema_version", "kind", "quick", "argv", "config", "environment", "backends", "skipped",
            "floor", "timing", "memory_method", "headline", "rows", "e2e", "files", "wall_s")


@dataclasses.dataclass
class BenchConfig:
    device: str = "auto"
    quick: bool = False
    out: str = DEFAULT_OUT
    tag: Optional[str] = None
    ops: Optional[Sequence[str]] = None  # default: all
    backends: Optional[Sequence[str]] = None  # implementations; default: all (eager, compile, ...)
    dtypes: Optional[Sequence[str]] = None  # default: fp32,bf16 (CPU), fp32,bf16,fp16 (GPU); fp32 in quick
    modes: Optional[Sequence[str]] = None  # default: fwd,bwd,fwd+bwd
    sweeps: Optional[Sequence[str]] = None  # default: all of cases.SWEEPS
    tokens: Optional[Sequence[int]] = None  # override the token sweep
    nm: Optional[Sequence[Tuple[int, int]]] = None  # override the N x M sweep
    heads: Optional[Sequence[int]] = None  # override the H sweep
    crossover: Optional[Sequence[int]] = None  # override the N = M sizes of the crossover sweep
    filter: Optional[str] = None  # "op=critic_loss;backend=cpp,eager;tokens=4096"
    compile: bool = True
    compile_shapes: Optional[str] = None  # "all" | "headline" (default: headline in quick, else all)
    compile_ops: Optional[Sequence[str]] = None  # ops with a compile baseline (default: all; quick:
    # critic_loss, the headline op, to keep the quick mode's cold-cache compile time down)
    compile_max_gae_T: int = 16  # torch.compile unrolls the reference GAE's loop over T
    all_dtype_sweeps: bool = False  # non-fp32 dtypes in every sweep (default: the token sweep only)
    micro: bool = True
    e2e: bool = True
    mem_fraction: float = 0.5  # eager/compile estimates above this share of free memory are skipped
    warmup_s: Optional[float] = None
    rep_s: Optional[float] = None
    min_reps: Optional[int] = None
    max_reps: Optional[int] = None
    max_call_s: Optional[float] = None
    threads: Optional[int] = None
    seed: int = 0
    progress: bool = True
    plots: bool = True
    allow_triton_interpreter: bool = False
    resume: bool = False  # reuse the ok/skipped rows of <out>/<tag>.partial.json (or <tag>.json)
    argv: Optional[List[str]] = None
    interrupted: bool = False  # set when Ctrl-C stopped the sweep (the partial result is still written)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("argv", None)
        d.pop("interrupted", None)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


# ------------------------------------------------------------------------------------------ filter

FILTER_KEYS = ("op", "backend", "algorithm", "dtype", "mode", "sweep") + C.SHAPE_KEYS
_FILTER_ALIASES = {"impl": "backend", "ops": "op", "backends": "backend", "dtypes": "dtype",
                   "modes": "mode", "sweeps": "sweep", "n": "N", "m": "M", "h": "H", "b": "B", "t": "T"}


def parse_filter(text: Optional[str]) -> Dict[str, set]:
    """'op=critic_loss,cvar;backend=cpp;tokens=1024,4096' -> {'op': {...}, ...} (';' or spaces between
    terms, ',' between values). Numbers compare as integers; 'algorithm=none' matches no algorithm."""
    out: Dict[str, set] = {}
    if not text:
        return out
    for term in text.replace(" ", ";").split(";"):
        term = term.strip()
        if not term:
            continue
        if "=" not in term:
            raise ValueError(f"--filter terms look like key=value[,value...], got {term!r}")
        key, values = term.split("=", 1)
        key = _FILTER_ALIASES.get(key.strip(), key.strip())
        if key not in FILTER_KEYS:
            raise ValueError(f"--filter key must be one of {', '.join(FILTER_KEYS)}; got {key!r}")
        out.setdefault(key, set()).update(v.strip() for v in values.split(",") if v.strip())
    return out


def _match(flt: Dict[str, set], key: str, value) -> bool:
    if key not in flt:
        return True
    if key == "sweep":
        return bool(set(value) & flt[key])
    if value is None:
        return "none" in flt[key]
    return str(value) in flt[key]


def _shape_matches(flt, shape: C.Shape) -> bool:
    return all(_match(flt, k, getattr(shape, k)) for k in C.SHAPE_KEYS if k in flt)


# ------------------------------------------------------------------------------------------ rows

def _f(x) -> Optional[float]:
    return None if x is None else float(x)


def _row(op, backend, algorithm, dtype, shape: C.Shape, sweeps, mode, status, reason=None,
         timing: Optional[TM.Timing] = None, mem=None, compile_s=None) -> dict:
    row = {
        "op": op, "backend": backend, "algorithm": algorithm, "dtype": dtype, "mode": mode,
        "shape": shape.to_dict(), "sweeps": list(sweeps), "status": status, "reason": reason,
        "median_ms": None, "min_ms": None, "max_ms": None, "mean_ms": None, "reps": 0, "warmup": 0,
        "peak_mem_bytes": None if mem is None else int(mem), "tokens_per_s": None, "pairs_per_s": None,
        "floor_fraction": None, "floor_kind": None, "bytes_moved": None, "gb_per_s": None, "mem_floor_ratio": None,
        "speedup_vs_eager": None, "speedup_vs_compile": None,
        "compile_s": _f(compile_s), "warnings": [], "graph_replay_ms": None,
    }
    if timing is not None:
        row.update(median_ms=_f(timing.median_ms), min_ms=_f(timing.min_ms), max_ms=_f(timing.max_ms),
                   mean_ms=_f(timing.mean_ms), reps=int(timing.reps), warmup=int(timing.warmup))
    return row


def _add_throughput(row: dict, spec: C.OpSpec, shape: C.Shape, dtype: torch.dtype, floor: dict) -> None:
    if row["median_ms"] is None or row["median_ms"] <= 0:
        return
    sec = row["median_ms"] / 1e3
    row["tokens_per_s"] = shape.tokens / sec
    pairs = spec.pairs(shape)
    if pairs is not None:
        row["pairs_per_s"] = pairs / sec
    # the memory floor, beside the pair floor: bytes the op must move in this mode over the copy
    # bandwidth measured in this run (mem_floor_ratio = time / that floor, >= 1)
    moved = spec.min_bytes(shape, dtype, row["mode"])
    row["bytes_moved"] = int(moved)
    row["gb_per_s"] = moved / sec / 1e9
    if floor.get("copy_bytes_per_s"):
        row["mem_floor_ratio"] = sec / (moved / floor["copy_bytes_per_s"])
    if row["mode"] == "bwd":
        return  # the floor is for the work of a whole pass; a backward-only time is not comparable
    if pairs is not None and floor.get("pair_floor_per_s"):
        row["floor_fraction"] = (pairs / floor["pair_floor_per_s"]) / sec
        row["floor_kind"] = "compute"
    elif pairs is None and floor.get("copy_bytes_per_s"):
        row["floor_fraction"] = (moved / floor["copy_bytes_per_s"]) / sec
        row["floor_kind"] = "bandwidth"


def _shape_key(row) -> tuple:
    return tuple(row["shape"][k] for k in C.SHAPE_KEYS)


def add_speedups(rows: List[dict], time_key="median_ms", group=("op", "dtype", "mode"),
                 out_keys=("speedup_vs_eager", "speedup_vs_compile")) -> None:
    """speedup = baseline median / this median, for the same op, dtype, shape and mode."""
    base: Dict[tuple, Dict[str, float]] = {}
    for r in rows:
        if r["backend"] in ("eager", "compile") and r["status"] == "ok" and r.get(time_key):
            base.setdefault(tuple(r[g] for g in group) + (_shape_key(r),), {})[r["backend"]] = r[time_key]
    for r in rows:
        if r["status"] != "ok" or not r.get(time_key):
            continue
        b = base.get(tuple(r[g] for g in group) + (_shape_key(r),), {})
        for name, key in zip(("eager", "compile"), out_keys):
            if name in b:
                r[key] = float(b[name] / r[time_key])


# ------------------------------------------------------------------------------------------ plan

def _impls(op: str, cfg: BenchConfig, device, status, modules, flt, skipped: List[dict]):
    """[(backend, algorithm)] to run for `op`; unavailable combinations go to `skipped`."""
    wanted = list(cfg.backends) if cfg.backends else list(C.ALL_IMPLS)
    out = []
    for name in C.ALL_IMPLS:
        if name not in wanted or not _match(flt, "backend", name):
            continue
        if name == "compile" and not cfg.compile:
            skipped.append({"op": op, "backend": name, "algorithm": None, "reason": "compile baseline disabled (--no-compile)"})
            continue
        if name in C.BASELINES:
            out.append((name, None))
            continue
        state = status.get(name, "unknown")
        if state != "available":
            skipped.append({"op": op, "backend": name, "algorithm": None, "reason": state})
            continue
        if name == "triton" and device.type != "cuda" and not cfg.allow_triton_interpreter:
            skipped.append({"op": op, "backend": name, "algorithm": None,
                            "reason": "Triton on CPU tensors runs in the interpreter (TRITON_INTERPRET=1), "
                                      "a test tool: not benchmarked"})
            continue
        module = modules[name]
        if not hasattr(module, op):
            skipped.append({"op": op, "backend": name, "algorithm": None,
                            "reason": f"the {name} backend does not implement {op} (yet)"})
            continue
        for alg in C.backend_algorithms(name, module, op):
            if _match(flt, "algorithm", alg):
                out.append((name, alg))
        if C.SPECS[op].has_algorithm and "sorted" not in C.backend_algorithms(name, module, op):
            skipped.append({"op": op, "backend": name, "algorithm": "sorted",
                            "reason": f"the {name} backend has no sorted kernel for {op} (it runs pairwise)"})
    return out


def _asked_for(cfg: BenchConfig, flt: Dict[str, set], backend: str) -> bool:
    return bool((cfg.backends and backend in cfg.backends) or backend in flt.get("backend", ()))


def _dtypes(cfg: BenchConfig, device) -> List[str]:
    if cfg.dtypes:
        names = list(cfg.dtypes)
    elif cfg.quick:
        names = ["fp32"]
    elif device.type == "cuda":
        names = ["fp32", "bf16", "fp16"]
    else:
        names = ["fp32", "bf16"]
    for n in names:
        if n not in C.DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(C.DTYPES)}, got {n!r}")
    return names


def build_plan(cfg: BenchConfig, device: torch.device) -> C.SweepPlan:
    plan = C.SweepPlan.default(device, cfg.quick)
    if cfg.tokens:
        plan.tokens = tuple(int(t) for t in cfg.tokens)
    if cfg.nm:
        plan.nm = tuple((int(n), int(m)) for n, m in cfg.nm)
    if cfg.heads:
        plan.heads = tuple(int(h) for h in cfg.heads)
    if cfg.crossover:
        plan.crossover = tuple(int(n) for n in cfg.crossover)
    return plan


# ------------------------------------------------------------------------------------------ run

class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="case", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def start(self, desc: str):
        if self.bar is not None:
            self.bar.set_description_str(desc[:70])

    def done(self):
        if self.bar is not None:
            self.bar.update(1)

    def write(self, msg: str):
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


def _fmt_bytes(n) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def plan_work(cfg: BenchConfig, device: torch.device, plan: C.SweepPlan, status, modules,
              skipped: List[dict]) -> list:
    """[(op, spec, shape, sweeps, dtype name, [(backend, algorithm)])] in the order they run
    (per op, by increasing work); unavailable combinations are appended to `skipped`."""
    flt = parse_filter(cfg.filter)
    ops = [o for o in (cfg.ops or C.OPS) if _match(flt, "op", o)]
    for o in ops:
        if o not in C.SPECS:
            raise ValueError(f"op must be one of {', '.join(C.OPS)}, got {o!r}")
    dtypes = [d for d in _dtypes(cfg, device) if _match(flt, "dtype", d)]
    sweeps = list(cfg.sweeps) if cfg.sweeps else list(C.SWEEPS)
    work = []  # (op, shape, sweeps, dtype, impls)
    for op in ops:
        spec = C.SPECS[op]
        impls = _impls(op, cfg, device, status, modules, flt, skipped)
        for shape, shape_sweeps in plan.shapes(op, sweeps):
            if not _shape_matches(flt, shape) or not _match(flt, "sweep", shape_sweeps):
                continue
            shape_impls = impls
            if "headline" not in shape_sweeps and not _asked_for(cfg, flt, "reference"):
                # dvpo's chunked PyTorch fallback runs at eager speed: by default measure it at the
                # headline shape only (ask for it with --backends/--filter to sweep it too)
                shape_impls = [(b, a) for b, a in impls if b != "reference"]
            for dt in dtypes:
                if dt != dtypes[0] and not cfg.all_dtype_sweeps and not ({"tokens", "headline"} & set(shape_sweeps)):
                    continue  # extra dtypes: the token sweep (and headline) only
                work.append((op, spec, shape, shape_sweeps, dt, shape_impls))
    return work


def describe_plan(cfg: BenchConfig) -> str:
    """What a run with `cfg` would measure (for --list), without running anything."""
    device = E.resolve_device(cfg.device)
    plan = build_plan(cfg, device)
    status, modules = C.backend_ops(device)
    skipped: List[dict] = []
    work = plan_work(cfg, device, plan, status, modules, skipped) if cfg.micro else []
    modes_wanted = [m for m in (cfg.modes or C.MODES) if _match(parse_filter(cfg.filter), "mode", m)]
    lines = [f"device {device}; backends: " + "; ".join(f"{k}: {v}" for k, v in status.items())]
    total = 0
    for op, spec, shape, sweeps, dt, impls in work:
        n_modes = len([m for m in spec.modes if m in modes_wanted])
        total += n_modes * len(impls)
        lines.append(f"  {op:18s} {dt:4s} {shape.label():32s} [{','.join(sweeps)}] x "
                     + ", ".join(b + (f"/{a}" if a else "") for b, a in impls) + f" x {n_modes} modes")
    seen = set()
    for s in skipped:
        key = (s["backend"], s["algorithm"], s["reason"])
        if key not in seen:
            seen.add(key)
            lines.append(f"  not run: {s['backend']}{'/' + s['algorithm'] if s['algorithm'] else ''}: {s['reason']}")
    lines.append(f"{total} measurements planned (before memory/time skips)"
                 + ("; plus the end-to-end step benchmark" if cfg.e2e else ""))
    return "\n".join(lines)


def run_micro(cfg: BenchConfig, device: torch.device, plan: C.SweepPlan, floor: dict,
              policy: TM.TimingPolicy, probe: TM.MemoryProbe, status, modules,
              skipped: List[dict], checkpoint=None, previous: Optional[List[dict]] = None) -> List[dict]:
    flt = parse_filter(cfg.filter)
    ops = [o for o in (cfg.ops or C.OPS) if _match(flt, "op", o)]
    modes_wanted = [m for m in (cfg.modes or C.MODES) if _match(flt, "mode", m)]
    compile_shapes = cfg.compile_shapes or ("headline" if cfg.quick else "all")
    timer = TM.make_timer(device, policy, probe)
    work = plan_work(cfg, device, plan, status, modules, skipped)

    rows: List[dict] = []
    slow: Dict[tuple, Tuple[int, str, float]] = {}
    progress = _Progress(sum(len(w[5]) for w in work), cfg.progress)
    headline = {op: plan.headline_shape(op) for op in ops}
    done = _index_previous(previous or [])
    try:
        for op, spec, shape, shape_sweeps, dt, impls in work:
            dtype = C.DTYPES[dt]
            modes = [m for m in spec.modes if m in modes_wanted]
            if not modes:
                continue
            todo = []
            for backend, alg in impls:
                old = done.get((op, backend, alg, dt, tuple(shape.to_dict().values())), {})
                if all(m in old for m in modes):  # --resume: measured already (ok or skipped)
                    # rows of a file written before graph_replay_ms existed get it as null
                    kept = [{"graph_replay_ms": None, **old[m], "sweeps": list(shape_sweeps)} for m in modes]
                    rows.extend(kept)
                    _note_slow(slow, (op, backend, alg, dt), spec, shape, kept, policy)
                    progress.done()
                else:
                    todo.append((backend, alg))
            if not todo:
                continue
            inputs = spec.make_inputs(shape, dtype, device, cfg.seed)
            for backend, alg in todo:
                progress.start(f"{op} {backend}{'/' + alg if alg else ''} {dt} {shape.label()}")
                new = _run_impl(cfg, device, spec, shape, shape_sweeps, dt, dtype, backend, alg, modes, inputs,
                                timer, policy, floor, slow, compile_shapes, headline[op], progress)
                rows.extend(new)
                progress.done()
            del inputs
            gc.collect(1)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if checkpoint is not None:
                checkpoint(rows)
    except KeyboardInterrupt:
        progress.write("[bench] interrupted: writing the measurements taken so far")
        cfg.interrupted = True
    finally:
        progress.close()
    add_speedups(rows)
    return rows


def _run_impl(cfg, device, spec: C.OpSpec, shape: C.Shape, sweeps, dt, dtype, backend, alg, modes, inputs,
              timer, policy, floor, slow, compile_shapes, headline_shape, progress) -> List[dict]:
    op = spec.name

    def skip_all(reason, status="skipped"):
        return [_row(op, backend, alg, dt, shape, sweeps, m, status, reason) for m in modes]

    key = (op, backend, alg, dt)
    if key in slow and spec.work(shape) > SLOW_WORK_RATIO * slow[key][0] and "headline" not in sweeps:
        _w, label, sec = slow[key]
        return skip_all(f"not run: the smaller case {label} already took {sec:.1f} s per call "
                        f"(> max_call_s={policy.max_call_s:g} s); shapes with more than {SLOW_WORK_RATIO:g}x its "
                        f"work are skipped, not extrapolated")
    if backend in ("eager", "compile"):
        need = spec.eager_bytes(shape) if backend == "eager" else spec.compile_bytes(shape)
        avail = E.memory_available(device)
        if avail is not None and need > cfg.mem_fraction * avail:
            what = ("the [tokens, N, M] pair tensors and [tokens, N, N] rank comparisons of the eager reference"
                    if backend == "eager" else "torch.compile of the reference")
            return skip_all(f"does not fit: {what} need an estimated {_fmt_bytes(need)} > memory budget "
                            f"{_fmt_bytes(cfg.mem_fraction * avail)} ({cfg.mem_fraction:g} x {_fmt_bytes(avail)} "
                            f"available); not run, not extrapolated")
    if backend == "compile":
        compile_ops = cfg.compile_ops or (QUICK_COMPILE_OPS if cfg.quick else C.OPS)
        if op not in compile_ops:
            return skip_all(f"compile baseline not asked for {op} (compile ops: {', '.join(compile_ops)}; "
                            f"--compile-ops to change)")
        if compile_shapes == "headline" and shape != headline_shape:
            return skip_all("quick mode: the compile baseline runs at the headline shape only "
                            "(one compilation per op)")
        if op == "distributional_gae" and shape.T > cfg.compile_max_gae_T:
            return skip_all(f"torch.compile unrolls the reference GAE's Python loop over T={shape.T} steps "
                            f"(compile time grows with T); compiled only for T <= {cfg.compile_max_gae_T}")

    fn = C.impl_fn(op, backend, alg)
    kernel_backend = backend if backend in C.KERNEL_BACKENDS else None
    backward_too = any(m in ("bwd", "fwd+bwd") for m in modes)
    setup, phases = C.phase_fns(spec, fn, inputs, backward_too)
    compile_s = None
    with use_backend(kernel_backend), warnings.catch_warnings(record=True) as caught:
        # e.g. a backend falling back to PyTorch for rows too long for its kernels: the row says so
        warnings.simplefilter("default")
        if backend == "compile":
            try:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                TM._run_phases(phases, setup(), lambda: None)  # compiles the forward (and backward) graphs
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                compile_s = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001  (a failing compile is a result, not a crash)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                progress.write(f"[bench] {op} compile {dt} {shape.label()}: {type(exc).__name__}: {str(exc)[:300]}")
                return skip_all(f"torch.compile failed: {type(exc).__name__}: {str(exc)[:300]}",
                                "skipped" if _is_oom(exc) else "error")
        try:
            meas = timer.run(phases, setup, keep_min_reps="headline" in sweeps)
        except Exception as exc:  # noqa: BLE001
            oom = _is_oom(exc)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            progress.write(f"[bench] {op} {backend} {alg or ''} {dt} {shape.label()}: "
                           f"{type(exc).__name__}: {str(exc)[:200]}")
            return skip_all(f"{'out of memory: ' if oom else ''}{type(exc).__name__}: {str(exc)[:300]}",
                            "skipped" if oom else "error")
        else:
            graph_ms, graph_note = _graph_replay(timer, phases, setup, kernel_backend, shape)  # never raises
        finally:
            for name in spec.grad_args:
                inputs[name].grad = None
    by_mode = {"fwd": (meas.phases[0], meas.phase_mem[0])}
    if len(meas.phases) == 2:
        by_mode["bwd"] = (meas.phases[1], meas.phase_mem[1])
        by_mode["fwd+bwd"] = (meas.total, meas.total_mem)
    notes = [graph_note] if graph_note else []
    for w in caught:
        msg = f"{w.category.__name__}: {w.message}"[:300]
        if msg not in notes and len(notes) < 5:
            notes.append(msg)
    rows = []
    for mode in modes:
        timing, mem = by_mode[mode]
        row = _row(op, backend, alg, dt, shape, sweeps, mode, "ok", None, timing, mem, compile_s)
        row["warnings"] = list(notes)
        if mode == ("fwd+bwd" if len(meas.phases) == 2 else "fwd"):  # the replay is the whole call
            row["graph_replay_ms"] = _f(graph_ms)
        _add_throughput(row, spec, shape, dtype, floor)
        rows.append(row)
    _note_slow(slow, key, spec, shape, rows, policy)
    return rows


def _graph_replay(timer, phases, setup, kernel_backend, shape: C.Shape):
    """(ms, note): the whole call timed by CUDA-graph replay, for a kernel backend on a GPU at up to
    GRAPH_MAX_TOKENS tokens; (None, None) elsewhere, (None, why) when the capture fails (a result,
    not a crash: the row keeps its eager timing)."""
    if not isinstance(timer, TM.CudaTimer) or kernel_backend is None or shape.tokens > GRAPH_MAX_TOKENS:
        return None, None
    try:
        return timer.graph_replay(phases, setup), None
    except Exception as exc:  # noqa: BLE001
        return None, f"CUDA graph replay failed: {type(exc).__name__}: {str(exc)[:200]}"


def _note_slow(slow, key, spec: C.OpSpec, shape: C.Shape, rows: List[dict], policy) -> None:
    """Remember the smallest case of (op, impl, dtype) whose whole call took over max_call_s."""
    calls = [r["max_ms"] for r in rows if r["status"] == "ok" and r["mode"] == rows[-1]["mode"] and r["max_ms"]]
    if calls and max(calls) / 1e3 > policy.max_call_s:
        prev = slow.get(key)
        if prev is None or spec.work(shape) < prev[0]:
            slow[key] = (spec.work(shape), shape.label(), max(calls) / 1e3)


def _index_previous(rows: List[dict]) -> Dict[tuple, Dict[str, dict]]:
    """{(op, backend, algorithm, dtype, shape): {mode: row}} of a previous run's ok/skipped rows."""
    out: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        if r.get("status") not in ("ok", "skipped"):
            continue  # errors are measured again
        key = (r["op"], r["backend"], r.get("algorithm"), r["dtype"], tuple(r["shape"][k] for k in C.SHAPE_KEYS))
        out.setdefault(key, {})[r["mode"]] = r
    return out


def default_tag(cfg: BenchConfig, device: torch.device) -> str:
    return cfg.tag or f"{device.type}{'-quick' if cfg.quick else ''}"


def run(cfg: BenchConfig) -> dict:
    """Run the configured benchmarks, write `<out>/<tag>.json` (+ PNG plots and `<tag>_headline.md`),
    and return the result dict."""
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = E.resolve_device(cfg.device)
    policy = TM.TimingPolicy.default(device, cfg.quick)
    for name in ("warmup_s", "rep_s", "min_reps", "max_reps", "max_call_s"):
        if getattr(cfg, name) is not None:
            setattr(policy, name, type(getattr(policy, name))(getattr(cfg, name)))
    plan = build_plan(cfg, device)
    status, modules = C.backend_ops(device)
    environment = E.environment(device)
    floor = E.measure_floor(device, cfg.quick)
    probe = TM.MemoryProbe(device)
    # Move everything alive now (torch, dynamo, transformers' module objects) out of the collector's
    # reach: a full gc.collect() over that heap takes 0.1-1 s, which per measurement would dominate.
    gc.collect()
    gc.freeze()
    skipped: List[dict] = []
    headline_dtypes = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    result = {
        "schema_version": SCHEMA_VERSION,
        "kind": "dvpo-bench",
        "quick": bool(cfg.quick),
        "argv": list(cfg.argv) if cfg.argv is not None else None,
        "config": cfg.to_dict(),
        "environment": environment,
        "backends": status,
        "skipped": skipped,
        "floor": floor,
        "timing": policy.to_dict(device),
        "memory_method": probe.method,
        "headline": {"op": "critic_loss", "mode": "fwd+bwd", "shape": plan.headline_shape("critic_loss").to_dict(),
                     "dtypes": headline_dtypes},
        "sweeps": {"tokens": list(plan.tokens), "nm": [list(x) for x in plan.nm], "heads": list(plan.heads),
                   "seq": list(plan.seq), "crossover": list(plan.crossover), "N": plan.N, "M": plan.M, "H": plan.H, "gae_T": plan.gae_T,
                   "headline_tokens": plan.headline_tokens},
        "rows": [],
        "e2e": None,
        "files": [],
        "wall_s": None,
    }
    tag = default_tag(cfg, device)
    partial_path = os.path.join(cfg.out, f"{tag}.partial.json")

    def checkpoint(rows):
        """After every case: the measurements so far, in case a kernel under test crashes the process."""
        try:
            os.makedirs(cfg.out, exist_ok=True)
            with open(partial_path + ".tmp", "w") as fh:
                json.dump(_finite(dict(result, rows=rows, partial=True)), fh, default=_json_default)
            os.replace(partial_path + ".tmp", partial_path)
        except OSError:
            pass

    previous = _load_previous(cfg, device, tag) if cfg.resume else None
    try:
        if cfg.micro:
            result["rows"] = run_micro(cfg, device, plan, floor, policy, probe, status, modules, skipped,
                                       checkpoint, previous)
        if cfg.e2e and not cfg.interrupted:
            from dvpo.bench import e2e
            result["e2e"] = e2e.run_e2e(cfg, device, plan, policy, status, modules)
    finally:
        gc.unfreeze()
    result["wall_s"] = time.perf_counter() - t_start
    result["interrupted"] = bool(cfg.interrupted)
    write_outputs(result, cfg.out, tag, plots=cfg.plots)
    if os.path.exists(partial_path):
        os.remove(partial_path)
    return result


def _load_previous(cfg: BenchConfig, device: torch.device, tag: str) -> Optional[List[dict]]:
    for name in (f"{tag}.partial.json", f"{tag}.json"):
        path = os.path.join(cfg.out, name)
        if not os.path.exists(path):
            continue
        try:
            with open(path) as fh:
                old = json.load(fh)
        except (OSError, ValueError) as exc:
            print(f"[bench] --resume: cannot read {path}: {exc}", file=sys.stderr)
            continue
        if (old.get("environment") or {}).get("device") != str(device):
            print(f"[bench] --resume: {path} was measured on another device; starting afresh", file=sys.stderr)
            return None
        print(f"[bench] --resume: reusing the measurements of {path}", file=sys.stderr)
        return old.get("rows") or []
    return None


def write_outputs(result: dict, out_dir: str, tag: str, plots: bool = True) -> List[str]:
    """Write the JSON, the headline Markdown and (optionally) the PNG plots; returns the file paths."""
    from dvpo.bench import report

    os.makedirs(out_dir, exist_ok=True)
    files = []
    # The JSON is what matters: a failing table or plot is reported, never allowed to lose it.
    try:
        md_path = os.path.join(out_dir, f"{tag}_headline.md")
        with open(md_path, "w") as fh:
            fh.write(report.headline_table(result) + "\n")
        files.append(md_path)
    except Exception as exc:  # noqa: BLE001
        result.setdefault("output_errors", []).append(f"markdown: {type(exc).__name__}: {exc}")
    if plots:
        try:
            from dvpo.bench import plots as P
            files.extend(P.make_plots(result, out_dir, tag))
        except Exception as exc:  # noqa: BLE001
            result.setdefault("output_errors", []).append(f"plots: {type(exc).__name__}: {exc}")
    for err in result.get("output_errors", []):
        print(f"[bench] WARNING: {err}", file=sys.stderr)
    json_path = os.path.join(out_dir, f"{tag}.json")
    result["files"] = [os.path.basename(f) for f in [json_path] + files]
    try:
        validate_result(result)
    except ValueError as exc:  # never lose an hour of measurements to a schema slip: write, and say so
        result["schema_problems"] = str(exc)
        print(f"[bench] WARNING: {exc}", file=sys.stderr)
    tmp = json_path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(_finite(result), fh, indent=1, allow_nan=False, default=_json_default)
    os.replace(tmp, json_path)
    return [json_path] + files


def _finite(obj):
    """NaN and infinities are not JSON: write them as null."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj):
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


# ------------------------------------------------------------------------------------------ schema

def _check_row(row: dict, keys: dict, where: str, problems: List[str]) -> None:
    missing = set(keys) - set(row)
    extra = set(row) - set(keys)
    if missing:
        problems.append(f"{where}: missing keys {sorted(missing)}")
    if extra:
        problems.append(f"{where}: unexpected keys {sorted(extra)}")
    for k, types in keys.items():
        if k in row and not isinstance(row[k], types) or (k in row and isinstance(row[k], bool)):
            problems.append(f"{where}: {k}={row[k]!r} is not {'/'.join(t.__name__ for t in types)}")
    if row.get("status") not in STATUSES:
        problems.append(f"{where}: status {row.get('status')!r} not in {STATUSES}")
    if row.get("status") == "ok":
        for k in [k for k in ("median_ms", "min_ms", "max_ms", "step_ms") if k in keys]:
            if not isinstance(row.get(k), float) or not row[k] > 0:
                problems.append(f"{where}: status ok but {k}={row.get(k)!r}")
    elif not row.get("reason"):
        problems.append(f"{where}: status {row.get('status')} needs a reason")
    shape = row.get("shape")
    if isinstance(shape, dict) and not isinstance(shape.get("tokens"), int):
        problems.append(f"{where}: shape.tokens must be an int")


def validate_result(result: dict) -> None:
    """Raise ValueError listing every schema problem (keys, types, one row per measurement)."""
    problems: List[str] = []
    for k in TOP_KEYS:
        if k not in result:
            problems.append(f"missing top-level key {k!r}")
    env = result.get("environment") or {}
    for k in ("device", "device_name", "cpu_model", "torch", "triton", "cuda", "git_commit", "num_threads"):
        if k not in env:
            problems.append(f"environment: missing {k!r}")
    floor = result.get("floor") or {}
    for k in ("matmul_flops_per_s", "pair_floor_per_s", "flops_per_pair", "copy_bytes_per_s"):
        if not isinstance(floor.get(k), (int, float)):
            problems.append(f"floor: {k} missing or not a number")
    seen = set()
    for i, row in enumerate(result.get("rows") or []):
        _check_row(row, ROW_KEYS, f"rows[{i}]", problems)
        if row.get("op") not in C.OPS:
            problems.append(f"rows[{i}]: unknown op {row.get('op')!r}")
        if row.get("backend") not in C.ALL_IMPLS:
            problems.append(f"rows[{i}]: unknown backend {row.get('backend')!r}")
        if row.get("mode") not in C.MODES:
            problems.append(f"rows[{i}]: unknown mode {row.get('mode')!r}")
        ident = (row.get("op"), row.get("backend"), row.get("algorithm"), row.get("dtype"), row.get("mode"),
                 tuple(sorted((row.get("shape") or {}).items(), key=lambda kv: kv[0])))
        if ident in seen:
            problems.append(f"rows[{i}]: duplicate measurement {ident}")
        seen.add(ident)
    for i, s in enumerate(result.get("skipped") or []):
        for k in ("op", "backend", "algorithm", "reason"):
            if k not in s:
                problems.append(f"skipped[{i}]: missing {k!r}")
    e2e = result.get("e2e")
    if e2e is not None:
        if not isinstance(e2e, dict) or "rows" not in e2e or "config" not in e2e:
            problems.append("e2e must be null or {config, rows}")
        else:
            for i, row in enumerate(e2e["rows"]):
                _check_row(row, E2E_ROW_KEYS, f"e2e.rows[{i}]", problems)
    if problems:
        raise ValueError("dvpo bench result does not match the schema:\n  " + "\n  ".join(problems[:50]))

"""CPU benchmark of the fused DVPO critic loss (docs/architecture.md, "Performance": its CPU rows).

Forward + backward of the fused critic loss (all eight terms) at 4096 tokens, N = M = 200, H = 3,
fp32, side by side in one run:
  - eager: dvpo.reference.critic_loss (materializes the [tokens, N, M] pair tensors),
  - compile: torch.compile(dvpo.reference.critic_loss),
  - cpp pairwise / cpp sorted: dvpo.ops.critic_loss with DVPO_BACKEND=cpp and that algorithm,
plus the measured fp32 matmul FLOP/s of this machine and the C++ pairwise kernel's pair throughput
as a fraction of the floor (FLOP/s / 8 flops per pair), and the sorted/pairwise crossover of the
C++ kernels over N = M in {50, 200, 500, 1000, 2000} (quantile Huber alone and the fused critic).

Times are medians of several repetitions after warm-up (time.perf_counter), with torch's default
thread count unless --threads is given. Writes JSON (--out, default
bench/results/cpu_critic_<hostname>.json) with the machine, versions, shapes and every median.

    python bench/cpu_critic.py                      # full run (eager + compile take minutes)
    python bench/cpu_critic.py --quick              # fewer repetitions, smaller crossover sizes
    python bench/cpu_critic.py --skip-eager --skip-compile

On a machine shared with other jobs the numbers are noisy: treat them as indicative.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from dvpo import ops  # noqa: E402
from dvpo import reference as ref  # noqa: E402
from dvpo.config import CriticLossConfig  # noqa: E402

FLOPS_PER_PAIR = 8


# ----------------------------------------------------------------------------------------------
# Machine description
# ----------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict:
    from dvpo.backends import cpp
    return {
        "hostname": socket.gethostname(),
        "device": "cpu",
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "cpp_isa": cpp.isa(),
        "cpp_isa_detected": cpp.isa(detected=True),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def median_time(fn, reps: int, warmup: int = 1) -> dict:
    """Median (and min, all) seconds of fn() over `reps` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "reps": reps, "times_s": times}


def matmul_flops(reps: int) -> dict:
    """Measured fp32 matmul FLOP/s (2 n^3 per n x n product) with torch's threads."""
    best = None
    for n in (1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        t = median_time(lambda: torch.mm(a, b), reps=reps, warmup=2)
        flops = 2.0 * n ** 3 / t["median_s"]
        if best is None or flops > best["flops"]:
            best = {"flops": flops, "n": n, **t}
    return best


def critic_inputs(tokens: int, h: int, n: int, m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    heads = torch.randn(tokens, h, n, generator=g)
    target = torch.randn(tokens, m, generator=g) * 1.5 + 0.2
    return heads, target


def critic_step(fn, heads, target, config):
    """One forward + backward of a critic-loss function fn(theta, target, config=...)."""
    h = heads.detach().requires_grad_(True)

    def step():
        h.grad = None
        out = fn(h, target, config=config)
        out.loss.backward()
        return out
    return step


def cpp_critic(algorithm):
    def fn(h, target, config):
        return ops.critic_loss(h, target, config=config, algorithm=algorithm)
    return fn


def cpp_qh_step(pred, target, algorithm):
    p = pred.detach().requires_grad_(True)

    def step():
        p.grad = None
        ops.quantile_huber(p, target, algorithm=algorithm).backward()
    return step


class forced_backend:
    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.old = os.environ.get("DVPO_BACKEND")
        os.environ["DVPO_BACKEND"] = self.name

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("DVPO_BACKEND", None)
        else:
            os.environ["DVPO_BACKEND"] = self.old


def log(msg):
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--m", type=int, default=200)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions of the C++ kernels")
    parser.add_argument("--ref-reps", type=int, default=3, help="timed repetitions of eager and compile")
    parser.add_argument("--ref-tokens", type=int, default=None,
                        help="tokens for eager and compile (default: --tokens); the speedups then compare the "
                             "C++ kernels at that size too")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--crossover-sizes", type=str, default="50,200,500,1000,2000")
    parser.add_argument("--skip-eager", action="store_true")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--skip-crossover", action="store_true")
    parser.add_argument("--quick", action="store_true", help="3 reps, 1 reference rep, crossover up to 1000")
    parser.add_argument("--out", type=str, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.ref_reps = 3, 1
        args.crossover_sizes = ",".join(s for s in args.crossover_sizes.split(",") if int(s) <= 1000)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_path = args.out or os.path.join(HERE, "results", f"cpu_critic_{socket.gethostname()}.json")

    from dvpo.backends import cpp  # noqa: F401  (fails loudly without the C++ extension)

    info = machine()
    log(f"dvpo CPU critic benchmark on {info['cpu_model']} ({info['torch_threads']} threads, "
        f"ISA {info['cpp_isa']}), torch {info['torch_version']}, commit {info['git_commit']}")
    config = CriticLossConfig()
    T, H, N, M = args.tokens, args.heads, args.n, args.m
    result = {"machine": info, "dtype": "float32", "config": config.__dict__,
              "shape": {"tokens": T, "heads": H, "n": N, "m": M}, "timings": {}, "notes": []}

    mm = matmul_flops(reps=5)
    floor_pairs = mm["flops"] / FLOPS_PER_PAIR
    result["matmul"] = {"flops_per_s": mm["flops"], "n": mm["n"], "median_s": mm["median_s"],
                        "pair_floor_per_s": floor_pairs, "flops_per_pair": FLOPS_PER_PAIR}
    log(f"fp32 matmul: {mm['flops'] / 1e9:.1f} GFLOP/s -> pair floor {floor_pairs / 1e9:.2f} G pairs/s")

    heads, target = critic_inputs(T, H, N, M)
    timings = result["timings"]
    with forced_backend("cpp"):
        for algorithm in ("pairwise", "sorted"):
            t = median_time(critic_step(cpp_critic(algorithm), heads, target, config), reps=args.reps, warmup=2)
            timings[f"cpp_{algorithm}"] = {**t, "tokens": T}
            log(f"cpp {algorithm:8s}: {t['median_s'] * 1e3:9.2f} ms (min {t['min_s'] * 1e3:.2f})")
    pairs = T * N * M
    pair_rate = pairs / timings["cpp_pairwise"]["median_s"]
    result["pair_throughput"] = {"pairs": pairs, "pairs_per_s": pair_rate,
                                 "fraction_of_floor": pair_rate / floor_pairs,
                                 "note": "fused critic fwd+bwd (all terms), pairs = tokens N M"}
    log(f"pair throughput: {pair_rate / 1e9:.2f} G pairs/s = {100 * pair_rate / floor_pairs:.0f}% of the floor")

    # The reference: eager materializes [tokens, N, M]; if it does not fit, halve the tokens and
    # compare at the largest size that ran (nothing is extrapolated).
    with forced_backend("reference"):
        ref_tokens = min(T, args.ref_tokens or T)
        if not args.skip_eager:
            tokens = ref_tokens
            while tokens >= 1:
                try:
                    h_e, z_e = heads[:tokens], target[:tokens]
                    t = median_time(critic_step(ref.critic_loss, h_e, z_e, config), reps=args.ref_reps, warmup=1)
                    timings["eager"] = {**t, "tokens": tokens}
                    log(f"eager reference: {t['median_s'] * 1e3:9.1f} ms at {tokens} tokens")
                    break
                except (RuntimeError, MemoryError) as exc:
                    result["notes"].append(f"eager failed at {tokens} tokens: {type(exc).__name__}: {exc}"[:300])
                    tokens //= 2
                    gc.collect()
        if not args.skip_compile:
            try:
                compiled = torch.compile(ref.critic_loss)
                h_c, z_c = heads[:ref_tokens], target[:ref_tokens]
                t0 = time.perf_counter()
                critic_step(compiled, h_c, z_c, config)()
                compile_s = time.perf_counter() - t0
                t = median_time(critic_step(compiled, h_c, z_c, config), reps=args.ref_reps, warmup=1)
                timings["compile"] = {**t, "tokens": ref_tokens, "first_call_s": compile_s}
                log(f"torch.compile reference: {t['median_s'] * 1e3:9.1f} ms (first call {compile_s:.0f} s)")
            except Exception as exc:  # a compile failure is a result to report, not a crash
                result["notes"].append(f"torch.compile failed: {type(exc).__name__}: {exc}"[:300])
                log(f"torch.compile failed: {exc}")

    ratios = {}
    for base in ("eager", "compile"):
        if base not in timings:
            continue
        tokens = timings[base]["tokens"]
        for algorithm in ("pairwise", "sorted"):
            key = f"cpp_{algorithm}"
            if tokens == T:
                cpp_s = timings[key]["median_s"]
            else:  # compare at the size the reference ran at
                with forced_backend("cpp"):
                    cpp_s = median_time(critic_step(cpp_critic(algorithm), heads[:tokens], target[:tokens], config),
                                        reps=args.reps, warmup=1)["median_s"]
            ratios[f"{key}_vs_{base}"] = timings[base]["median_s"] / cpp_s
    result["speedups"] = ratios
    for k, v in ratios.items():
        log(f"speedup {k}: {v:.1f}x")

    if not args.skip_crossover:
        result["crossover"] = crossover([int(s) for s in args.crossover_sizes.split(",")], H, args.reps, config)

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    log(f"wrote {out_path}")
    return result


def crossover(sizes, h, reps, config):
    """Per-token times of the C++ pairwise and sorted kernels at N = M = size, for the quantile Huber
    loss alone and for the fused critic loss (fwd + bwd), and the sizes where sorted wins."""
    from dvpo.backends import cpp
    rows = []
    with forced_backend("cpp"):
        for n in sizes:
            tokens = max(32, min(4096, int(4096 * 200 * 200 / (n * n))))
            heads, target = critic_inputs(tokens, h, n, n, seed=n)
            pred = heads[:, 0].contiguous()
            row = {"n": n, "m": n, "tokens": tokens}
            for algorithm in ("pairwise", "sorted"):
                t_qh = median_time(cpp_qh_step(pred, target, algorithm), reps=reps, warmup=1)["median_s"]
                t_cr = median_time(critic_step(cpp_critic(algorithm), heads, target, config), reps=reps,
                                   warmup=1)["median_s"]
                row[f"qh_{algorithm}_us_per_token"] = 1e6 * t_qh / tokens
                row[f"critic_{algorithm}_us_per_token"] = 1e6 * t_cr / tokens
            row["qh_sorted_speedup"] = row["qh_pairwise_us_per_token"] / row["qh_sorted_us_per_token"]
            row["critic_sorted_speedup"] = row["critic_pairwise_us_per_token"] / row["critic_sorted_us_per_token"]
            row["auto_picks_sorted"] = cpp.auto_sorted(n, n)
            rows.append(row)
            log(f"crossover N=M={n:5d} ({tokens} tokens): qh pairwise {row['qh_pairwise_us_per_token']:9.2f} "
                f"sorted {row['qh_sorted_us_per_token']:9.2f} us/token ({row['qh_sorted_speedup']:.2f}x); "
                f"critic pairwise {row['critic_pairwise_us_per_token']:9.2f} sorted "
                f"{row['critic_sorted_us_per_token']:9.2f} ({row['critic_sorted_speedup']:.2f}x); "
                f"auto -> {'sorted' if row['auto_picks_sorted'] else 'pairwise'}")
    return rows


if __name__ == "__main__":
    main()

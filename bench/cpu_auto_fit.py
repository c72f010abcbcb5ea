"""Measures the C++ CPU pairwise and sorted quantile-Huber kernels on a grid of (N, M) and fits the
cost model of `algorithm="auto"` (`prefer_sorted` in csrc/cpu/kernels.h):

    pairwise ~ a N M + b N,   sorted ~ c M + d N     (ns per token, one thread)

Timing: ns per token, one thread, `time.process_time` (CPU time of this process: robust to other jobs
on the machine), best of `--runs` alternating runs of the forward kernels (they compute the gradient
in the forward pass; through dvpo.ops, reduction none), fp32, normal data, the ISA variant this CPU runs. Tokens per call shrink with
N M so that every call costs about as much as 4,096 tokens at 200 x 200.

    python bench/cpu_auto_fit.py --out bench/results/<dir>/auto_fit_process_time.json

prints the fitted constants, the rule's choice against the measured faster kernel on every shape,
and (with --out) writes the rows as JSON. Nothing is asserted: the constants in kernels.h are set
by hand from this output.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from tqdm import tqdm

from dvpo import dispatch, ops
from dvpo.backends import cpp

NS = (32, 100, 200, 300, 500, 1000)
MS = (32, 100, 200, 300, 500, 1000, 2000)
OPS = ("qh", "critic")
ALGOS = ("pairwise", "sorted")


def _call(op, algo, theta, heads, z):
    if op == "qh":
        return ops.quantile_huber(theta, z, reduction="none", algorithm=algo)
    return ops.critic_loss(heads, z, reduction="none", algorithm=algo)


def measure(n, m, runs, gen):
    tokens = max(16, min(4096, 4096 * 200 * 200 // (n * m)))
    heads = torch.randn(tokens, 3, n, generator=gen)
    theta = heads[:, 0].contiguous()
    z = torch.randn(tokens, m, generator=gen) * 1.5 + 0.2
    best = {}
    for _ in range(runs):
        for op in OPS:
            for algo in ALGOS:
                _call(op, algo, theta, heads, z)  # warm
                t0 = time.process_time()
                _call(op, algo, theta, heads, z)
                ns = (time.process_time() - t0) / tokens * 1e9
                key = f"{op}_{algo}"
                best[key] = min(best.get(key, float("inf")), ns)
    return {"N": n, "M": m, "tokens": tokens, **best}


def fit(rows, op):
    """Least squares on relative error: each row's equation divided by its measured time."""
    n = np.array([r["N"] for r in rows], float)
    m = np.array([r["M"] for r in rows], float)
    out = {}
    for algo, cols in (("pairwise", (n * m, n)), ("sorted", (m, n))):
        y = np.array([r[f"{op}_{algo}"] for r in rows])
        a = np.stack(cols, 1) / y[:, None]
        coef, *_ = np.linalg.lstsq(a, np.ones_like(y), rcond=None)
        out[algo] = coef
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2, help="alternating runs per shape (best is kept)")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error(f"--runs: expected a positive integer, got {args.runs}")
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    shapes = [(n, m) for n in NS for m in MS]
    with dispatch.use_backend("cpp"):
        rows = [measure(n, m, args.runs, gen) for n, m in tqdm(shapes, desc="shapes")]
    for op in OPS:
        f = fit(rows, op)
        (a, b), (c, d) = f["pairwise"], f["sorted"]
        print(f"{op}: pairwise ~ {a:.3f} N M + {b:.2f} N ns;  sorted ~ {c:.2f} M + {d:.2f} N ns")
    misses = []
    for r in rows:
        for op in OPS:
            faster = "sorted" if r[f"{op}_sorted"] < r[f"{op}_pairwise"] else "pairwise"
            picked = "sorted" if cpp.auto_sorted(r["N"], r["M"]) else "pairwise"
            if picked != faster:
                cost = r[f"{op}_{picked}"] / r[f"{op}_{faster}"]
                misses.append(f"{op} N={r['N']} M={r['M']}: auto picks {picked}, {cost:.2f}x the faster")
    print(f"the current rule misses {len(misses)} of {len(rows) * len(OPS)}" + "".join(f"\n  {x}" for x in misses))
    for r in rows:
        if r["N"] == r["M"]:
            print(f"N = M = {r['N']}: " + ", ".join(f"{k} {r[k]:.0f}" for k in r if "_" in k) + " ns/token")
    if args.out:
        what = ("ns per token, single thread (torch.set_num_threads(1)), time.process_time, best of "
                f"{args.runs} alternating runs, dvpo.ops.quantile_huber and .critic_loss (default config) on "
                "the cpp backend, reduction none, forward only (the kernels compute the gradient in the "
                f"forward pass), fp32, normal targets, {cpp.isa()} variant; "
                "tokens = max(16, min(4096, 4096*200*200/(N*M)))")
        with open(args.out, "w") as fh:
            json.dump({"what": what, "rows": rows}, fh, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

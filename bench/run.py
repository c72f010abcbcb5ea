#!/usr/bin/env python
"""dvpo benchmarks: every op x backend x dtype x shape against eager PyTorch and torch.compile.

    python bench/run.py --quick --out /tmp/bench          # seconds: small shapes, CI and a first look
    python bench/run.py                                   # the full sweep (bench/results/<device>.json)
    python bench/run.py --filter "op=critic_loss;backend=eager,compile,cpp;tokens=4096"
    python bench/run.py --report bench/results/cpu.json   # re-render tables and plots from a JSON
    dvpo bench ...                                        # the same, from an installed dvpo

See bench/README.md for what the columns mean and how the floor is measured.
"""

from __future__ import annotations

import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _bootstrap() -> None:
    """Make `dvpo` and `dvpo.bench` (this folder) importable when run as `python bench/run.py`."""
    if sys.path and sys.path[0] and os.path.abspath(sys.path[0]) == _HERE:
        sys.path.pop(0)  # bench/*.py must not shadow top-level modules or be imported twice
    try:
        import dvpo  # noqa: F401
    except ImportError:
        sys.path.insert(0, os.path.dirname(_HERE))
        import dvpo  # noqa: F401
    import importlib.util

    if "dvpo.bench" in sys.modules:
        return
    found = importlib.util.find_spec("dvpo.bench")
    if found is not None and found.origin and os.path.dirname(os.path.abspath(found.origin)) == _HERE:
        return
    # dvpo was installed before bench/__init__.py existed (or from another checkout): map this folder
    spec = importlib.util.spec_from_file_location("dvpo.bench", os.path.join(_HERE, "__init__.py"),
                                                  submodule_search_locations=[_HERE])
    module = importlib.util.module_from_spec(spec)
    sys.modules["dvpo.bench"] = module
    spec.loader.exec_module(module)
    dvpo.bench = module


def _csv(text):
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _ints(text):
    return [int(t) for t in _csv(text)] if text else None


def _nm(text):
    if not text:
        return None
    out = []
    for item in _csv(text):
        n, _, m = item.lower().partition("x")
        out.append((int(n), int(m or n)))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("what to run")
    g.add_argument("--quick", action="store_true",
                   help="small shapes, fp32, short timings (seconds on a CPU; for CI and a first look)")
    g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    g.add_argument("--ops", help="comma list of quantile_huber,cvar,critic_loss,distributional_gae (default: all)")
    g.add_argument("--backends", help="comma list of eager,compile,reference,cpp,triton,cuda (default: all available)")
    g.add_argument("--dtypes", help="comma list of fp32,bf16,fp16 (default: fp32,bf16 on CPU, all three on GPU; "
                                    "fp32 with --quick)")
    g.add_argument("--modes", help="comma list of fwd,bwd,fwd+bwd (default: all; GAE is forward only)")
    g.add_argument("--sweeps", help="comma list of tokens,nm,heads,seq,crossover (default: all; the headline always "
                                    "runs)")
    g.add_argument("--tokens", help="override the token sweep, e.g. 1024,4096")
    g.add_argument("--nm", help="override the N x M sweep, e.g. 200x200,32x512")
    g.add_argument("--heads", help="override the H sweep, e.g. 1,3,5")
    g.add_argument("--crossover", help="override the N = M sizes of the crossover sweep, e.g. 100,200,300")
    g.add_argument("--filter", help="pick cases: 'key=v1,v2;key=v' with keys op, backend, algorithm, dtype, mode, "
                                    "sweep, tokens, N, M, H, B, T (e.g. 'op=critic_loss;backend=cpp,eager;N=200')")
    g.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile baseline (faster; speedup_vs_compile stays null)")
    g.add_argument("--compile-shapes", choices=("all", "headline"),
                   help="where the compile baseline runs (default: headline with --quick, else all)")
    g.add_argument("--compile-ops", help="ops that get the compile baseline (default: all; with --quick: "
                                         "critic_loss)")
    g.add_argument("--compile-max-gae-t", dest="compile_max_gae_T", type=int, default=16,
                   help="compile the GAE reference only up to this sequence length (its loop over T is unrolled)")
    g.add_argument("--all-dtype-sweeps", action="store_true",
                   help="run the non-fp32 dtypes in every sweep (default: token sweep and headline only)")
    g.add_argument("--no-e2e", dest="e2e", action="store_false", help="skip the end-to-end step benchmark")
    g.add_argument("--e2e-only", action="store_true", help="only the end-to-end step benchmark")
    g.add_argument("--allow-triton-interpreter", action="store_true",
                   help="benchmark the Triton backend on CPU tensors under TRITON_INTERPRET=1 (slow; off by default)")

    g = parser.add_argument_group("how to measure")
    g.add_argument("--mem-fraction", type=float, default=0.5,
                   help="skip eager/compile cases whose estimated peak exceeds this share of free memory (default 0.5)")
    g.add_argument("--warmup-s", type=float, help="warm-up time per measurement (default 0.25 s CPU, 25 ms GPU)")
    g.add_argument("--rep-s", type=float, help="timed repetitions fill this long (default 1 s CPU, 100 ms GPU)")
    g.add_argument("--min-reps", type=int, help="at least this many timed repetitions (default 3 CPU, 10 GPU)")
    g.add_argument("--max-reps", type=int, help="at most this many timed repetitions (default 50 CPU, 1000 GPU)")
    g.add_argument("--max-call-s", type=float,
                   help="a call slower than this is timed once and larger shapes of that implementation are "
                        "skipped (default 30 s CPU, 10 s GPU, 5 s quick)")
    g.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--critic-config", choices=("default", "recipe"), default="default",
                   help="critic loss configuration: the default (consistent tail terms) or the published recipe's")

    g = parser.add_argument_group("output")
    g.add_argument("--out", default=None, help="output folder (default: bench/results/)")
    g.add_argument("--tag", help="file name stem (default: cpu, cuda, cpu-quick, ...)")
    g.add_argument("--no-plots", dest="plots", action="store_false", help="JSON and Markdown only")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--report", metavar="JSON",
                   help="print the Markdown tables of an existing result and redraw its plots (no run)")
    g.add_argument("--list", action="store_true", help="print the planned cases and backend status, run nothing")
    g.add_argument("--strict", action="store_true", help="exit 1 when any measurement ended in an error")
    g.add_argument("--resume", action="store_true",
                   help="reuse the measurements of an interrupted or earlier run (<out>/<tag>.partial.json, "
                        "else <tag>.json) and measure only what is missing (or ended in an error)")


def config_from_args(args, argv=None):
    from dvpo.bench.harness import DEFAULT_OUT, BenchConfig

    return BenchConfig(
        device=args.device, quick=args.quick, out=args.out or DEFAULT_OUT, tag=args.tag,
        ops=_csv(args.ops), backends=_csv(args.backends), dtypes=_csv(args.dtypes), modes=_csv(args.modes),
        sweeps=_csv(args.sweeps), tokens=_ints(args.tokens), nm=_nm(args.nm), heads=_ints(args.heads),
        crossover=_ints(args.crossover),
        filter=args.filter, compile=args.compile, compile_shapes=args.compile_shapes,
        compile_ops=_csv(args.compile_ops),
        compile_max_gae_T=args.compile_max_gae_T, all_dtype_sweeps=args.all_dtype_sweeps,
        micro=not args.e2e_only, e2e=args.e2e or args.e2e_only, mem_fraction=args.mem_fraction,
        warmup_s=args.warmup_s, rep_s=args.rep_s, min_reps=args.min_reps, max_reps=args.max_reps,
        max_call_s=args.max_call_s, threads=args.threads, seed=args.seed, progress=args.progress,
        plots=args.plots, allow_triton_interpreter=args.allow_triton_interpreter, resume=args.resume,
        argv=list(sys.argv[1:] if argv is None else argv),
    )


def run(args, argv=None) -> int:
    from dvpo.bench import harness, report

    if args.report:
        result = report.load(args.report)
        print(report.all_headline_tables(result))
        if args.plots:
            from dvpo.bench import plots

            out = args.out or os.path.dirname(os.path.abspath(args.report))
            tag = args.tag or os.path.splitext(os.path.basename(args.report))[0]
            for path in plots.make_plots(result, out, tag):
                print(f"wrote {path}", file=sys.stderr)
        return 0
    cfg = config_from_args(args, argv)
    from dvpo.bench import cases

    cases.CRITIC_CONFIG = cases.CRITIC_CONFIGS[getattr(args, "critic_config", "default")]
    if args.list:
        print(harness.describe_plan(cfg))
        return 0
    result = harness.run(cfg)
    print(report.all_headline_tables(result))
    rows = result["rows"]
    counts = {s: sum(r["status"] == s for r in rows) for s in harness.STATUSES}
    tag = harness.default_tag(cfg, harness.E.resolve_device(cfg.device))
    print(f"\n{len(rows)} measurements ({counts['ok']} ok, {counts['skipped']} skipped, {counts['error']} errors), "
          f"{len(result['skipped'])} combinations not available; wall {result['wall_s']:.1f} s", file=sys.stderr)
    print(f"wrote {os.path.join(cfg.out, tag + '.json')} and {len(result['files']) - 1} more files in {cfg.out}",
          file=sys.stderr)
    if args.strict and counts["error"]:
        return 1
    return 0


def main(argv=None) -> int:
    _bootstrap()
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args, argv)


if __name__ == "__main__":
    sys.exit(main())

"""`dvpo bench`: the benchmark harness (bench/run.py, installed as dvpo.bench) behind the dvpo CLI.

The harness lives in `bench/` and is packaged as `dvpo.bench` when bench/__init__.py exists; in a
source checkout it is found by path. Options and output are those of `python bench/run.py`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys


def _bench_run_module():
    try:
        return importlib.import_module("dvpo.bench.run")
    except ImportError:
        # an editable install made before bench/__init__.py existed: load bench/run.py by path
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "run.py")
        if not os.path.exists(path):
            raise SystemExit("dvpo bench: the benchmark harness (dvpo.bench) is not installed with this dvpo; "
                             "run it from a source checkout: python bench/run.py")
        spec = importlib.util.spec_from_file_location("_dvpo_bench_run", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module._bootstrap()
        return module


def _names(attr: str):
    """An argparse type: a comma list of names from dvpo.bench.cases.<attr> (imported only when the flag
    is given)."""
    def parse(text):
        from dvpo import cli
        from dvpo.bench import cases

        return cli.csv_of(*getattr(cases, attr))(text)
    parse.__name__ = "list"
    return parse


def _nm(text):
    try:
        pairs = [item.lower().partition("x") for item in str(text).split(",") if item.strip()]
        ok = bool(pairs) and all(int(n) >= 1 and int(m or n) >= 1 for n, _, m in pairs)
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a comma list of NxM (or N) with "
                                         f"integers >= 1, e.g. 200x200,32x512")
    return text


def _filter(text):
    from dvpo.bench.harness import parse_filter

    try:
        parse_filter(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: {exc}") from None
    return text


def add_arguments(parser) -> None:
    from dvpo import cli

    _bench_run_module().add_arguments(parser)
    # the harness's options, with value types that make a bad value a one-line usage error
    cli.retype(parser, {
        "device": cli.device, "ops": _names("OPS"), "compile_ops": _names("OPS"), "backends": _names("ALL_IMPLS"),
        "dtypes": _names("DTYPES"), "modes": _names("MODES"), "sweeps": _names("SWEEPS"),
        "tokens": cli.int_list(1, "token counts", "1024,4096"), "nm": _nm,
        "heads": cli.int_list(1, "head counts", "1,3,5"),
        "crossover": cli.int_list(1, "sizes", "100,200,300"),
        "filter": _filter, "compile_max_gae_T": cli.positive_int,
        "mem_fraction": cli.float_in(0.0, 1.0, lo_open=True), "warmup_s": cli.nonneg_float,
        "rep_s": cli.positive_float, "min_reps": cli.positive_int, "max_reps": cli.positive_int,
        "max_call_s": cli.positive_float, "threads": cli.positive_int, "seed": cli.any_int,
        "report": cli.existing_path,
    })


def run(args) -> int:
    from dvpo.cli import usage_error

    if args.min_reps is not None and args.max_reps is not None and args.min_reps > args.max_reps:
        usage_error(args, f"argument --max-reps: invalid value {args.max_reps!r}: expected an integer >= "
                          f"--min-reps ({args.min_reps})")
    module = _bench_run_module()
    return module.run(args, sys.argv[2:])

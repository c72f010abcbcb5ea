"""`dvpo bench`: the benchmark harness (bench/run.py, installed as dvpo.bench) behind the dvpo CLI.

The harness lives in `bench/` and is packaged as `dvpo.bench` when bench/__init__.py exists; in a
source checkout it is found by path. Options and output are those of `python bench/run.py`.
"""

from __future__ import annotations

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


def add_arguments(parser) -> None:
    _bench_run_module().add_arguments(parser)


def run(args) -> int:
    module = _bench_run_module()
    return module.run(args, sys.argv[2:])

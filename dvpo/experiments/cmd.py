"""`dvpo experiment`: run an experiment grid (algorithms x noise models x seeds x tasks) and report it."""

from __future__ import annotations

import argparse
import os
import shutil
import sys


def _seeds(text: str):
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected distinct comma-separated integers, "
                                          f"e.g. 0,1,2")
    return seeds


def _grid(text: str) -> str:
    """A grid name or file that loads (a bad grid is a one-line usage error naming what is wrong)."""
    from .grid import load_grid

    try:
        load_grid(text)
    except (ValueError, OSError) as exc:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: {exc}") from None
    return text


def add_arguments(parser: argparse.ArgumentParser):
    from dvpo import cli

    parser.add_argument("--grid", required=True, type=_grid,
                        help="a built-in grid (main, ablation, sensitivity, pilot, smoke) or a grid TOML file (required)")
    parser.add_argument("--out", required=True,
                        help="output dir: runs/, sft_cache/, results.csv/.md, plots (required)")
    parser.add_argument("--jobs", type=cli.positive_int, default=None,
                        help="parallel run processes (default: os.cpu_count())")
    parser.add_argument("--list", action="store_true", help="print the runs (and their state) and exit")
    parser.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                        help="run only runs whose name block/task/algo[-variant]/noise/sSEED contains this "
                             "(repeatable: any of them; default: every run)")
    parser.add_argument("--steps", type=cli.positive_int, default=None,
                        help="override the grid's RL steps for quick looks (default: the grid's)")
    parser.add_argument("--seeds", type=_seeds, default=None, help="override the grid's seeds, e.g. 0,1 "
                                                                  "(default: the grid's)")
    parser.add_argument("--report-only", action="store_true",
                        help="only rebuild results.csv, results.md and the plots from the finished runs")
    parser.add_argument("--sft-cache", default=None, help="SFT warm-start cache (default: OUT/sft_cache)")
    parser.add_argument("--full-eval", action="store_true",
                        help="evaluate every finished run's final policy on its task's whole held-out split "
                             "(cached per run in full_eval.json); the tables then compare those scores")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from .grid import expand, load_grid
    from .runner import run_grid, run_state

    from dvpo.cli import usage_error

    grid = load_grid(args.grid)
    out = os.path.abspath(args.out)
    try:
        specs = expand(grid, steps=args.steps, seeds=args.seeds)
    except ValueError as exc:                 # a grid whose runs would share a directory
        usage_error(args, f"argument --grid: invalid value {args.grid!r}: {exc}")
    selected = [s for s in specs if not args.only or any(o in s.name for o in args.only)]
    if args.list:
        print(f"grid {grid.name} ({grid.path}): {len(selected)} of {len(specs)} runs, out {out}")
        for s in selected:
            steps = s.config(out, "").steps
            print(f"{run_state(os.path.join(out, s.rel_dir), steps):8s} {s.name:60s} steps={steps} "
                  f"{s.rel_dir}")
        return 0
    os.makedirs(out, exist_ok=True)
    if not args.report_only:
        try:
            shutil.copyfile(grid.path, os.path.join(out, f"grid_{grid.name}.toml"))
        except shutil.SameFileError:
            pass
        res = run_grid(selected, out, jobs=args.jobs, sft_cache=args.sft_cache, progress=not args.no_progress)
        print(f"runs: {res['ok']} finished now, {res['skipped']} already finished, {res['failed']} failed")
    if args.full_eval:
        from .full_eval import evaluate_runs

        ev = evaluate_runs(selected, out, progress=not args.no_progress)
        print(f"full held-out evaluation: {ev['evaluated']} runs evaluated now, {ev['cached']} already, "
              f"{ev['unfinished']} not finished")
    rep = __import__("dvpo.experiments.report", fromlist=["write_report"]).write_report(
        grid, specs, out, plots=not args.no_plots)
    print(f"{rep['finished']} of {rep['total']} runs finished")
    print(f"results: {rep['csv']}")
    print(f"table: {rep['md']}")
    for p in rep["plots"]:
        print(f"plot: {p}")
    failed = 0 if args.report_only else res["failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    from dvpo.cli import main

    sys.exit(main(["experiment"] + sys.argv[1:]))

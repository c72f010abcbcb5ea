"""Experiment grids over the trainer: `dvpo experiment --grid main --out DIR`.

A grid file (TOML, built-ins in ``dvpo/experiments/grids``) lists algorithms x noise models x seeds x
tasks (x variants); `grid.expand` turns it into one `TrainConfig` per run, `runner.run_grid` runs them
(SFT warm starts first, then a process pool, resumable) and `report.write_report` writes results.csv,
results.md and the plots.
"""

from .grid import Grid, RunSpec, builtin_grids, expand, load_grid, resolve_grid

__all__ = ["Grid", "RunSpec", "builtin_grids", "expand", "load_grid", "resolve_grid"]

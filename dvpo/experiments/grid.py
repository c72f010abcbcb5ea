"""Experiment grids: a small TOML file expanded into one `RunSpec` (a `TrainConfig`) per run.

Format (see ``dvpo/experiments/grids/*.toml``)::

    description = "..."            # optional
    seeds = [0, 1, 2]              # one SFT warm start per (task, seed), shared by every run of that seed

    [base]                         # TrainConfig overrides shared by every run
    steps = 200
    n_eval = 256

    [[block]]                      # one or more blocks: tasks x algos x variants x noises x seeds
    name = "math"
    tasks = ["math"]
    algos = ["dvpo", "ppo"]
    noises = ["none", "flip:0.2"]
    eval_every = 25                # optional block-level TrainConfig overrides (any field name)
    [block.variants]               # optional: variant name -> TrainConfig overrides ("" = none)
    qr_only = { loss_risk = 0.0, loss_cvar = 0.0 }

Overrides are applied base -> block -> variant. The axes (algo, task, noise, seed) and the fields the
runner owns (out, resume, progress, sft_cache, init) cannot be overridden. Unknown keys raise a
ValueError naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Dict, List, Optional, Sequence

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib  # type: ignore

from dvpo.trainer.config import TrainConfig

GRIDS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grids")

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
AXES = ("algo", "task", "noise", "seed")
RUNNER_OWNED = ("out", "resume", "progress", "sft_cache", "init")
TOP_KEYS = ("description", "seeds", "base", "block")
BLOCK_KEYS = ("name", "tasks", "algos", "noises", "variants", "seeds")


def builtin_grids() -> List[str]:
    return sorted(f[:-5] for f in os.listdir(GRIDS_DIR) if f.endswith(".toml"))


def resolve_grid(name_or_path: str) -> str:
    """A grid file: a path, or the name of a built-in grid (main, ablation, sensitivity, pilot, smoke)."""
    if os.path.exists(name_or_path):
        return name_or_path
    path = os.path.join(GRIDS_DIR, name_or_path + ".toml")
    if os.path.exists(path):
        return path
    raise ValueError(f"no grid {name_or_path!r}: not a file, and the built-in grids are {', '.join(builtin_grids())}")


def sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(text)).strip("_") or "_"


@dataclasses.dataclass
class RunSpec:
    block: str
    task: str
    algo: str
    variant: str
    noise: str
    seed: int
    overrides: Dict           # base + block + variant TrainConfig overrides (without the axes)

    @property
    def label(self) -> str:
        """The row name in the tables: algo[-variant]."""
        return f"{self.algo}-{self.variant}" if self.variant else self.algo

    @property
    def rel_dir(self) -> str:
        return os.path.join("runs", sanitize(self.block), sanitize(self.task), sanitize(self.label),
                            sanitize(self.noise), f"s{self.seed}")

    @property
    def name(self) -> str:
        return f"{self.block}/{self.task}/{self.label}/{self.noise}/s{self.seed}"

    def config(self, out_root: str, sft_cache: str, **runtime) -> TrainConfig:
        kw = {"threads": 1, "plots": False}
        kw.update(self.overrides)
        kw.update(algo=self.algo, task=self.task, noise=self.noise, seed=self.seed,
                  out=os.path.join(out_root, self.rel_dir), sft_cache=sft_cache, progress=False)
        kw.update(runtime)
        return TrainConfig(**kw)


@dataclasses.dataclass
class Grid:
    name: str
    path: str
    description: str
    seeds: List[int]
    base: Dict
    blocks: List[Dict]

    def block_order(self) -> Dict[str, Dict]:
        return {b["name"]: b for b in self.blocks}


def _check_overrides(path: str, where: str, d, allow_axes: bool = False) -> Dict:
    if not isinstance(d, dict):
        raise ValueError(f"{path}: {where} must be a table of TrainConfig fields, got {d!r}")
    for key, value in d.items():
        if key not in _FIELDS:
            raise ValueError(f"{path}: unknown TrainConfig field {key!r} in {where}")
        if key in RUNNER_OWNED or (key in AXES and not allow_axes):
            raise ValueError(f"{path}: {where} may not set {key!r} (set by the grid's axes or the runner)")
        default = _FIELDS[key].default
        ok = True
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        if not ok:
            raise ValueError(f"{path}: {where}: {key} = {value!r} should be a {type(default).__name__}")
        choices = _FIELDS[key].metadata.get("choices")
        if choices and value not in choices:
            raise ValueError(f"{path}: {where}: {key} = {value!r} is not one of {', '.join(choices)}")
    return {k: (float(v) if isinstance(_FIELDS[k].default, float) else v) for k, v in d.items()}


def _str_list(path, where, v) -> List[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
        raise ValueError(f"{path}: {where} must be a non-empty list of strings, got {v!r}")
    return v


def _seed_list(path, where, v) -> List[int]:
    if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise ValueError(f"{path}: {where} must be a non-empty list of integers, got {v!r}")
    return v


def load_grid(name_or_path: str) -> Grid:
    """Read and validate a grid file (a ValueError names the file and the offending key)."""
    path = resolve_grid(name_or_path)
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML: {exc}") from exc
    for key in data:
        if key not in TOP_KEYS:
            raise ValueError(f"{path}: unknown top-level key {key!r} (expected {', '.join(TOP_KEYS)})")
    seeds = _seed_list(path, "seeds", data.get("seeds", [0, 1, 2]))
    base = _check_overrides(path, "[base]", data.get("base", {}))
    raw_blocks = data.get("block")
    if not isinstance(raw_blocks, list) or not raw_blocks:
        raise ValueError(f"{path}: needs at least one [[block]]")
    from dvpo.tasks import get_task, parse_noise
    from dvpo.trainer.algorithms import ALGOS

    blocks, names = [], set()
    for i, b in enumerate(raw_blocks):
        where = f"[[block]] #{i + 1}"
        name = b.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{path}: {where} needs a name")
        where = f"[[block]] {name!r}"
        if name in names:
            raise ValueError(f"{path}: duplicate block name {name!r}")
        names.add(name)
        overrides = {k: v for k, v in b.items() if k not in BLOCK_KEYS}
        for k in overrides:
            if k not in _FIELDS:
                raise ValueError(f"{path}: unknown key {k!r} in {where} (expected {', '.join(BLOCK_KEYS)} "
                                 "or a TrainConfig field)")
        overrides = _check_overrides(path, where, overrides)
        tasks = _str_list(path, f"{where} tasks", b.get("tasks"))
        algos = _str_list(path, f"{where} algos", b.get("algos"))
        noises = _str_list(path, f"{where} noises", b.get("noises", ["none"]))
        for a in algos:
            if a not in ALGOS:
                raise ValueError(f"{path}: {where}: unknown algo {a!r} (one of {', '.join(ALGOS)})")
        for t in tasks:
            try:
                get_task(t)
            except Exception as exc:
                raise ValueError(f"{path}: {where}: bad task {t!r}: {exc}") from exc
        for n in noises:
            try:
                parse_noise(n)
            except Exception as exc:
                raise ValueError(f"{path}: {where}: bad noise model {n!r}: {exc}") from exc
        raw_variants = b.get("variants", {"": {}})
        if not isinstance(raw_variants, dict) or not raw_variants:
            raise ValueError(f"{path}: {where} variants must be a table: name -> TrainConfig overrides")
        variants = {str(vn): _check_overrides(path, f"{where} variant {vn!r}", vo)
                    for vn, vo in raw_variants.items()}
        bseeds = _seed_list(path, f"{where} seeds", b["seeds"]) if "seeds" in b else None
        blocks.append({"name": name, "tasks": tasks, "algos": algos, "noises": noises, "variants": variants,
                       "overrides": overrides, "seeds": bseeds})
    gname = os.path.splitext(os.path.basename(path))[0]
    return Grid(name=gname, path=path, description=str(data.get("description", "")), seeds=seeds, base=base,
                blocks=blocks)


def expand(grid: Grid, *, steps: Optional[int] = None, seeds: Optional[Sequence[int]] = None,
           only: Sequence[str] = ()) -> List[RunSpec]:
    """Every run of the grid, seeds interleaved (all seed-0 runs first, in grid order), so a partial
    grid is still a balanced comparison. `steps`/`seeds` override the file; `only` keeps the runs whose
    name (block/task/algo[-variant]/noise/sSEED) contains any of the substrings."""
    specs = []
    for b in grid.blocks:
        bseeds = list(seeds) if seeds is not None else (b["seeds"] or grid.seeds)
        for seed in bseeds:
            for task in b["tasks"]:
                for algo in b["algos"]:
                    for vname, vover in b["variants"].items():
                        for noise in b["noises"]:
                            ov = {**grid.base, **b["overrides"], **vover}
                            if steps is not None:
                                ov["steps"] = int(steps)
                            specs.append(RunSpec(block=b["name"], task=task, algo=algo, variant=vname,
                                                 noise=noise, seed=int(seed), overrides=ov))
    order = sorted(range(len(specs)), key=lambda i: (specs[i].seed, i))
    specs = [specs[i] for i in order]
    if only:
        specs = [s for s in specs if any(o in s.name for o in only)]
    seen = set()
    for s in specs:
        if s.rel_dir in seen:
            raise ValueError(f"{grid.path}: two runs share the directory {s.rel_dir} (duplicate axis values?)")
        seen.add(s.rel_dir)
    return specs

"""The finished runs' final policies evaluated on the whole held-out split of their task
(`dvpo experiment --full-eval`), cached per run in RUN/full_eval.json.

A run evaluates itself on `n_eval` held-out problems while it trains (256 in the built-in grids: cheap,
but a binomial noise of about 0.03 on each number). Every algorithm and seed of a grid is compared on
the same fixed problems, so that noise does not bias a comparison, but it does widen every paired
interval. The whole split (about 1,000 problems for math, 1,900 for science, 3,400 for dialogue)
costs a second or a few per run on a CPU and halves that noise or better."""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Sequence

from .grid import RunSpec
from .runner import FINISHED, read_summary

FILE = "full_eval.json"
WHOLE_SPLIT = 1 << 30  # n_eval larger than any split: the evaluation takes all of it


def read(run_dir: str) -> Optional[Dict]:
    path = os.path.join(run_dir, FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def evaluate_runs(specs: Sequence[RunSpec], out: str, *, progress: bool = True, device: str = "cpu") -> Dict:
    """Evaluate each finished run without a current full_eval.json (one made for its final step), and
    each SFT warm start those runs began from (once, cached in its own dir); returns counts
    {"evaluated", "cached", "unfinished"} of the runs."""
    import torch

    from dvpo.trainer import evaluate_checkpoint

    todo, counts = [], {"evaluated": 0, "cached": 0, "unfinished": 0}
    starts = {}  # the SFT warm starts of the finished runs (their whole-split score is the start row)
    for s in specs:
        run_dir = os.path.join(out, s.rel_dir)
        summ = read_summary(run_dir)
        if not summ or summ.get("status") not in FINISHED:
            counts["unfinished"] += 1
            continue
        sft = summ.get("sft_dir")
        if sft and os.path.isdir(sft) and read(sft) is None:
            starts[sft] = summ.get("task", s.task)
        have = read(run_dir)
        if have is not None and have.get("step") == summ.get("steps"):
            counts["cached"] += 1
            continue
        todo.append(run_dir)
    from tqdm import tqdm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the runs evaluated themselves with their own --threads (1 in grids)
    sizes: Dict[str, int] = {}
    try:
        for sft, task in starts.items():
            _write(sft, evaluate_checkpoint(sft, task=task, n_eval=WHOLE_SPLIT, device=device), sizes)
        for run_dir in tqdm(todo, desc="full held-out evaluation", unit="run", disable=not progress or not todo):
            _write(run_dir, evaluate_checkpoint(run_dir, n_eval=WHOLE_SPLIT, device=device), sizes)
            counts["evaluated"] += 1
    finally:
        torch.set_num_threads(threads)
    return counts


def _write(where: str, res: Dict, sizes: Dict[str, int]):
    """Keep an evaluation's scores, with the number of problems it really had, in where/full_eval.json."""
    from dvpo.tasks import get_task

    keep = {k: res[k] for k in ("heldout_acc", "heldout_reward", "heldout_acc_sampled", "heldout_reward_sampled",
                                "step", "task") if k in res}
    if res["task"] not in sizes:
        sizes[res["task"]] = len(get_task(res["task"]).heldout_set(WHOLE_SPLIT))
    keep["n_eval"] = sizes[res["task"]]
    tmp = os.path.join(where, FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(keep, f, indent=1)
    os.replace(tmp, os.path.join(where, FILE))

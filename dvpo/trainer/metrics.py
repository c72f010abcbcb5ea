"""A run's metric files: `OUT/metrics.jsonl` (one row per step; row 0: the initial evaluation) and
the summary of a finished run (`OUT/summary.json`)."""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List


def read_metrics(out: str) -> List[Dict]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _json_float(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def append_row(path: str, row: Dict):
    with open(path, "a") as f:
        f.write(json.dumps({k: _json_float(v) for k, v in row.items()}) + "\n")


def truncate(path: str, step: int):
    """Drop the rows after `step` (a resumed run redoes them)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(rows)


def summarize(rows: List[Dict]) -> Dict:
    """Held-out accuracy initial/final/best, rewards over the last 10% of steps, step times."""
    evals = [r for r in rows if "heldout_acc" in r]
    steps = [r for r in rows if r["step"] > 0]
    tail = steps[-max(1, len(steps) // 10):] if steps else []
    return {
        "heldout_acc_initial": evals[0]["heldout_acc"] if evals else None,
        "heldout_acc_final": evals[-1]["heldout_acc"] if evals else None,
        "heldout_acc_sampled_initial": evals[0].get("heldout_acc_sampled") if evals else None,
        "heldout_acc_sampled_final": evals[-1].get("heldout_acc_sampled") if evals else None,
        "heldout_reward_final": evals[-1].get("heldout_reward") if evals else None,
        "heldout_acc_best": max(r["heldout_acc"] for r in evals) if evals else None,
        "reward_true_last10pct": sum(r["reward_true"] for r in tail) / len(tail) if tail else None,
        "reward_noisy_last10pct": sum(r["reward_noisy"] for r in tail) / len(tail) if tail else None,
        "sec_per_step_median": sorted(r["t_step"] for r in steps)[len(steps) // 2] if steps else None,
        "cpu_sec_per_step_median": sorted(r["t_step_cpu"] for r in steps)[len(steps) // 2] if steps else None,
        "bad_steps": sum(bool(r.get("bad_step")) for r in steps),
    }

"""`dvpo train`: one RL run (SFT warm start from the cache, then DVPO or a baseline).

Multi-process: `torchrun --standalone --nproc_per_node N -m dvpo train ...` (see `distributed.py`)."""

from __future__ import annotations

import argparse
import json
import os

from .config import TrainConfig, add_config_arguments, config_from_args, explicit_fields


def add_arguments(parser: argparse.ArgumentParser):
    add_config_arguments(parser, TrainConfig)


def resolve_config(args) -> TrainConfig:
    """On --resume the run's saved config is the base; flags given explicitly override it."""
    cfg = config_from_args(TrainConfig, args)
    out = cfg.out
    if cfg.resume and out and os.path.exists(os.path.join(out, "config.json")):
        from .config import from_dict

        with open(os.path.join(out, "config.json")) as f:
            saved = json.load(f)
        given = explicit_fields(args)
        saved.update({k: getattr(cfg, k) for k in given if k in saved})
        saved.update(resume=True, out=out)
        cfg = from_dict(TrainConfig, saved)
    return cfg


def run(args) -> int:
    from .loop import train

    cfg = resolve_config(args)
    summary = train(cfg)        # under torchrun: on every rank (sharded batch, rank 0 writes the files)
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return 0 if summary["status"] == "ok" else 2
    keys = ("status", "steps", "heldout_acc_initial", "heldout_acc_final", "heldout_acc_sampled_initial",
            "heldout_acc_sampled_final", "reward_true_last10pct", "sec_per_step_median", "wall_seconds")
    print(json.dumps({k: summary.get(k) for k in keys}, indent=1))
    print(f"metrics: {os.path.join(summary['out'], 'metrics.jsonl')}")
    for p in summary.get("plots", []):
        print(f"plot: {p}")
    return 0 if summary["status"] == "ok" else 2

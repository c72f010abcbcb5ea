"""`dvpo train`: one RL run (SFT warm start from the cache, then DVPO or a baseline).

Multi-process: `torchrun --standalone --nproc_per_node N -m dvpo train ...` (see `distributed.py`)."""

from __future__ import annotations

import argparse
import json
import math
import os

from .config import TrainConfig, add_config_arguments, check_config, config_from_args, explicit_fields


def add_arguments(parser: argparse.ArgumentParser):
    add_config_arguments(parser, TrainConfig)


def resolve_config(args) -> TrainConfig:
    """On --resume the run's saved config is the base; flags given explicitly override it."""
    from .loop import default_out

    cfg = config_from_args(TrainConfig, args)
    out = cfg.out or default_out(cfg)     # the run dir the trainer will use, --out or not
    if cfg.resume and os.path.exists(os.path.join(out, "config.json")):
        from .config import from_dict

        with open(os.path.join(out, "config.json")) as f:
            saved = json.load(f)
        given = explicit_fields(args)
        saved.update({k: getattr(cfg, k) for k in given if k in saved})
        saved.update(resume=True, out=out)
        cfg = from_dict(TrainConfig, saved)
    return cfg


def step_times(out: str) -> dict:
    """Median, 90th percentile (nearest rank) and max of the wall time per RL step in OUT/metrics.jsonl:
    on a loaded machine the median alone hides the slow steps."""
    from .loop import read_metrics

    t = sorted(r["t_step"] for r in read_metrics(out) if r.get("step", 0) > 0 and "t_step" in r)
    if not t:
        return {"sec_per_step_median": None, "sec_per_step_p90": None, "sec_per_step_max": None}
    return {"sec_per_step_median": t[len(t) // 2],            # the summary's median (upper median)
            "sec_per_step_p90": t[max(0, math.ceil(0.9 * len(t)) - 1)], "sec_per_step_max": t[-1]}


def check_args(args, cfg: TrainConfig) -> None:
    """One-line usage errors for what the per-flag types cannot see: flags that only make sense
    together, and --out holding a run (a new run must not overwrite it; --resume must not change it)."""
    from dvpo.cli import usage_error

    from .loop import RUNTIME_FIELDS, default_out

    bad = check_config(cfg)
    if bad:
        usage_error(args, f"argument {bad[0]}: invalid value {bad[1]!r}: expected {bad[2]}")
    out = cfg.out or default_out(cfg)
    saved_path = os.path.join(out, "config.json")
    if not os.path.exists(os.path.join(out, "ckpt", "state.json")):
        return
    if not cfg.resume:
        usage_error(args, f"argument --out: invalid value {out!r}: it already holds a run; pass --resume to "
                          f"continue it, or another --out")
    if os.path.exists(saved_path):
        with open(saved_path) as f:
            saved = json.load(f)
        for k in sorted(explicit_fields(args)):
            if k in saved and k not in RUNTIME_FIELDS and saved[k] != getattr(cfg, k):
                usage_error(args, f"argument --{k.replace('_', '-')}: invalid value {getattr(cfg, k)!r}: "
                                  f"--resume continues the run in {out} with its saved {saved[k]!r} (only "
                                  f"--steps and runtime flags may change)")


def run(args) -> int:
    from .distributed import under_torchrun

    code = _run(args)
    if under_torchrun():
        _exit_without_teardown(code)
    return code


def _exit_without_teardown(code: int):
    """Leave a torchrun worker without interpreter finalisation. Everything is written and the
    process group destroyed by now, but gloo's worker threads can outlive it and, torn down with the
    interpreter, abort the process ("terminate called without an active exception"), turning a
    finished run into a failed launch."""
    import logging
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(args) -> int:
    from .loop import train

    cfg = resolve_config(args)
    check_args(args, cfg)
    summary = train(cfg)        # under torchrun: on every rank (sharded batch, rank 0 writes the files)
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return 0 if summary["status"] == "ok" else 2
    keys = ("status", "steps", "heldout_acc_initial", "heldout_acc_final", "heldout_acc_sampled_initial",
            "heldout_acc_sampled_final", "reward_true_last10pct", "sec_per_step_median", "sec_per_step_p90",
            "sec_per_step_max", "wall_seconds")
    shown = {**summary, **step_times(summary["out"])}
    shown["sec_per_step_median"] = summary.get("sec_per_step_median")
    print(json.dumps({k: shown.get(k) for k in keys}, indent=1))
    print(f"metrics: {os.path.join(summary['out'], 'metrics.jsonl')}")
    for p in summary.get("plots", []):
        print(f"plot: {p}")
    return 0 if summary["status"] == "ok" else 2

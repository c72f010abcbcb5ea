"""`dvpo demo`: SFT warm-up of a tiny model on 2-digit addition, then a short DVPO run (clean
rewards by default, `--noise flip:0.2` etc. for noisy ones); prints held-out accuracy before and
after, and where the plots are."""

from __future__ import annotations

import argparse
import os
import time


def add_arguments(parser: argparse.ArgumentParser):
    from dvpo import cli

    from .algorithms import ALGOS
    from .config import noise_arg, task_arg

    parser.add_argument("--out", default="dvpo-demo", help="run directory (replaced if it holds a run)")
    parser.add_argument("--task", type=task_arg, default="math", help="math, science or dialogue (NAME[:LEVELS])")
    parser.add_argument("--noise", type=noise_arg, default="none", help="reward noise, e.g. flip:0.2")
    parser.add_argument("--algo", default="dvpo", choices=ALGOS, help="the RL algorithm")
    parser.add_argument("--steps", type=cli.positive_int, default=200, help="RL steps")
    parser.add_argument("--n-quantiles", type=cli.positive_int, default=16,
                        help="critic quantiles per head (16 keeps the demo short while the critic loss runs on "
                             "the PyTorch reference; the paper uses 200)")
    parser.add_argument("--seed", type=cli.any_int, default=0, help="random seed")
    parser.add_argument("--threads", type=cli.nonneg_int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--sft-cache", default=None, help="SFT cache dir (default $DVPO_CACHE or ~/.cache/dvpo)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars (default: progress bars on)")


def run(args) -> int:
    import shutil

    from .cmd_train import step_times
    from .config import TrainConfig
    from .loop import train

    t0 = time.time()
    if os.path.exists(os.path.join(args.out, "ckpt")):
        shutil.rmtree(args.out)
    cfg = TrainConfig(algo=args.algo, task=args.task, noise=args.noise, steps=args.steps, seed=args.seed,
                      out=args.out, threads=args.threads, sft_cache=args.sft_cache, progress=args.progress,
                      eval_every=25, save_every=args.steps, n_quantiles=args.n_quantiles)
    print(f"dvpo demo: SFT warm start, then {cfg.steps} {cfg.algo} steps on {cfg.task} with noise {cfg.noise} "
          f"({cfg.prompts_per_step} prompts x {cfg.group_size} samples per step)")
    s = train(cfg)
    wall = time.time() - t0
    print()
    print(f"held-out accuracy (greedy):  before {s['heldout_acc_initial']:.3f} -> after {s['heldout_acc_final']:.3f}")
    print(f"held-out accuracy (sampled): before {s['heldout_acc_sampled_initial']:.3f} -> after "
          f"{s['heldout_acc_sampled_final']:.3f}")
    print(f"train reward, last 10% of steps: true {s['reward_true_last10pct']:.3f}, "
          f"noisy {s['reward_noisy_last10pct']:.3f}")
    times = step_times(s["out"])
    print(f"{s['steps']} steps: {s['sec_per_step_median']:.2f} s/step median, {times['sec_per_step_p90']:.2f} s "
          f"90th percentile, {times['sec_per_step_max']:.2f} s max (CPU time {s['cpu_sec_per_step_median']:.2f} "
          f"s/step median); {wall:.0f} s in all")
    print(f"metrics: {os.path.join(s['out'], 'metrics.jsonl')}")
    for p in s.get("plots", []):
        print(f"plot: {p}")
    return 0 if s["status"] == "ok" else 2

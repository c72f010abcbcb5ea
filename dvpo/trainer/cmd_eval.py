"""`dvpo eval --ckpt DIR`: held-out accuracy of a run dir (its latest checkpoint) or a policy dir.

For a run dir the defaults repeat the run's own evaluation of that checkpoint (task, problems, the
sampled-accuracy draw of that step, thread count), so the numbers equal the run's metrics.jsonl row."""

from __future__ import annotations

import argparse
import json
import os


def add_arguments(parser: argparse.ArgumentParser):
    from dvpo import cli

    from .config import task_arg

    parser.add_argument("--ckpt", required=True, type=cli.existing_path,
                        help="a run dir (dvpo train --out) or a policy checkpoint dir (required)")
    parser.add_argument("--task", type=task_arg, default=None,
                        help="the task (default: the run's or the SFT checkpoint's)")
    parser.add_argument("--n-eval", type=cli.positive_int, default=None,
                        help="held-out problems (default: the run's --n-eval, else 256)")
    parser.add_argument("--seed", type=cli.any_int, default=None,
                        help="seed of the sampled-accuracy draw (default: for a run dir the draw the run made "
                             "when it evaluated this checkpoint, so the numbers match its metrics; else 0)")
    parser.add_argument("--device", type=cli.device, default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=cli.nonneg_int, default=None,
                        help="torch threads (default: the run's --threads, else torch's default; the thread "
                             "count can change the last bits of the logits and so a sampled token)")


def run(args) -> int:
    import torch

    from dvpo.cli import usage_error

    from .evaluate import CheckpointError, describe_checkpoint, evaluate_checkpoint

    try:
        info = describe_checkpoint(args.ckpt)
    except CheckpointError as exc:
        usage_error(args, f"argument --ckpt: invalid value {args.ckpt!r}: {exc.reason}")
    if args.task is None and info["run"] is None and info["sft"] is None:
        usage_error(args, f"argument --task: needed: {args.ckpt!r} is a policy checkpoint without a run or SFT "
                          f"config; pass --task math, science or dialogue")
    threads = args.threads if args.threads is not None else (info["run"] or {}).get("threads", 0)
    if threads:
        torch.set_num_threads(threads)
    res = evaluate_checkpoint(args.ckpt, task=args.task, n_eval=args.n_eval, seed=args.seed, device=args.device)
    print(json.dumps(res, indent=1))
    if os.path.isdir(args.ckpt):
        with open(os.path.join(args.ckpt, "eval.json"), "w") as f:
            json.dump(res, f, indent=1)
    return 0

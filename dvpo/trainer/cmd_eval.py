"""`dvpo eval --ckpt DIR`: held-out accuracy of a run dir (its latest checkpoint) or a policy dir."""

from __future__ import annotations

import argparse
import json
import os


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--ckpt", required=True, help="a run dir (dvpo train --out) or a policy checkpoint dir")
    parser.add_argument("--task", default=None, help="the task (default: the run's)")
    parser.add_argument("--n-eval", type=int, default=256, help="held-out problems")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled-accuracy draw")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0)


def run(args) -> int:
    import torch

    from .loop import evaluate_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    res = evaluate_checkpoint(args.ckpt, task=args.task, n_eval=args.n_eval, seed=args.seed, device=args.device)
    print(json.dumps(res, indent=1))
    if os.path.isdir(args.ckpt):
        with open(os.path.join(args.ckpt, "eval.json"), "w") as f:
            json.dump(res, f, indent=1)
    return 0

"""The `dvpo` command line: `dvpo <command> [options]` (also `python -m dvpo`).

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
the table below maps command names to those modules, imported only when the command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    # name: (module, one-line help)
    "check": ("dvpo.check", "run the fused critic loss on every available backend against the reference"),
    "sft": ("dvpo.trainer.cmd_sft", "SFT warm-up of the policy on a task (cached by task, model and seed)"),
    "train": ("dvpo.trainer.cmd_train", "one RL run: --algo dvpo|ppo|grpo|robust-ppo|reinforce++ --task --noise"),
    "eval": ("dvpo.trainer.cmd_eval", "held-out accuracy of a run or policy checkpoint (--ckpt DIR)"),
    "demo": ("dvpo.trainer.cmd_demo", "SFT warm-up + a short DVPO run on a tiny model (a few minutes on a CPU)"),
    "experiment": ("dvpo.experiments.cmd", "run an experiment grid (algos x noise x seeds x tasks), resumable; "
                                           "results.csv/.md and plots"),
    "bench": ("dvpo.bench_cli", "benchmark every op and backend against eager PyTorch and torch.compile"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dvpo", description="Fused kernels and a thin trainer for DVPO.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""`dvpo sft`: the SFT warm-up (cached by task, model config, SFT settings and seed)."""

from __future__ import annotations

import argparse
import json
import os

from .config import SFTConfig, add_config_arguments, check_config, config_from_args


def add_arguments(parser: argparse.ArgumentParser):
    add_config_arguments(parser, SFTConfig)
    parser.add_argument("--force", action="store_true", help="retrain even when the cache has it")


def run(args) -> int:
    from .sft import sft

    cfg = config_from_args(SFTConfig, args)
    bad = check_config(cfg)
    if bad:
        from dvpo.cli import usage_error

        usage_error(args, f"argument {bad[0]}: invalid value {bad[1]!r}: expected {bad[2]}")
    path = sft(cfg, force=args.force)
    with open(os.path.join(path, "sft.json")) as f:
        meta = json.load(f)
    print(json.dumps({"checkpoint": path, "steps": meta["steps"], "val_acc": meta["val_acc"]}, indent=1))
    return 0

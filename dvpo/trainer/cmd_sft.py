"""`dvpo sft`: the SFT warm-up (cached by task, model config, SFT settings and seed)."""

from __future__ import annotations

import argparse
import json
import os

from .config import SFTConfig, add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser):
    add_config_arguments(parser, SFTConfig)
    parser.add_argument("--force", action="store_true", help="retrain even when the cache has it")


def run(args) -> int:
    from .sft import sft

    cfg = config_from_args(SFTConfig, args)
    path = sft(cfg, force=args.force)
    with open(os.path.join(path, "sft.json")) as f:
        meta = json.load(f)
    print(json.dumps({"checkpoint": path, "steps": meta["steps"], "val_acc": meta["val_acc"]}, indent=1))
    return 0

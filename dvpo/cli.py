"""The `dvpo` command line: `dvpo <command> [options]` (also `python -m dvpo`).

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
the table below maps command names to those modules, imported only when the command runs.

A bad flag value is a one-line usage error (exit code 2, as argparse does): the flag, the value and
what was expected. The argparse value types below are shared by every command for that purpose;
`usage_error(args, message)` does the same for checks that need more than one flag.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys

COMMANDS = {
    # name: (module, one-line help)
    "info": ("dvpo.build_info", "what was built and why (CUDA decision), versions, CPU ISA, available backends"),
    "calibrate": ("dvpo.calibrate", "known-answer suite: does the critic loss learn the true return distribution?"),
    "check": ("dvpo.check", "run the fused critic loss on every available backend against the reference"),
    "sft": ("dvpo.trainer.cmd_sft", "SFT warm-up of the policy on a task (cached by task, model and seed)"),
    "train": ("dvpo.trainer.cmd_train", "one RL run: --algo (the list: dvpo train --help) --task --noise"),
    "eval": ("dvpo.trainer.cmd_eval", "held-out accuracy of a run or policy checkpoint (--ckpt DIR)"),
    "inspect": ("dvpo.inspection", "what a run's critic learned: value fan charts and advantage heat maps (PNG)"),
    "demo": ("dvpo.trainer.cmd_demo", "SFT warm-up + a short DVPO run on a tiny model (a few minutes on a CPU)"),
    "experiment": ("dvpo.experiments.cmd", "run an experiment grid (algos x noise x seeds x tasks), resumable; "
                                           "results.csv/.md and plots"),
    "bench": ("dvpo.bench_cli", "benchmark every op and backend against eager PyTorch and torch.compile"),
}

# commands that load Hugging Face models (transformers is imported up front to silence it)
_USES_TRANSFORMERS = ("sft", "train", "eval", "demo", "experiment")


# ---- argparse value types: each raises ArgumentTypeError, which argparse prints as
#      "dvpo CMD: error: argument --FLAG: MESSAGE" with exit code 2 ---------------------------------

def _bad(text, expected: str):
    return argparse.ArgumentTypeError(f"invalid value {text!r}: expected {expected}")


def int_at_least(lo: int):
    """An argparse type: an integer >= lo."""
    def parse(text):
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise _bad(text, f"an integer >= {lo}") from None
        if value < lo:
            raise _bad(text, f"an integer >= {lo}")
        return value
    parse.__name__ = f"int>={lo}"
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def any_int(text):
    try:
        return int(text)
    except (TypeError, ValueError):
        raise _bad(text, "an integer") from None


def float_in(lo=None, hi=None, *, lo_open=False, hi_open=False):
    """An argparse type: a finite number in the given range (None: unbounded on that side)."""
    if lo is None and hi is None:
        expected = "a finite number"
    elif hi is None:
        expected = f"a number {'>' if lo_open else '>='} {lo:g}"
    elif lo is None:
        expected = f"a number {'<' if hi_open else '<='} {hi:g}"
    else:
        expected = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def parse(text):
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise _bad(text, expected) from None
        ok = math.isfinite(value)
        if ok and lo is not None:
            ok = value > lo if lo_open else value >= lo
        if ok and hi is not None:
            ok = value < hi if hi_open else value <= hi
        if not ok:
            raise _bad(text, expected)
        return value
    parse.__name__ = "number"
    return parse


finite_float = float_in()
nonneg_float = float_in(0.0)
positive_float = float_in(0.0, lo_open=True)
probability = float_in(0.0, 1.0)
level = float_in(0.0, 1.0, lo_open=True)       # a tail level alpha, beta in (0, 1]


def one_of(*choices):
    """An argparse type for a fixed set of names whose error lists them (like `choices=`, one line)."""
    def parse(text):
        if text not in choices:
            raise _bad(text, "one of " + ", ".join(choices))
        return text
    parse.__name__ = "name"
    return parse


def csv_of(*choices):
    """An argparse type: a comma list of names from `choices` (returned as given, a string)."""
    def parse(text):
        items = [t.strip() for t in str(text).split(",") if t.strip()]
        wrong = [t for t in items if t not in choices]
        if not items or wrong:
            raise _bad(text, "a comma list of " + ", ".join(choices))
        return text
    parse.__name__ = "list"
    return parse


def int_list(lo: int = 1, what: str = "integers", example: str = "1,3"):
    """An argparse type: a non-empty comma list of integers >= lo (returned as given, a string)."""
    def parse(text):
        try:
            items = [int(t) for t in str(text).split(",") if t.strip()]
        except ValueError:
            items = None
        if not items or min(items) < lo:
            raise _bad(text, f"a comma list of {what} >= {lo}, e.g. {example}")
        return text
    parse.__name__ = "list"
    return parse


def device(text):
    """auto, cpu, cuda or cuda:N (the latter two only where CUDA is available)."""
    expected = "auto, cpu, cuda or cuda:N"
    if text in (None, "", "auto"):
        return text
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise _bad(text, expected) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise _bad(text, "auto or cpu: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise _bad(text, f"cuda:N with N < {torch.cuda.device_count()} (the GPUs here)")
    if dev.type not in ("cpu", "cuda"):
        raise _bad(text, expected)
    return text


def existing_path(text):
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: the path does not exist")
    return text


def existing_dir(text):
    if not os.path.isdir(text):
        what = "is not a directory" if os.path.exists(text) else "does not exist"
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: the path {what} (expected a directory)")
    return text


def usage_error(args, message: str):
    """A one-line usage error of the command `args` was parsed for (exit code 2), for checks made after
    parsing (several flags together, the file system)."""
    parser = getattr(args, "_parser", None)
    if parser is not None:
        parser.error(message)
    print(f"dvpo: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def retype(parser: argparse.ArgumentParser, types: dict) -> None:
    """Give the options `types` names (by dest) stricter value types, for parsers built elsewhere."""
    for action in parser._actions:
        if action.dest in types:
            action.type = types[action.dest]


class CommandParser(argparse.ArgumentParser):
    """A command's parser: a usage error is one line, "dvpo CMD: error: MESSAGE" (exit code 2), not the
    usage block (35 lines for `dvpo train`) above it; `dvpo CMD --help` shows the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _unknown_options(parser: argparse.ArgumentParser, extra) -> str:
    """'unrecognized arguments: --lr 3 (did you mean --policy-lr?)' for the first unknown option."""
    import difflib

    msg = "unrecognized arguments: " + " ".join(extra)
    known = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    flags = [x.split("=", 1)[0] for x in extra if x.startswith("--")]
    for flag in flags:
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.5)
        if not close:                            # no near spelling: an option ending in -NAME (--lr: --sft-lr)
            close = [o for o in known if o.endswith("-" + flag[2:])][:1]
        if close:
            return f"{msg} (did you mean {close[0]}?)"
    return msg


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default: " (default: X)" where the help text does not already
    say it ("default" in it), "(default: off)" for on/off flags, "(default: none)" for unset ones."""

    def _get_help_string(self, action):
        text = action.help or ""
        if text is argparse.SUPPRESS or not action.option_strings or "default" in text.lower():
            return text
        if action.nargs == 0:                                   # store_true and friends
            if isinstance(action, argparse._HelpAction) or isinstance(action, argparse._VersionAction):
                return text
            return text + " (default: off)"
        if action.required or action.default is argparse.SUPPRESS:
            return text
        if action.default is None:
            return text + " (default: none)"
        return text + " (default: %(default)s)"


# ---- transformers' output ------------------------------------------------------------------------

def quiet_transformers(import_now: bool = False) -> None:
    """The CLI shows its own progress only: no transformers/huggingface_hub progress bars ("Loading
    weights", "Writing model shards") and no info/warning logs, unless the user set
    TRANSFORMERS_VERBOSITY or HF_HUB_DISABLE_PROGRESS_BARS. The environment covers later imports and
    spawned workers; the calls cover a transformers already imported (and 4.x, whose bars ignore the
    environment)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not import_now and "transformers" not in sys.modules:
        return
    try:
        from transformers.utils import logging as hf_logging
    except Exception:  # noqa: BLE001 - no (usable) transformers: nothing to silence
        return
    if os.environ.get("TRANSFORMERS_VERBOSITY") == "error" and hasattr(hf_logging, "set_verbosity_error"):
        hf_logging.set_verbosity_error()
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").lower() in ("1", "true", "yes", "on") \
            and hasattr(hf_logging, "disable_progress_bar"):
        hf_logging.disable_progress_bar()


# ---- the parser ----------------------------------------------------------------------------------

def _tighten_check(p: argparse.ArgumentParser) -> None:
    """`dvpo check`'s options (defined in dvpo/check.py) with strict value types."""
    def shape(text):
        try:
            dims = [int(x) for x in str(text).split(",")]
        except ValueError:
            dims = []
        if len(dims) != 5 or min(dims) < 1:
            raise _bad(text, "B,T,H,N,M: five integers >= 1, e.g. 4,256,3,200,200")
        return text
    retype(p, {"shape": shape, "reps": positive_int, "device": device})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dvpo", description="Fused kernels and a thin trainer for DVPO.",
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        p.set_defaults(_module=module_name, _parser=p)
        importlib.import_module(module_name).add_arguments(p)
        if name == "check":
            _tighten_check(p)
        for action in p._actions:        # argparse prints no help line (so no default) for help=None
            if action.option_strings and action.help is None:
                action.help = "(default: none)" if action.default is None else "(default: %(default)s)"
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:                         # reported by the command's parser: "dvpo train: error: ..."
        getattr(args, "_parser", parser).error(_unknown_options(getattr(args, "_parser", parser), extra))
    quiet_transformers(import_now=args.command in _USES_TRANSFORMERS)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except BrokenPipeError:
        # the reader went away (`dvpo experiment --list | head`): stop quietly, as other tools do;
        # stdout goes to /dev/null so the interpreter's final flush cannot raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())

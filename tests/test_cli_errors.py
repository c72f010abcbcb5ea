"""The command line's usage errors and help: a bad flag value is one line on stderr naming the flag,
the value and what is accepted, with exit code 2 (no traceback); every option's help shows its
default; transformers' own progress bars and logs stay out of the CLI's output."""

import argparse
import os
import subprocess
import sys

import pytest

from dvpo import cli
from dvpo.cli import main


def _usage_error(argv, capsys):
    """(exit code, stderr lines) of `dvpo ARGV` that must stop at a usage error."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    return exc.value.code, err.strip().splitlines()


BAD = [
    # (argv, flag, value): each must give "dvpo CMD: error: argument FLAG: invalid value ..." on one line
    (["train", "--noise", "flip:2"], "--noise", "flip:2"),
    (["train", "--noise", "flipp:0.3"], "--noise", "flipp:0.3"),
    (["train", "--noise", "vote:2.5"], "--noise", "vote:2.5"),
    (["train", "--noise", "flip:0.1+vote:3"], "--noise", "flip:0.1+vote:3"),
    (["train", "--task", "chess"], "--task", "chess"),
    (["train", "--task", "math:9"], "--task", "math:9"),
    (["train", "--steps", "0"], "--steps", "0"),
    (["train", "--steps", "-5"], "--steps", "-5"),
    (["train", "--algo", "sac"], "--algo", "sac"),
    (["train", "--alpha", "1.5"], "--alpha", "1.5"),
    (["train", "--beta", "0"], "--beta", "0"),
    (["train", "--gamma", "-0.1"], "--gamma", "-0.1"),
    (["train", "--lam", "2"], "--lam", "2"),
    (["train", "--kappa", "0"], "--kappa", "0"),
    (["train", "--kappa", "nan"], "--kappa", "nan"),
    (["train", "--advantage", "cvar:0"], "--advantage", "cvar:0"),
    (["train", "--n-quantiles", "0"], "--n-quantiles", "0"),
    (["train", "--n-heads", "-1"], "--n-heads", "-1"),
    (["train", "--prompts-per-step", "0"], "--prompts-per-step", "0"),
    (["train", "--group-size", "2.5"], "--group-size", "2.5"),
    (["train", "--loss-qh", "-1"], "--loss-qh", "-1"),
    (["train", "--temperature", "0"], "--temperature", "0"),
    (["train", "--threads", "-1"], "--threads", "-1"),
    (["train", "--n-eval", "0"], "--n-eval", "0"),
    (["train", "--sft-target-acc", "1.5"], "--sft-target-acc", "1.5"),
    (["train", "--device", "tpu"], "--device", "tpu"),
    (["train", "--attn", "fast"], "--attn", "fast"),
    (["train", "--model", "/nonexistent/dvpo-model"], "--model", "/nonexistent/dvpo-model"),
    (["train", "--init", "/nonexistent/dvpo-init"], "--init", "/nonexistent/dvpo-init"),
    (["train", "--algo", "grpo", "--group-size", "1", "--out", "/nonexistent/run"], "--group-size", "1"),
    (["train", "--heads", "3", "--out", "/nonexistent/run"], "--heads", "3"),
    (["sft", "--sft-steps", "0"], "--sft-steps", "0"),
    (["sft", "--task", "chess"], "--task", "chess"),
    (["sft", "--heads", "5"], "--heads", "5"),
    (["eval", "--ckpt", "/nonexistent/dvpo-run"], "--ckpt", "/nonexistent/dvpo-run"),
    (["eval", "--ckpt", ".", "--n-eval", "0"], "--n-eval", "0"),
    (["eval", "--ckpt", ".", "--task", "chess"], "--task", "chess"),
    (["eval", "--ckpt", ".", "--threads", "-2"], "--threads", "-2"),
    (["demo", "--steps", "0"], "--steps", "0"),
    (["demo", "--noise", "flip:2"], "--noise", "flip:2"),
    (["demo", "--task", "chess"], "--task", "chess"),
    (["demo", "--algo", "sac"], "--algo", "sac"),
    (["demo", "--n-quantiles", "-4"], "--n-quantiles", "-4"),
    (["experiment", "--grid", "nope", "--out", "x"], "--grid", "nope"),
    (["experiment", "--grid", "smoke", "--out", "x", "--jobs", "0"], "--jobs", "0"),
    (["experiment", "--grid", "smoke", "--out", "x", "--steps", "0"], "--steps", "0"),
    (["experiment", "--grid", "smoke", "--out", "x", "--seeds", "a,b"], "--seeds", "a,b"),
    (["bench", "--ops", "sort"], "--ops", "sort"),
    (["bench", "--min-reps", "0"], "--min-reps", "0"),
    (["bench", "--mem-fraction", "0"], "--mem-fraction", "0"),
    (["bench", "--tokens", "0,1024"], "--tokens", "0,1024"),
    (["bench", "--nm", "200y200"], "--nm", "200y200"),
    (["bench", "--min-reps", "5", "--max-reps", "2"], "--max-reps", "2"),
    (["check", "--shape", "1,2,3"], "--shape", "1,2,3"),
    (["check", "--reps", "0"], "--reps", "0"),
]


@pytest.mark.parametrize("argv,flag,value", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_flag_value_is_one_line_naming_flag_and_value(argv, flag, value, capsys):
    code, lines = _usage_error(argv, capsys)
    assert code == 2
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(f"dvpo {argv[0]}: error: argument {flag}"), line
    assert value in line, line
    assert "Traceback" not in line


@pytest.mark.skipif("calibrate" not in cli.COMMANDS, reason="no dvpo calibrate in this tree")
@pytest.mark.parametrize("argv,flag,value", [(["calibrate", "--steps", "0"], "--steps", "0"),
                                             (["calibrate", "--n", "-3"], "--n", "-3"),
                                             (["calibrate", "--dist", "nope"], "--dist", "nope")])
def test_calibrate_bad_flag_value_is_one_line(argv, flag, value, capsys):
    code, lines = _usage_error(argv, capsys)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"dvpo calibrate: error: argument {flag}") and value in lines[0]


def test_errors_say_what_is_accepted(capsys):
    _, (line,) = _usage_error(["train", "--noise", "flipp:0.3"], capsys)
    assert "flip:P" in line and "gauss:S" in line and "vote:K" in line
    _, (line,) = _usage_error(["train", "--noise", "flip:2"], capsys)
    assert "[0, 1]" in line and "rm:ACC" in line
    _, (line,) = _usage_error(["train", "--task", "chess"], capsys)
    assert "math" in line and "science" in line and "dialogue" in line
    _, (line,) = _usage_error(["train", "--steps", "0"], capsys)
    assert "integer >= 1" in line


def test_eval_of_a_missing_path_says_it_does_not_exist(tmp_path, capsys):
    missing = str(tmp_path / "no-such-run")
    code, lines = _usage_error(["eval", "--ckpt", missing], capsys)
    assert code == 2 and len(lines) == 1
    assert "--ckpt" in lines[0] and missing in lines[0] and "does not exist" in lines[0]
    assert "pass task" not in lines[0]
    # a directory that holds no checkpoint: also one line, saying so
    (tmp_path / "empty").mkdir()
    code, lines = _usage_error(["eval", "--ckpt", str(tmp_path / "empty")], capsys)
    assert code == 2 and len(lines) == 1 and "no config.json" in lines[0]


def test_train_refuses_to_overwrite_a_run_in_one_line(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "state.json").write_text("{}")
    code, lines = _usage_error(["train", "--out", str(tmp_path)], capsys)
    assert code == 2 and len(lines) == 1 and "--out" in lines[0] and "--resume" in lines[0]


def test_unknown_flag_names_the_command_and_suggests(capsys):
    code, lines = _usage_error(["train", "--stepz", "3"], capsys)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("dvpo train: error: unrecognized arguments: --stepz 3") and "--steps" in lines[0]


def _subparsers():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_option_help_shows_its_default():
    missing = []
    for name, p in _subparsers().items():
        fmt = p._get_formatter()
        for action in p._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            text = fmt._get_help_string(action) or ""
            shown = bool(action.help and action.help.strip())        # argparse skips empty help
            if not shown or ("default" not in text.lower() and "required" not in text.lower()):
                missing.append(f"dvpo {name} {action.option_strings[0]}")
    assert not missing, missing


def test_train_help_shows_the_default_out(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())        # undo the help's line wrapping
    assert "--out OUT run directory" in text and "(default: runs/ALGO_TASK_NOISE_sSEED)" in text
    assert "--steps STEPS RL steps (default: 200)" in text
    assert "(default: True) (default" not in text            # said once


def test_eval_help_says_why_its_seed_default_matches_training(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the draw the run made when it evaluated this checkpoint" in text


@pytest.fixture
def hf_env():
    """Restore the environment and transformers' logging state the quieting changes."""
    from transformers.utils import logging as hf_logging

    keys = ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")
    saved = {k: os.environ.get(k) for k in keys}
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    for k in keys:
        os.environ.pop(k, None)
    yield hf_logging
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    hf_logging.set_verbosity(verbosity)
    (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


# huggingface_hub warns when bars are re-enabled while its environment variable (set by the CLI) says off
@pytest.mark.filterwarnings("ignore:Cannot enable progress bars")
def test_cli_silences_transformers(hf_env):
    hf_env.enable_progress_bar()
    hf_env.set_verbosity_info()
    cli.quiet_transformers(import_now=True)
    assert not hf_env.is_progress_bar_enabled()
    assert hf_env.get_verbosity() == hf_env.ERROR
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"       # spawned workers and later imports


@pytest.mark.filterwarnings("ignore:Cannot enable progress bars")
def test_cli_keeps_transformers_output_the_user_asked_for(hf_env):
    os.environ["TRANSFORMERS_VERBOSITY"] = "info"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "0"
    hf_env.enable_progress_bar()
    hf_env.set_verbosity_info()
    cli.quiet_transformers(import_now=True)
    assert hf_env.is_progress_bar_enabled() and hf_env.get_verbosity() == hf_env.INFO


def test_step_times_report_the_90th_percentile(tmp_path):
    import json

    from dvpo.trainer.cmd_train import step_times

    rows = [{"step": 0, "heldout_acc": 0.1}] + [{"step": i, "t_step": float(i)} for i in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = step_times(str(tmp_path))
    assert t == {"sec_per_step_median": 6.0, "sec_per_step_p90": 9.0, "sec_per_step_max": 10.0}


def test_demo_prints_median_and_p90_step_time(tmp_path, monkeypatch, capsys):
    """The demo's timing line (the run itself replaced by a stub: the real one takes minutes)."""
    import json

    import dvpo.trainer.loop as loop

    out = tmp_path / "demo"
    out.mkdir()
    times = [0.4] * 8 + [2.5, 3.0]            # a loaded machine: the median hides two slow steps
    rows = [{"step": 0}] + [{"step": i + 1, "t_step": t} for i, t in enumerate(times)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"status": "ok", "out": str(out), "steps": 10, "heldout_acc_initial": 0.4, "heldout_acc_final": 0.5,
               "heldout_acc_sampled_initial": 0.1, "heldout_acc_sampled_final": 0.2, "reward_true_last10pct": 0.5,
               "reward_noisy_last10pct": 0.5, "sec_per_step_median": 0.4, "cpu_sec_per_step_median": 0.8}
    monkeypatch.setattr(loop, "train", lambda cfg: summary)
    assert main(["demo", "--out", str(out), "--steps", "10", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "0.40 s/step median, 2.50 s 90th percentile, 3.00 s max" in text


def test_output_cut_short_by_its_reader_ends_quietly(tmp_path):
    """`dvpo experiment --list | head -1`: the closed pipe ends the command without a traceback."""
    cmd = (f"{sys.executable} -m dvpo.cli experiment --grid main --out {tmp_path / 'x'} --list | head -1")
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("grid main"), out.stdout
    assert "Traceback" not in out.stderr and "BrokenPipeError" not in out.stderr, out.stderr[-2000:]

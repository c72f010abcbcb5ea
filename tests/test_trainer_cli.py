"""The `dvpo sft | train | eval` commands at tiny sizes (in-process through dvpo.cli.main)."""

import json

import pytest

from dvpo.cli import main
from dvpo.trainer.loop import read_metrics

TINY = ["--hidden", "16", "--layers", "1", "--heads", "2", "--ffn", "32", "--sft-steps", "10", "--sft-batch", "16",
        "--sft-eval-every", "10", "--threads", "1", "--no-progress"]
RUN = ["--prompts-per-step", "2", "--group-size", "2", "--n-eval", "4", "--n-quantiles", "4", "--no-plots"]


def test_sft_train_eval_resume(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    assert main(["sft", "--task", "science", "--sft-cache", cache, *TINY]) == 0
    sft_out = json.loads(capsys.readouterr().out)
    assert sft_out["checkpoint"].startswith(cache) and sft_out["steps"] == 10
    out = str(tmp_path / "run")
    args = ["train", "--algo", "dvpo", "--task", "science", "--noise", "rm:0.72", "--steps", "2", "--seed", "0",
            "--out", out, "--sft-cache", cache, "--loss-shape", "0.5", "--alpha", "0.2", *TINY, *RUN]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "metrics:" in text
    with open(tmp_path / "run" / "config.json") as f:
        saved = json.load(f)
    assert saved["loss_shape"] == 0.5 and saved["alpha"] == 0.2 and saved["noise"] == "rm:0.72"
    # --resume continues from the saved config: only --steps (and runtime flags) need repeating
    assert main(["train", "--out", out, "--resume", "--steps", "3", "--no-progress"]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    capsys.readouterr()
    assert main(["eval", "--ckpt", out, "--n-eval", "8"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["task"] == "science" and 0.0 <= res["heldout_acc"] <= 1.0 and len(res["examples"]) == 5
    assert main(["eval", "--ckpt", sft_out["checkpoint"], "--n-eval", "8"]) == 0


def test_train_from_a_local_checkpoint(tmp_path):
    """--model PATH: a local Hugging Face checkpoint (here a saved tiny Qwen2 with its tokenizer)."""
    import torch

    from dvpo.tasks import get_task, tokenizer_for
    from dvpo.trainer.models import tiny_config
    from transformers import AutoModelForCausalLM

    tok = tokenizer_for(get_task("math"))
    cfg = tiny_config("qwen2", len(tok), 16, 1, 2, 32, 64, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    out = str(tmp_path / "run")
    assert main(["train", "--algo", "ppo", "--model", str(tmp_path / "hf"), "--steps", "1", "--out", out,
                 "--sft-cache", str(tmp_path / "cache"), *TINY, *RUN]) == 0
    assert read_metrics(out)[-1]["step"] == 1


def test_bad_arguments(capsys):
    """Usage errors, not tracebacks (tests/test_cli_errors.py checks every flag)."""
    for argv in (["train", "--algo", "sac"], ["train", "--noise", "flip:7", "--out", "/nonexistent/never"],
                 ["train", "--steps", "0", "--out", "/nonexistent/never"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_eval_of_a_run_repeats_the_runs_own_evaluation(tmp_path, capsys):
    """`dvpo eval --ckpt RUN` gives exactly the held-out numbers (greedy and sampled) that the run logged
    for the step of its checkpoint: same problems, same sampling draw. The SFT is long enough (80 steps)
    that the accuracies are not 0, which would make the comparison vacuous."""
    out = str(tmp_path / "run")
    sft = ["--sft-steps", "80", "--sft-lr", "0.01", "--sft-batch", "32", "--sft-eval-every", "20"]
    args = ["train", "--algo", "dvpo", "--task", "science", "--steps", "2", "--out", out,
            "--sft-cache", str(tmp_path / "cache"), *TINY, *RUN, *sft, "--n-eval", "32"]
    assert main(args) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out[:captured.out.index("metrics:")])
    assert summary["sec_per_step_p90"] >= summary["sec_per_step_median"] > 0
    # the CLI shows its own progress only: no transformers bars ("Loading weights", "Writing model shards")
    assert "Loading weights" not in captured.err and "Writing model shards" not in captured.err
    last = read_metrics(out)[-1]
    assert last["step"] == 2 and 0 < last["heldout_acc_sampled"] < 1
    assert main(["eval", "--ckpt", out]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["step"] == 2 and res["n_eval"] == 32
    assert res["heldout_acc"] == last["heldout_acc"]
    assert res["heldout_acc_sampled"] == last["heldout_acc_sampled"]
    assert res["heldout_reward"] == last["heldout_reward"]
    # the Python API agrees; another --seed is another draw (the old fixed seed 0 was one)
    from dvpo.trainer import evaluate_checkpoint

    again = evaluate_checkpoint(out)
    assert again["heldout_acc_sampled"] == last["heldout_acc_sampled"]
    other = evaluate_checkpoint(out, seed=0)
    assert other["sampled_seed"] == 0 and other["heldout_acc"] == last["heldout_acc"]


def test_parser_has_the_trainer_commands():
    from dvpo.cli import COMMANDS, build_parser

    assert {"check", "sft", "train", "eval", "demo"} <= set(COMMANDS)
    args = build_parser().parse_args(["demo", "--steps", "3", "--noise", "flip:0.2"])
    assert args.steps == 3 and args.noise == "flip:0.2"

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


def test_bad_arguments():
    with pytest.raises(SystemExit):
        main(["train", "--algo", "sac"])
    with pytest.raises(ValueError):
        main(["train", "--noise", "flip:7", "--steps", "0", "--out", "/nonexistent/never"])


def test_parser_has_the_trainer_commands():
    from dvpo.cli import COMMANDS, build_parser

    assert {"check", "sft", "train", "eval", "demo"} <= set(COMMANDS)
    args = build_parser().parse_args(["demo", "--steps", "3", "--noise", "flip:0.2"])
    assert args.steps == 3 and args.noise == "flip:0.2"

"""End-to-end trainer runs at tiny sizes: every algorithm x task x noise model, exact resume,
NaN handling, the fused critic op inside the trainer, checkpoint formats."""

import json
import os

import pytest
import torch

import dvpo
from dvpo.trainer import TrainConfig, train
from dvpo.trainer.algorithms import ALGOS
from dvpo.trainer.loop import read_metrics

TASKS = ("math", "science", "dialogue")
NOISES = ("none", "flip:0.3", "gauss:0.3", "rm:0.72", "missing:0.3", "vote:3")
TINY = dict(hidden=16, layers=1, heads=2, ffn=32, sft_steps=10, sft_batch=16, sft_eval_every=10,
            prompts_per_step=2, group_size=2, n_eval=4, n_quantiles=4, n_heads=2, steps=1, eval_every=100,
            progress=False, plots=False, threads=1)


@pytest.fixture(scope="session")
def sft_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sft-cache"))


def tiny(sft_cache, out, **kw):
    return TrainConfig(**{**TINY, "sft_cache": sft_cache, "out": str(out), **kw})


def _strip_timings(rows):
    return [{k: v for k, v in r.items() if not k.startswith("t_")} for r in rows]


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("algo", ALGOS)
def test_every_algo_task_noise_trains(algo, task, noise, sft_cache, tmp_path):
    s = train(tiny(sft_cache, tmp_path, algo=algo, task=task, noise=noise), log=None)
    assert s["status"] == "ok" and s["steps"] == 1
    rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [0, 1]
    r = rows[1]
    for key in ("reward_true", "reward_noisy", "kl", "entropy", "pg_loss", "t_step", "t_sample", "t_update"):
        assert key in r and r[key] == r[key], key
    assert "heldout_acc" in rows[0] and "heldout_acc" in r          # evaluated at the start and the end
    if noise == "none":
        assert r["reward_true"] == r["reward_noisy"]
    if noise.startswith("vote"):
        assert "vote_label_acc" in r
    if algo == "dvpo":
        assert all(f"term_{n}" in r for n in dvpo.TERM_NAMES)
    if algo in ("dvpo", "ppo", "robust-ppo"):
        assert "critic_loss" in r
    assert r["skipped_updates"] == 0 and not r["bad_step"]


@pytest.mark.parametrize("variant", [
    dict(algo="dvpo", noise="vote:3+flip:0.3"),
    dict(algo="robust-ppo", noise="missing:0.3+gauss:0.1", shared_critic=True, minibatches=2),
])
def test_resume_is_exact(variant, sft_cache, tmp_path):
    kw = dict(steps=4, eval_every=2, save_every=100, **variant)
    train(tiny(sft_cache, tmp_path / "full", **kw), log=None)
    full = read_metrics(str(tmp_path / "full"))
    s = train(tiny(sft_cache, tmp_path / "cut", **kw), stop_at=2, log=None)
    assert s["status"] == "stopped"
    s = train(tiny(sft_cache, tmp_path / "cut", resume=True, **kw), log=None)
    assert s["status"] == "ok"
    cut = read_metrics(str(tmp_path / "cut"))
    assert [r["step"] for r in cut] == [0, 1, 2, 3, 4]
    assert _strip_timings(cut) == _strip_timings(full)


def test_resume_after_a_kill_between_checkpoints(sft_cache, tmp_path):
    """Killed at step 3 with the last checkpoint at step 2: row 3 is dropped and redone identically."""
    kw = dict(algo="ppo", noise="flip:0.2", steps=4, eval_every=100, save_every=2)
    train(tiny(sft_cache, tmp_path / "full", **kw), log=None)
    train(tiny(sft_cache, tmp_path / "cut", **kw), stop_at=3, checkpoint_on_stop=False, log=None)
    assert [r["step"] for r in read_metrics(str(tmp_path / "cut"))] == [0, 1, 2, 3]
    with open(tmp_path / "cut" / "ckpt" / "state.json") as f:
        assert json.load(f)["step"] == 2
    train(tiny(sft_cache, tmp_path / "cut", resume=True, **kw), log=None)
    assert _strip_timings(read_metrics(str(tmp_path / "cut"))) == _strip_timings(read_metrics(str(tmp_path / "full")))


def test_resume_refuses_a_different_config_and_an_occupied_dir(sft_cache, tmp_path):
    train(tiny(sft_cache, tmp_path, algo="grpo"), log=None)
    with pytest.raises(FileExistsError):
        train(tiny(sft_cache, tmp_path, algo="grpo"), log=None)
    with pytest.raises(ValueError, match="differs"):
        train(tiny(sft_cache, tmp_path, algo="grpo", policy_lr=1.0, resume=True, steps=2), log=None)


def test_trainer_uses_the_fused_critic_op(sft_cache, tmp_path, monkeypatch):
    calls = []
    real = dvpo.ops.critic_loss

    def counting(theta, target, *args, **kwargs):
        calls.append((tuple(theta.shape), tuple(target.shape), kwargs.get("config")))
        return real(theta, target, *args, **kwargs)

    monkeypatch.setattr(dvpo.ops, "critic_loss", counting)
    cfg = tiny(sft_cache, tmp_path, algo="dvpo", ppo_epochs=1, minibatches=2, cliprange_value=0.0,
               n_heads=3, n_quantiles=5, loss_shape=0.5)
    s = train(cfg, log=None)
    assert s["status"] == "ok"
    assert len(calls) == 2                               # one call per minibatch
    for theta_shape, target_shape, config in calls:
        assert theta_shape[-2:] == (3, 5) and target_shape[-1] == 5 and len(theta_shape) == 4
        assert config == cfg.critic_loss_config() and config.shape == 0.5
    calls.clear()
    train(tiny(sft_cache, tmp_path / "clip", algo="dvpo", ppo_epochs=2, minibatches=1, cliprange_value=0.2), log=None)
    assert len(calls) == 4                               # value clipping: loss at theta and at clipped theta


def test_nan_loss_skips_and_aborts(sft_cache, tmp_path, monkeypatch):
    from dvpo.trainer import losses

    real = losses.policy_loss
    state = {"n": 0, "nan_calls": {1}}

    def flaky(*args, **kwargs):
        state["n"] += 1
        loss, stats = real(*args, **kwargs)
        if state["n"] in state["nan_calls"]:
            loss = loss * float("nan")
        return loss, stats

    monkeypatch.setattr(losses, "policy_loss", flaky)
    s = train(tiny(sft_cache, tmp_path / "one", algo="ppo", steps=3, ppo_epochs=1), log=None)
    rows = read_metrics(str(tmp_path / "one"))
    assert s["status"] == "ok" and s["bad_steps"] == 1
    assert rows[1]["bad_step"] and rows[1]["skipped_updates"] == 1 and not rows[2]["bad_step"]

    state.update(n=0, nan_calls=set(range(1, 100)))
    s = train(tiny(sft_cache, tmp_path / "all", algo="ppo", steps=10, ppo_epochs=1, max_bad_steps=3), log=None)
    assert s["status"] == "aborted" and s["steps"] == 3
    from safetensors.torch import load_file
    before = load_file(str(tmp_path / "all" / "ref" / "model.safetensors"))
    after = load_file(str(tmp_path / "all" / "ckpt" / "policy" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)      # no update was applied


def test_checkpoint_files_are_safetensors_and_json(sft_cache, tmp_path):
    train(tiny(sft_cache, tmp_path, algo="dvpo", plots=True, steps=2), log=None)
    exts = set()
    for root, _, files in os.walk(tmp_path):
        for f in files:
            exts.add(os.path.splitext(f)[1])
    assert exts <= {".json", ".jsonl", ".safetensors", ".png"}, exts
    for name in ("rewards.png", "value_fan.png", "critic_terms.png", "summary.json", "value_fan.json"):
        assert (tmp_path / name).exists(), name
    with open(tmp_path / "ckpt" / "state.json") as f:
        state = json.load(f)
    assert set(state["rng"]) >= {"sample", "shuffle", "noise", "vote", "prompts", "global"}


@pytest.mark.parametrize("variant", [dict(arch="qwen2"), dict(algo="dvpo", advantage="cvar:0.25", shared_critic=True),
                                     dict(algo="grpo", grpo_scale=False, task="math:1-5")])
def test_variants_run(variant, sft_cache, tmp_path):
    assert train(tiny(sft_cache, tmp_path, **variant), log=None)["status"] == "ok"


def test_deterministic_given_the_seed(sft_cache, tmp_path):
    a = train(tiny(sft_cache, tmp_path / "a", algo="dvpo", noise="flip:0.3", steps=2), log=None)
    b = train(tiny(sft_cache, tmp_path / "b", algo="dvpo", noise="flip:0.3", steps=2), log=None)
    c = train(tiny(sft_cache, tmp_path / "c", algo="dvpo", noise="flip:0.3", steps=2, seed=1), log=None)
    ra, rb, rc = (_strip_timings(read_metrics(s["out"])) for s in (a, b, c))
    assert ra == rb and ra != rc
    assert a["sft_dir"] == b["sft_dir"] != c["sft_dir"]             # the SFT warm start is cached per seed

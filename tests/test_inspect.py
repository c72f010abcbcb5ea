"""`dvpo inspect`: value fan charts and advantage heat maps of tiny runs (dvpo, ppo, grpo), their
summary.json checked against an independent recomputation (the critic's outputs from the saved
checkpoint, the float64 reference GAE), determinism, and the usage errors."""

import json
import os

import numpy as np
import pytest
import torch

from dvpo import reference
from dvpo.cli import main
from dvpo.trainer import TrainConfig, train

TINY = dict(hidden=16, layers=1, heads=2, ffn=32, sft_steps=10, sft_batch=16, sft_eval_every=10,
            prompts_per_step=2, group_size=2, n_eval=4, n_quantiles=5, n_heads=2, steps=2, eval_every=100,
            progress=False, plots=False, threads=1, task="math",
            policy_lr=0.01, kl_coef=0.5)    # a policy that moved off its reference, a KL term that matters


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect-runs")
    cache = str(root / "sft")
    out = {}
    for name, algo, noise, extra in (("dvpo", "dvpo", "flip:0.3", {}), ("ppo", "ppo", "flip:0.3", {}),
                                     ("grpo", "grpo", "none", {}), ("robust-ppo", "robust-ppo", "none", {}),
                                     ("shared", "dvpo", "none", {"shared_critic": True, "steps": 1})):
        out[name] = str(root / name)
        train(TrainConfig(**{**TINY, "algo": algo, "noise": noise, "sft_cache": cache, "out": out[name], **extra}),
              log=None)
    return out


def _inspect(argv, capsys):
    capsys.readouterr()
    assert main(["inspect", *argv]) == 0
    return capsys.readouterr()


def _image_ok(path):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 300
    rgb = img[..., :3]
    assert (rgb.std(axis=(0, 1)) > 0.05).any()                 # not one flat colour
    assert (rgb.min(-1) < 0.5).mean() > 0.005                  # some dark pixels: text, lines, cells


def _response_batch(tok, rows):
    """Right-padded response ids and mask from the summary's token lists."""
    ids = [[tok.eos_token_id if t == "eos" else tok.convert_tokens_to_ids(t) for t in row] for row in rows]
    width = max(len(r) for r in ids)
    r_ids = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
    r_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, r in enumerate(ids):
        r_ids[i, :len(r)] = torch.tensor(r)
        r_mask[i, :len(r)] = 1
    return r_ids, r_mask


def _critic_outputs(run, prompts, tokens):
    """[B, R, H, N] from the run's saved policy and critic, loaded independently of the command."""
    from dvpo.trainer.models import build_critic, load_critic_into, load_policy
    from dvpo.trainer.rollout import critic_values, encode_prompts

    policy, tok = load_policy(os.path.join(run, "ckpt", "policy"), torch.device("cpu"), bf16=False)
    with open(os.path.join(run, "ckpt", "critic", "critic.json")) as f:
        meta = json.load(f)
    critic = load_critic_into(build_critic(policy, meta["n_heads"], meta["n_out"], meta["shared"], seed=123),
                              os.path.join(run, "ckpt", "critic"))
    ids, mask = encode_prompts(tok, prompts, "cpu")
    r_ids, r_mask = _response_batch(tok, tokens)
    with torch.no_grad():
        return critic_values(critic, ids, mask, r_ids, r_mask).double(), r_mask


def _whiten(x, m):
    n = m.sum()
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / n
    return (x - mean) / torch.sqrt(var + 1e-8) * m


def _reference_advantages(cfg, values_ensemble, heat, r_mask):
    """The trainer's recipe from the summary's rewards and KL: token rewards, reference GAE, whitening."""
    m = r_mask.double()
    rewards = torch.zeros_like(m)
    for i, (kl, seen) in enumerate(zip(heat["kl"], heat["noisy_reward"])):
        rewards[i, :len(kl)] = -cfg["kl_coef"] * torch.tensor(kl, dtype=torch.float64)
        rewards[i, len(kl) - 1] += seen
    adv, _ = reference.distributional_gae(rewards, values_ensemble, m, gamma=cfg["gamma"], lam=cfg["lam"])
    return _whiten(adv, m)


def _padded(rows, width):
    out = torch.zeros(len(rows), width, dtype=torch.float64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.float64)
    return out


def test_one_dvpo_run(runs, tmp_path, capsys):
    out = tmp_path / "insp"
    _inspect(["--ckpt", runs["dvpo"], "--out", str(out), "--n-prompts", "4", "--n-responses", "6", "--seed", "3",
              "--device", "cpu"], capsys)
    assert sorted(os.listdir(out)) == ["advantages.png", "fan_dvpo.png", "summary.json"]
    for png in ("advantages.png", "fan_dvpo.png"):
        _image_ok(out / png)
    s = json.loads((out / "summary.json").read_text())
    (run,) = s["runs"]
    assert run["algo"] == "dvpo" and run["step"] == 2 and run["critic"]["heads"] == 2 and run["critic"]["outputs"] == 5
    fan = run["fan"]
    assert len(fan) == 4
    # the per-token quantiles are the mean over heads of the critic's outputs, recomputed here
    v, _ = _critic_outputs(runs["dvpo"], [r["prompt"] for r in fan], [r["tokens"] for r in fan])
    for i, row in enumerate(fan):
        n = len(row["tokens"])
        assert n >= 1 and np.array(row["quantiles"]).shape == (n, 5)
        torch.testing.assert_close(torch.tensor(row["quantiles"], dtype=torch.float64), v[i, :n].mean(1),
                                   rtol=1e-5, atol=1e-6)
        taus = np.array(run["critic"]["taus"])
        for j in range(n):                        # the median band: the sorted quantile function at 0.5
            assert row["q50"][j] == pytest.approx(np.interp(0.5, taus, np.sort(row["quantiles"][j])), abs=1e-9)
            assert row["q10"][j] <= row["q25"][j] <= row["q50"][j] <= row["q75"][j] <= row["q90"][j]
        assert row["true_reward"] in (0.0, 1.0) and row["noisy_reward"] in (0.0, 1.0)
    # the heat map: 6 rows, 3 prompts x 2; advantages as the trainer computes them
    heat = run["heat"]
    assert len(heat["tokens"]) == 6 and heat["prompts"][0] == heat["prompts"][1] != heat["prompts"][2]
    assert all(len(a) == len(t) == len(k) for a, t, k in zip(heat["advantages"], heat["tokens"], heat["kl"]))
    for t, seen in zip(heat["true_reward"], heat["noisy_reward"]):          # flip:P: r or 1 - r
        assert seen in (t, 1.0 - t)
    v, r_mask = _critic_outputs(runs["dvpo"], heat["prompts"], heat["tokens"])
    with open(os.path.join(runs["dvpo"], "config.json")) as f:
        cfg = json.load(f)
    want = _reference_advantages(cfg, v.mean(2), heat, r_mask)
    got = _padded(heat["advantages"], r_mask.shape[1])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert abs(float((got * r_mask).sum())) < 1e-4                          # whitened: zero mean
    # deterministic given --seed
    out2 = tmp_path / "again"
    _inspect(["--ckpt", runs["dvpo"], "--out", str(out2), "--n-prompts", "4", "--n-responses", "6", "--seed", "3"],
             capsys)
    assert json.loads((out2 / "summary.json").read_text())["runs"][0]["heat"] == heat


def test_two_runs_side_by_side_and_a_run_without_critic(runs, tmp_path, capsys):
    out = tmp_path / "pair"
    _inspect(["--ckpt", runs["dvpo"], "--ckpt", runs["ppo"], "--out", str(out), "--n-prompts", "2",
              "--n-responses", "4"], capsys)
    assert sorted(os.listdir(out)) == ["advantages.png", "fan_dvpo.png", "fan_ppo.png", "summary.json"]
    for png in ("advantages.png", "fan_dvpo.png", "fan_ppo.png"):
        _image_ok(out / png)
    s = json.loads((out / "summary.json").read_text())
    dv, pp = s["runs"]
    assert dv["heat"]["prompts"] == pp["heat"]["prompts"]                    # the same prompts
    assert [r["prompt"] for r in dv["fan"]] == [r["prompt"] for r in pp["fan"]]
    assert "value" in pp["fan"][0] and "quantiles" not in pp["fan"][0]
    # ppo: GAE of the scalar critic (the reference op with M = 1)
    heat = pp["heat"]
    v, r_mask = _critic_outputs(runs["ppo"], heat["prompts"], heat["tokens"])
    with open(os.path.join(runs["ppo"], "config.json")) as f:
        cfg = json.load(f)
    want = _reference_advantages(cfg, v[..., 0, :1], heat, r_mask)
    torch.testing.assert_close(_padded(heat["advantages"], r_mask.shape[1]), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(pp["fan"][0]["value"], dtype=torch.float64),
                               _critic_outputs(runs["ppo"], [pp["fan"][0]["prompt"]],
                                               [pp["fan"][0]["tokens"]])[0][0, :, 0, 0], rtol=1e-5, atol=1e-6)

    # grpo: no critic, so no fan chart (one line says so); its heat map is the group-normalised reward.
    # Beside it robust-ppo: a fan of the worst of its scalar heads, with their range.
    out = tmp_path / "grpo"
    text = _inspect(["--ckpt", runs["grpo"], "--ckpt", runs["robust-ppo"], "--out", str(out), "--n-prompts", "2",
                     "--n-responses", "4"], capsys)
    assert "no critic" in text.out + text.err
    assert sorted(os.listdir(out)) == ["advantages.png", "fan_robust-ppo.png", "summary.json"]
    _image_ok(out / "fan_robust-ppo.png")
    gr, rp = json.loads((out / "summary.json").read_text())["runs"]
    assert gr["fan"] is None and gr["critic"] is None
    heat = gr["heat"]
    r = torch.tensor(heat["noisy_reward"], dtype=torch.float64).view(-1, 2)
    want = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).reshape(-1)
    for row, a in zip(heat["advantages"], want.tolist()):
        assert row == pytest.approx([a] * len(row), abs=1e-5)
    row = rp["fan"][0]
    assert all(lo <= v <= hi and v == lo for lo, v, hi in zip(row["head_min"], row["value"], row["head_max"]))


def test_shared_critic_values_come_from_the_policy_trunk(runs, tmp_path, capsys):
    from dvpo.trainer.models import build_critic, load_critic_into, load_policy
    from dvpo.trainer.rollout import encode_prompts, score

    out = tmp_path / "shared"
    _inspect(["--ckpt", runs["shared"], "--out", str(out), "--n-prompts", "2", "--n-responses", "2"], capsys)
    _image_ok(out / "fan_shared.png")
    run = json.loads((out / "summary.json").read_text())["runs"][0]
    assert run["critic"]["shared"] is True
    ckpt = os.path.join(runs["shared"], "ckpt")
    policy, tok = load_policy(os.path.join(ckpt, "policy"), torch.device("cpu"), bf16=False)
    critic = load_critic_into(build_critic(policy, 2, 5, True, seed=1), os.path.join(ckpt, "critic"))
    fan = run["fan"]
    ids, mask = encode_prompts(tok, [r["prompt"] for r in fan], "cpu")
    r_ids, r_mask = _response_batch(tok, [r["tokens"] for r in fan])
    with torch.no_grad():
        _, _, hidden = score(policy, ids, mask, r_ids, r_mask, want_hidden=True)
        q = critic.heads_from_hidden(hidden).double().mean(2)
    for i, row in enumerate(fan):
        torch.testing.assert_close(torch.tensor(row["quantiles"], dtype=torch.float64), q[i, :len(row["tokens"])],
                                   rtol=1e-5, atol=1e-6)


def _usage_error(argv, capsys, prefix="dvpo inspect: error: argument"):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(prefix), lines
    return lines[0]


def test_bad_flags(runs, tmp_path, capsys):
    out = str(tmp_path / "o")
    missing = str(tmp_path / "no-such-run")
    line = _usage_error(["inspect", "--ckpt", missing, "--out", out], capsys)
    assert "--ckpt" in line and missing in line and "does not exist" in line
    (tmp_path / "empty").mkdir()
    line = _usage_error(["inspect", "--ckpt", str(tmp_path / "empty"), "--out", out], capsys)
    assert "--ckpt" in line and "neither a run dir" in line
    policy_only = os.path.join(runs["dvpo"], "ref")                   # a policy checkpoint, not a run
    assert "not a run dir" in _usage_error(["inspect", "--ckpt", policy_only, "--out", out], capsys)
    line = _usage_error(["inspect", "--ckpt", runs["dvpo"], "--ckpt", runs["ppo"], "--ckpt", runs["grpo"],
                         "--out", out], capsys)
    assert "--ckpt" in line and "at most two" in line
    for flag, value in (("--n-prompts", "0"), ("--n-responses", "-1"), ("--seed", "x"), ("--device", "tpu"),
                        ("--group-size", "0"), ("--n-responses", "3")):
        line = _usage_error(["inspect", "--ckpt", runs["dvpo"], "--out", out, flag, value], capsys)
        assert line.startswith(f"dvpo inspect: error: argument {flag}") and value in line
    (tmp_path / "file").write_text("x")
    line = _usage_error(["inspect", "--ckpt", runs["dvpo"], "--out", str(tmp_path / "file")], capsys)
    assert "--out" in line and "not a directory" in line
    assert "--ckpt" in _usage_error(["inspect", "--out", out], capsys, prefix="dvpo inspect: error: the following "
                                                                              "arguments are required")
    assert not os.path.exists(out)


def _rtg(rewards, m, gamma):
    out = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        running = 0.0
        for t in reversed(range(rewards.shape[1])):
            if m[b, t]:
                running = float(rewards[b, t]) + gamma * running
                out[b, t] = running
    return out


@pytest.mark.parametrize("algo,extra", [("dvpo", {}), ("dvpo", {"advantage": "cvar:0.3"}),
                                        ("dvpo", {"advantage": "trim:0.2"}), ("ppo", {}),
                                        ("robust-ppo", {}), ("reinforce++", {}), ("grpo", {}),
                                        ("grpo", {"grpo_scale": False})])
def test_advantages_follow_each_algorithms_definition(algo, extra):
    """inspection.advantages on random data (ragged masks, an empty row) against the formulas written out:
    token rewards (outcome at the last real token, -kl_coef * KL at each), then the algorithm's estimator."""
    from dvpo.inspection import advantages

    g = torch.Generator().manual_seed(7)
    b, t, h, n = 6, 7, 3, 5
    lens = [7, 3, 1, 5, 0, 6]
    m = torch.tensor([[1.0] * k + [0.0] * (t - k) for k in lens])
    values = torch.randn(b, t, h, n, generator=g)
    kl = torch.randn(b, t, generator=g).abs()
    outcome = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    cfg = {"algo": algo, "gamma": 0.9, "lam": 0.8, "kl_coef": 0.3, **extra}
    adv, _, what = advantages(cfg, values if algo in ("dvpo", "ppo", "robust-ppo") else None, outcome, m, kl, 2)
    assert algo in what and adv.shape == (b, t)
    rewards = -0.3 * kl * m
    for i, k in enumerate(lens):
        if k:
            rewards[i, k - 1] += outcome[i]
    v64 = values.double()
    if algo == "grpo":
        r = outcome.double().view(-1, 2)
        c = r - r.mean(1, keepdim=True)
        if extra.get("grpo_scale", True):
            c = c / (r.std(1, keepdim=True) + 1e-6)
        want = c.reshape(-1, 1) * m
    elif algo == "reinforce++":
        want = _whiten(_rtg(rewards.double(), m, 0.9), m.double())
    else:
        ens = {"dvpo": v64.mean(2), "ppo": v64[..., 0, :1],
               "robust-ppo": v64[..., 0].min(-1, keepdim=True).values}[algo]
        a, returns = reference.distributional_gae(rewards.double(), ens, m, gamma=0.9, lam=0.8)
        if extra.get("advantage", "").startswith("cvar:"):
            a = reference.cvar(returns - ens, 0.3) * m
        elif extra.get("advantage", "").startswith("trim:"):  # floored at the 0.2-quantile (atom ceil(0.2 n) - 1)
            srt = ens.sort(-1).values
            a = torch.maximum(a, srt[..., 0] - ens.mean(-1)) * m
        want = _whiten(a, m.double())
    torch.testing.assert_close(adv.double(), want, rtol=1e-4, atol=1e-5)
    assert float(adv[4].abs().sum()) == 0.0                     # the empty row stays 0

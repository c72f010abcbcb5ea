"""`dvpo inspect --ckpt RUN [--ckpt RUN2] --out DIR`: what a trained critic learned, as PNGs.

- `fan_<run>.png`: for a few held-out prompts, one sampled response each, the critic's value
  distribution before every response token (quantile bands of the ensemble: the mean over the H heads
  of each quantile, as the trainer forms it), with the true reward and the noisy reward the run would
  have seen marked at the end. Scalar critics (ppo, robust-ppo) give a line (robust-ppo: the minimum
  over its heads, with their range shaded). Critic-free runs (grpo, reinforce++) have no fan chart.
- `advantages.png`: a heat map of the advantages over a batch of sampled responses, one row per
  response, computed as the trainer computes them for the run's algorithm (token rewards with the
  outcome at the last token and the KL penalty, GAE from `dvpo.ops.distributional_gae`, whitened over
  the batch). Two runs: side by side, the same prompts and sampling draws, one colour scale.
- `summary.json`: the numbers behind the figures.

The module is named `inspection` (not `inspect`) so that it never shadows the standard library."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from typing import Dict, List, Optional

BANDS = (0.1, 0.25, 0.5, 0.75, 0.9)         # quantile levels drawn (interpolated) in the fan chart
SHOWN = {" ": "␣", "<bos>": "bos", "<pad>": "pad"}   # as drawn (a space would be invisible; short names)


def add_arguments(parser: argparse.ArgumentParser):
    from dvpo import cli

    parser.add_argument("--ckpt", action="append", required=True, metavar="RUN",
                        help="a run dir (dvpo train --out); give it twice to compare two runs, e.g. a dvpo "
                             "and a ppo run (required)")
    parser.add_argument("--out", required=True, help="output dir for the PNGs and summary.json (required)")
    parser.add_argument("--n-prompts", type=cli.positive_int, default=6,
                        help="held-out prompts in the value fan chart")
    parser.add_argument("--n-responses", type=cli.positive_int, default=8,
                        help="responses (rows) in the advantage heat map")
    parser.add_argument("--group-size", type=cli.positive_int, default=2,
                        help="heat map responses per prompt (grpo normalises the reward within each group); "
                             "must divide --n-responses")
    parser.add_argument("--seed", type=cli.any_int, default=0,
                        help="seed of the sampling and reward-noise draws (the same for both runs)")
    parser.add_argument("--device", type=cli.device, default="auto", help="auto, cpu, cuda or cuda:N")


# ---- loading a run ---------------------------------------------------------------------------------

class RunError(ValueError):
    pass


class RunView:
    """A run dir's latest checkpoint: config, task, noise model, policy, reference policy and critic."""

    def __init__(self, path: str, device):
        import torch

        from dvpo.tasks import get_task, parse_noise
        from dvpo.trainer.evaluate import CheckpointError, describe_checkpoint
        from dvpo.trainer.models import build_critic, load_critic_into, load_policy

        try:
            info = describe_checkpoint(path)
        except CheckpointError as exc:
            raise RunError(f"invalid value {path!r}: {exc.reason}") from None
        if info["run"] is None:
            raise RunError(f"invalid value {path!r}: not a run dir (dvpo train --out): no run config.json there")
        cfg = info["run"]
        self.path, self.cfg, self.step, self.device = path, cfg, info["step"], device
        self.algo = cfg["algo"]
        self.task = get_task(cfg["task"])
        self.noise = parse_noise(cfg.get("noise", "none"), salt=cfg.get("seed", 0))
        self.max_new = cfg.get("max_new_tokens") or self.task.max_new_tokens
        self.temperature = float(cfg.get("temperature", 1.0))
        self.bf16 = bool(cfg.get("bf16", True))
        attn = cfg.get("attn", "auto")
        self.policy, self.tok = load_policy(info["policy_dir"], device, attn, self.bf16)
        ref_dir = os.path.join(path, "ref")
        if not os.path.isdir(ref_dir):                  # older runs: the init dir recorded in the state
            try:
                with open(os.path.join(path, "ckpt", "state.json")) as f:
                    ref_dir = json.load(f).get("init_dir") or ""
            except (OSError, ValueError):
                ref_dir = ""
        if not os.path.isdir(ref_dir):
            raise RunError(f"invalid value {path!r}: the run has no reference policy (no ref/ dir), needed for "
                           f"the KL term of the rewards")
        self.ref, _ = load_policy(ref_dir, device, attn, self.bf16)
        self.critic, self.taus = None, None
        critic_dir = os.path.join(os.path.dirname(info["policy_dir"]), "critic")
        if os.path.exists(os.path.join(critic_dir, "critic.json")):
            with open(os.path.join(critic_dir, "critic.json")) as f:
                meta = json.load(f)
            self.critic = load_critic_into(build_critic(self.policy, meta["n_heads"], meta["n_out"],
                                                        meta["shared"], seed=0), critic_dir)
            self.critic.eval()
            import dvpo

            self.taus = dvpo.taus(meta["n_out"], cfg.get("taus", "midpoint"), dtype=torch.float64)
        self.name = os.path.basename(os.path.normpath(os.path.abspath(path)))

    def autocast(self):
        from dvpo.trainer.models import autocast

        return autocast(self.device, self.bf16)

    # ---- batches ----
    def sample(self, prompts: List[str], uniforms):
        """(prompt ids, prompt mask, response ids, response mask) of one sample per prompt, drawn with
        `uniforms` [len(prompts), >= max_new] (see rollout.sample: a row depends on its own draws)."""
        from dvpo.trainer.rollout import encode_prompts, sample

        ids, mask = encode_prompts(self.tok, prompts, self.device)
        with self.autocast():
            r_ids, r_mask = sample(self.policy, ids, mask, self.max_new, self.tok.eos_token_id,
                                   self.tok.pad_token_id, temperature=self.temperature,
                                   uniforms=uniforms[:, :max(1, self.max_new)].to(self.device))
        return ids, mask, r_ids, r_mask

    def values(self, ids, mask, r_ids, r_mask):
        """The critic's outputs [B, R, H, N] (fp32) before each response token, or None."""
        from dvpo.trainer.rollout import critic_values, score

        if self.critic is None:
            return None
        with self.autocast():
            if self.critic.backbone is None:             # shared critic: heads on the policy trunk
                _, _, hidden = score(self.policy, ids, mask, r_ids, r_mask, want_hidden=True)
                v = self.critic.heads_from_hidden(hidden)
            else:
                v = critic_values(self.critic, ids, mask, r_ids, r_mask)
        return v.float()

    def tokens(self, r_ids, r_mask) -> List[List[str]]:
        out = []
        for ids, m in zip(r_ids.cpu().tolist(), r_mask.cpu().tolist()):
            toks = self.tok.convert_ids_to_tokens([i for i, keep in zip(ids, m) if keep])
            out.append(["eos" if t == self.tok.eos_token else t for t in toks])
        return out

    def noisy_rewards(self, problems, texts, true, seed: int) -> List[float]:
        """The rewards the run would have seen for these responses: its noise model applied with draws
        from `seed` (rm:ACC is a fixed hash of the run's seed and the pair; vote:K labels are the
        majority of K samples of the reference policy, drawn from `seed`)."""
        import torch

        from dvpo.trainer.rollout import decode, encode_prompts, sample

        vote = None
        k = self.noise.vote_k
        if k:
            labels = {}
            distinct = list(dict.fromkeys(p.prompt for p in problems))
            by_prompt = {p.prompt: p for p in problems}
            g = torch.Generator()
            g.manual_seed(_stream(seed, "vote"))
            u = torch.rand(len(distinct) * k, max(1, self.max_new), generator=g)
            ids, mask = encode_prompts(self.tok, [q for q in distinct for _ in range(k)], self.device)
            with self.autocast():
                r_ids, r_mask = sample(self.ref, ids, mask, self.max_new, self.tok.eos_token_id,
                                       self.tok.pad_token_id, temperature=self.temperature, uniforms=u.to(self.device))
            samples = decode(self.tok, r_ids, r_mask)
            for i, q in enumerate(distinct):
                labels[q] = self.task.majority(by_prompt[q], samples[i * k:(i + 1) * k])
            vote = [self.task.vote_reward(p, t, labels[p.prompt]) for p, t in zip(problems, texts)]
        g = torch.Generator()
        g.manual_seed(_stream(seed, "noise"))
        noisy, _ = self.noise.apply(true, generator=g, prompts=[p.prompt for p in problems], responses=texts,
                                    vote_rewards=vote)
        fill = float(self.cfg.get("missing_fill", 0.0))
        return [fill if math.isnan(x) else float(x) for x in noisy]


def _stream(seed: int, name: str) -> int:
    """A seed for one of the command's draws (sampling, noise, votes), stable across runs and versions."""
    import zlib

    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


def _uniforms(seed: int, name: str, rows: int, cols: int):
    import torch

    g = torch.Generator()
    g.manual_seed(_stream(seed, name))
    return torch.rand(rows, max(1, cols), generator=g)


# ---- advantages as the trainer computes them --------------------------------------------------------

def advantages(cfg: Dict, values, outcome, mask, kl, group_size: int):
    """(advantages the actor uses [B, R], raw advantages before whitening, a one-line definition) for the
    run's algorithm, computed by the trainer's own estimators (dvpo/trainer/advantages.py) and whitened
    over this batch, or None for a critic algorithm given no values."""
    from dvpo.masked import masked_whiten
    from dvpo.trainer import advantages as A

    algo = cfg["algo"]
    gamma, lam, kl_coef = float(cfg.get("gamma", 1.0)), float(cfg.get("lam", 0.95)), float(cfg.get("kl_coef", 0.0))
    m = mask.float()
    if algo == "grpo":
        scale = bool(cfg.get("grpo_scale", True))
        adv = A.grpo_advantages(outcome, group_size, m, scale=scale)
        what = (f"grpo: noisy outcome minus its group's mean{' over the group std' if scale else ''} "
                f"(groups of {group_size}), at every token; not whitened")
        return adv, adv, what
    rewards = A.token_rewards(outcome, m, kl, kl_coef)
    kl_text = f"outcome at the last token - {kl_coef:g} x KL(policy || ref) per token"
    if algo == "reinforce++":
        ret = A.reinforce_pp_advantages(rewards, m, gamma, whiten=False)
        what = f"reinforce++: return-to-go (gamma {gamma:g}) of the rewards ({kl_text}), whitened over this batch"
        return masked_whiten(ret, m) * m, ret, what
    if values is None:
        return None
    if algo == "dvpo":
        spec = str(cfg.get("advantage", "mean") or "mean")
        raw, _ = A.dvpo_advantages(rewards, values.mean(-2), m, gamma=gamma, lam=lam, advantage=spec)
        kind, alpha = A.parse_advantage(spec)
        head = {"mean": "dvpo: mean over quantiles of the per-quantile GAE",
                "cvar": f"dvpo: lower CVaR {alpha:g} over quantiles of the per-quantile GAE",
                "trim": f"dvpo: mean per-quantile GAE floored at the critic's {alpha:g}-quantile"}[kind]
        what = (f"{head} on the mean over heads (gamma {gamma:g}, lambda {lam:g}; rewards: {kl_text}), "
                f"whitened over this batch")
    else:
        v = values[..., 0, 0] if algo == "ppo" else values[..., 0].min(-1).values
        raw, _ = A.gae_advantages(rewards, v, m, gamma=gamma, lam=lam)
        critic = "scalar critic" if algo == "ppo" else "worst of the scalar heads"
        what = (f"{algo}: GAE of the {critic} (gamma {gamma:g}, lambda {lam:g}; rewards: {kl_text}), "
                f"whitened over this batch")
    raw = raw.float()
    return masked_whiten(raw, m) * m, raw, what


# ---- the numbers ----------------------------------------------------------------------------------

def quantile_bands(q, taus, levels=BANDS) -> Dict[str, List[float]]:
    """Per token, the quantile function at `levels`: linear interpolation of the sorted quantiles
    `q` [R, N] at their levels `taus` [N] (clamped to the outermost quantiles beyond them)."""
    import numpy as np

    srt = np.sort(np.asarray(q, dtype=np.float64), axis=-1)
    t = np.asarray(taus, dtype=np.float64)
    return {f"q{round(lv * 100):02d}": [float(np.interp(lv, t, row)) for row in srt] for lv in levels}


def fan_data(view: RunView, problems, seed: int) -> Optional[List[Dict]]:
    import torch

    from dvpo.trainer.rollout import decode

    if view.critic is None:
        return None
    u = _uniforms(seed, "fan", len(problems), view.max_new)
    with torch.no_grad():
        ids, mask, r_ids, r_mask = view.sample([p.prompt for p in problems], u)
        v = view.values(ids, mask, r_ids, r_mask).cpu()             # [B, R, H, N]
    texts = decode(view.tok, r_ids, r_mask)
    true = [float(view.task.reward(p, t)) for p, t in zip(problems, texts)]
    noisy = view.noisy_rewards(problems, texts, true, seed)
    toks = view.tokens(r_ids, r_mask)
    out = []
    for i, p in enumerate(problems):
        n = len(toks[i])
        heads = v[i, :n]                                                # [n, H, N]
        row = {"prompt": p.prompt, "response": texts[i], "tokens": toks[i], "true_reward": true[i],
               "noisy_reward": noisy[i]}
        if v.shape[-1] > 1:                                             # distributional: mean over heads
            q = heads.mean(1)
            row.update({"quantiles": q.tolist(), "mean": q.mean(-1).tolist(), **quantile_bands(q, view.taus)})
        else:                                                           # scalar critic(s)
            s = heads[..., 0]                                           # [n, H]
            row["value"] = (s[:, 0] if view.algo == "ppo" else s.min(1).values).tolist()
            if s.shape[1] > 1:
                row["head_min"], row["head_max"] = s.min(1).values.tolist(), s.max(1).values.tolist()
        out.append(row)
    return out


def heat_data(view: RunView, problems, group_size: int, seed: int) -> Dict:
    """Advantages over a batch: `problems` (each repeated `group_size` times, consecutive rows)."""
    import torch

    from dvpo.trainer.rollout import decode, score

    rep = [p for p in problems for _ in range(group_size)]
    u = _uniforms(seed, "heat", len(rep), view.max_new)
    with torch.no_grad():
        ids, mask, r_ids, r_mask = view.sample([p.prompt for p in rep], u)
        with view.autocast():
            logp, _, _ = score(view.policy, ids, mask, r_ids, r_mask)
            ref_logp, _, _ = score(view.ref, ids, mask, r_ids, r_mask)
        values = view.values(ids, mask, r_ids, r_mask)
    texts = decode(view.tok, r_ids, r_mask)
    true = [float(view.task.reward(p, t)) for p, t in zip(rep, texts)]
    noisy = view.noisy_rewards(rep, texts, true, seed)
    m = r_mask.float().cpu()
    kl = (logp - ref_logp).float().cpu()
    res = advantages(view.cfg, None if values is None else values.cpu(), torch.tensor(noisy), m, kl, group_size)
    toks = view.tokens(r_ids, r_mask)
    out = {"prompts": [p.prompt for p in rep], "responses": texts, "tokens": toks, "true_reward": true,
           "noisy_reward": noisy, "kl": [kl[i, :len(t)].tolist() for i, t in enumerate(toks)]}
    if res is None:
        out["advantages"] = None
        return out
    adv, raw, what = res
    out.update({"definition": what, "advantages": [adv[i, :len(t)].tolist() for i, t in enumerate(toks)],
                "advantages_raw": [raw[i, :len(t)].tolist() for i, t in enumerate(toks)]})
    return out


# ---- figures ---------------------------------------------------------------------------------------

def _short(text: str, width: int = 18) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _reward_text(true: float, noisy: float, clean: bool) -> str:
    return f"r={true:.2g}" if clean else f"r={true:.2g} seen {noisy:.2g}"


def plot_fan(view: RunView, fan: List[Dict], path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(fan)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows + 0.8), squeeze=False, sharey=True,
                             layout="constrained")
    clean = view.noise.is_clean
    for ax, row in zip(axes.flat, fan):
        x = list(range(len(row["tokens"])))
        if "quantiles" in row:
            ax.fill_between(x, row["q10"], row["q90"], color="tab:blue", alpha=0.18, label="10-90%")
            ax.fill_between(x, row["q25"], row["q75"], color="tab:blue", alpha=0.35, label="25-75%")
            ax.plot(x, row["q50"], color="tab:blue", marker="o", ms=3, label="median")
            ax.plot(x, row["mean"], color="tab:orange", ls="--", lw=1.2, label="mean (expected value)")
        else:
            if "head_min" in row:
                ax.fill_between(x, row["head_min"], row["head_max"], color="tab:blue", alpha=0.2,
                                label="range over heads")
            ax.plot(x, row["value"], color="tab:blue", marker="o", ms=3,
                    label="value" if view.algo == "ppo" else "value (worst head)")
        end = len(x)
        ax.axvline(end - 0.5, color="0.7", lw=0.8, ls=":")
        ax.plot([end], [row["true_reward"]], marker="*", ms=13, color="tab:green", ls="none", label="true reward")
        if not clean:
            ax.plot([end], [row["noisy_reward"]], marker="x", ms=9, mew=2, color="tab:red", ls="none",
                    label="noisy reward (seen)")
        every = max(1, math.ceil(len(x) / 30))                        # long responses: every k-th label
        ticks = x[::every] + [end]
        ax.set_xticks(ticks)
        ax.set_xticklabels([SHOWN.get(row["tokens"][i], row["tokens"][i]) for i in x[::every]] + ["end"],
                           fontfamily="monospace", fontsize=9 if len(x) <= 12 else 7)
        ax.set_xlim(-0.5, end + 0.6)
        ax.set_title(f"{row['prompt']} → {_short(row['response'])}   "
                     f"({_reward_text(row['true_reward'], row['noisy_reward'], clean)})", fontsize=10,
                     fontfamily="monospace")
        ax.grid(alpha=0.3)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("value before the token")
    for ax in axes[-1, :]:
        ax.set_xlabel("response token")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=9, frameon=False)
    kind = ("critic's value distribution per token: quantiles of the mean over heads"
            if "quantiles" in fan[0] else "critic's value per token")
    fig.suptitle(f"{view.algo} ({view.name}, step {view.step}, noise {view.noise.spec}): {kind}", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heat(panels: List[Dict], path: str):
    """`panels`: [{"view", "heat"}] with advantages; one shared, symmetric colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    vmax = max(abs(a) for p in panels for row in p["heat"]["advantages"] for a in row) or 1.0
    width = max(len(t) for p in panels for t in p["heat"]["tokens"])
    nrows = len(panels[0]["heat"]["tokens"])
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="0.93")     # padding: light grey
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * (3.6 + 0.45 * width) + 1.2, 1.2 + 0.42 * nrows),
                             squeeze=False, layout="constrained")
    im = None
    for ax, p in zip(axes[0], panels):
        view, heat = p["view"], p["heat"]
        clean = view.noise.is_clean
        grid = np.full((nrows, width), np.nan)
        for i, row in enumerate(heat["advantages"]):
            grid[i, :len(row)] = row
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto")
        if width <= 40 and nrows <= 40:                                # characters readable in the cells
            for i, toks in enumerate(heat["tokens"]):
                for j, t in enumerate(toks):
                    dark = abs(grid[i, j]) > 0.6 * vmax
                    ax.text(j, i, SHOWN.get(t, t), ha="center", va="center", fontsize=9 if len(t) == 1 else 7,
                            fontfamily="monospace", color="white" if dark else "black")
        ax.set_yticks(range(nrows))
        ax.set_yticklabels([f"{q}  {_reward_text(t, s, clean)}" for q, t, s in
                            zip(heat["prompts"], heat["true_reward"], heat["noisy_reward"])],
                           fontfamily="monospace", fontsize=9)
        for i, (t, s) in enumerate(zip(heat["true_reward"], heat["noisy_reward"])):
            if abs(t - s) > 1e-9:                                     # the noise changed this reward
                ax.get_yticklabels()[i].set_color("tab:red")
        ax.set_xticks(range(width))
        ax.set_xlabel("response token")
        ax.set_title(f"{view.algo} ({view.name}, step {view.step})", fontsize=10)
    cbar = fig.colorbar(im, ax=list(axes[0]), fraction=0.04 if len(panels) > 1 else 0.06, pad=0.02)
    cbar.set_label("advantage (as the actor uses it)")
    noise = panels[0]["view"].noise
    note = "" if noise.is_clean else f"; red labels: the noise ({noise.spec}) changed the reward"
    sep = "\n" if len(panels) == 1 else ""
    fig.suptitle(f"advantage per response token{sep} (rows: prompt, true reward r, reward seen{note})", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the command -------------------------------------------------------------------------------------

def _file_label(names: List[str]) -> List[str]:
    labels = [re.sub(r"[^A-Za-z0-9_.+-]+", "_", n) or "run" for n in names]
    if len(set(labels)) < len(labels):
        labels = [f"{i + 1}_{lab}" for i, lab in enumerate(labels)]
    return labels


def inspect_runs(paths: List[str], out: str, *, n_prompts: int = 6, n_responses: int = 8, group_size: int = 2,
                 seed: int = 0, device: str = "auto", log=print) -> Dict:
    """Write the figures and summary.json for one or two run dirs into `out`; returns the summary."""
    from tqdm.auto import tqdm

    from dvpo.trainer.models import pick_device

    dev = pick_device(device)
    bar = tqdm(total=3 * len(paths), desc="dvpo inspect", leave=False, disable=None)
    views = []
    for p in paths:
        views.append(RunView(p, dev))
        bar.update(1)
    task = views[0].task
    fan_problems = task.heldout_set(n_prompts)
    heat_problems = task.heldout_set(max(n_prompts, n_responses // group_size))[:n_responses // group_size]
    os.makedirs(out, exist_ok=True)
    labels = _file_label([v.name for v in views])
    summary = {"seed": seed, "task": views[0].cfg["task"], "bands": [f"q{round(b * 100):02d}" for b in BANDS],
               "fan_pooling": "per quantile level, the mean over the critic's H heads (the ensemble the trainer "
                              "uses); bands interpolate the sorted quantiles at the levels in `bands`",
               "runs": [], "figures": []}         # figures: file names in `out`
    panels = []
    for view, label in zip(views, labels):
        fan = fan_data(view, fan_problems, seed)
        bar.update(1)
        heat = heat_data(view, heat_problems, group_size, seed)
        bar.update(1)
        rec = {"path": view.path, "name": view.name, "algo": view.algo, "step": view.step,
               "noise": view.noise.spec, "config": {k: view.cfg.get(k) for k in
                                                    ("gamma", "lam", "kl_coef", "advantage", "group_size",
                                                     "grpo_scale", "seed")},
               "critic": None if view.critic is None else {
                   "heads": view.critic.n_heads, "outputs": view.critic.n_out, "shared": view.critic.backbone is None,
                   "taus": view.taus.tolist()},
               "fan": fan, "heat": heat}
        summary["runs"].append(rec)
        if fan is None:
            log(f"dvpo inspect: {view.name} ({view.algo}) has no critic: no value fan chart")
        else:
            fpath = os.path.join(out, f"fan_{label}.png")
            plot_fan(view, fan, fpath)
            summary["figures"].append(os.path.basename(fpath))
        if heat["advantages"] is None:
            log(f"dvpo inspect: {view.name} ({view.algo}): advantages not reproduced; left out of the heat map")
        else:
            panels.append({"view": view, "heat": heat})
    bar.close()
    if panels:
        hpath = os.path.join(out, "advantages.png")
        plot_heat(panels, hpath)
        summary["figures"].append(os.path.basename(hpath))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def run(args) -> int:
    from dvpo.cli import usage_error

    paths = args.ckpt
    if len(paths) > 2:
        usage_error(args, f"argument --ckpt: given {len(paths)} times: at most two runs can be compared")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        usage_error(args, f"argument --out: invalid value {args.out!r}: the path is a file, not a directory")
    if args.n_responses % args.group_size:
        usage_error(args, f"argument --n-responses: invalid value {str(args.n_responses)!r}: expected a multiple "
                          f"of --group-size ({args.group_size})")
    from dvpo.trainer.evaluate import CheckpointError, describe_checkpoint

    tasks = []
    for p in paths:
        try:
            info = describe_checkpoint(p)
        except CheckpointError as exc:
            usage_error(args, f"argument --ckpt: invalid value {p!r}: {exc.reason}")
        if info["run"] is None:
            usage_error(args, f"argument --ckpt: invalid value {p!r}: not a run dir (dvpo train --out): "
                              f"no run config.json there")
        tasks.append(info["run"]["task"])
    if len(set(tasks)) > 1:
        usage_error(args, f"argument --ckpt: the runs are on different tasks ({' vs '.join(tasks)}): "
                          f"the figures compare the same prompts")
    try:
        summary = inspect_runs(paths, args.out, n_prompts=args.n_prompts, n_responses=args.n_responses,
                               group_size=args.group_size, seed=args.seed, device=args.device)
    except RunError as exc:
        usage_error(args, f"argument --ckpt: {exc}")
    for name in summary["figures"] + ["summary.json"]:
        print(os.path.join(args.out, name))
    return 0

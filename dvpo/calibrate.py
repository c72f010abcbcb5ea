"""`dvpo calibrate`: does the critic loss learn the right distribution? A known-answer suite.

One state, a return distribution whose quantile function is known (from 2 million draws), and a
critic that is nothing but its parameters (`[H, N]` quantile heads) trained by the fused op on
per-sample targets, as a PPO critic is:
- `point`: each sample's target is the sampled return alone (M = 1), the terminal-token case;
- `mixture`: a lambda-mixture with bootstrapped atoms, M = N atoms per sample: round(lam M) copies of
  the sampled return and the rest drawn from the critic's own current atoms (detached), as a
  bootstrapped next state with the same return distribution would give.
Per distribution x target kind x N x loss configuration it reports the W1 distance between the
learned and the true quantile functions, the mean error, lower/upper CVaR errors, the tail widths
(VaR - CVaR below, CVaR+ - VaR+ above) and the fraction of crossing neighbour quantiles, all
distances as fractions of the return range (the true 0.1%-99.9% quantile span), and plots the
learned vs the true quantile functions. Writes results.csv, results.md and one PNG per distribution.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import time
from typing import Callable, Dict, List

import torch

from .config import CriticLossConfig

LAM = 0.5  # the mixture's weight on the sampled return
H = 3


# ---------------------------------------------------------------------------------------------
# Return distributions (samplers; the truth comes from many draws)
# ---------------------------------------------------------------------------------------------

def _binary(g, n):  # a noisy pass/fail outcome
    return (torch.rand(n, generator=g, dtype=torch.float64) < 0.62).double() + 0.05 * torch.randn(
        n, generator=g, dtype=torch.float64)


def _multilevel(g, n):  # graded outcome: 0, 1/3, 2/3, 1 with a little jitter
    levels = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0], dtype=torch.float64)
    idx = torch.multinomial(torch.tensor([0.2, 0.3, 0.3, 0.2]), n, replacement=True, generator=g)
    return levels[idx] + 0.03 * torch.randn(n, generator=g, dtype=torch.float64)


def _gaussian(g, n):
    return 0.5 + 0.2 * torch.randn(n, generator=g, dtype=torch.float64)


def _bimodal(g, n):
    hi = torch.rand(n, generator=g, dtype=torch.float64) < 0.6
    return torch.where(hi, 0.8, 0.2) + 0.06 * torch.randn(n, generator=g, dtype=torch.float64)


def _skewed(g, n):  # log-normal: a long right tail
    return 0.1 + torch.exp(-1.5 + 0.7 * torch.randn(n, generator=g, dtype=torch.float64))


DISTRIBUTIONS: Dict[str, Callable] = {
    "binary": _binary, "multilevel": _multilevel, "gaussian": _gaussian, "bimodal": _bimodal,
    "skewed": _skewed,
}
DESCRIPTIONS = {
    "binary": "noisy binary outcome: 1{U < 0.62} + N(0, 0.05)",
    "multilevel": "multi-level outcome: {0, 1/3, 2/3, 1} w.p. (.2, .3, .3, .2) + N(0, 0.03)",
    "gaussian": "Gaussian N(0.5, 0.2^2)",
    "bimodal": "bimodal: 0.6 N(0.8, 0.06^2) + 0.4 N(0.2, 0.06^2)",
    "skewed": "skewed, heavy right tail: 0.1 + exp(N(-1.5, 0.7^2))",
}


def configs(alpha: float = 0.1, beta: float = 0.1) -> Dict[str, CriticLossConfig]:
    """The loss configurations the suite compares."""
    base = CriticLossConfig(alpha=alpha, beta=beta)
    off = {k: 0.0 for k in ("risk", "cvar", "gain", "shift", "shape", "curv", "consist")}
    return {
        "default": base,
        "symmetric": CriticLossConfig.symmetric(alpha=alpha, beta=beta),
        "qh-only": dataclasses.replace(base, **off),
        "recipe": CriticLossConfig.recipe(alpha=alpha, beta=beta),
    }


@dataclasses.dataclass
class Truth:
    grid: torch.Tensor       # quantile levels u_k
    quantiles: torch.Tensor  # true Q(u_k)
    mean: float
    cvar_lo: float
    cvar_hi: float
    var_lo: float
    var_hi: float
    span: float              # Q(0.999) - Q(0.001): the scale every distance is divided by


def truth(name: str, alpha: float, beta: float, draws: int = 2_000_000, grid: int = 4000) -> Truth:
    g = torch.Generator().manual_seed(12345)
    x = DISTRIBUTIONS[name](g, draws).sort().values
    u = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    q = x[(u * draws).long()]
    n_lo, n_hi = int(alpha * draws), int(beta * draws)
    return Truth(grid=u, quantiles=q, mean=x.mean().item(), cvar_lo=x[:n_lo].mean().item(),
                 cvar_hi=x[-n_hi:].mean().item(), var_lo=x[n_lo - 1].item(), var_hi=x[-n_hi].item(),
                 span=(x[int(0.999 * draws)] - x[int(0.001 * draws)]).item())


def _step_quantiles(atoms: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The quantile function of N equally weighted atoms at levels u."""
    s = atoms.sort().values
    return s[(u * s.numel()).long().clamp(max=s.numel() - 1)]


def metrics(theta: torch.Tensor, t: Truth, alpha: float, beta: float) -> Dict[str, float]:
    from . import reference as ref

    theta = theta.double()
    n = theta.numel()
    w1 = (_step_quantiles(theta, t.grid) - t.quantiles).abs().mean().item()
    c_lo, c_hi = ref.cvar(theta, alpha).item(), ref.cvar(theta, beta, upper=True).item()
    v_lo, v_hi = ref.var_atom(theta, alpha).item(), ref.var_atom(theta, beta, upper=True).item()
    crossing = (theta[1:] < theta[:-1]).double().mean().item() if n > 1 else 0.0
    return {
        "crossing": crossing,
        "w1": w1 / t.span,
        "mean_err": (theta.mean().item() - t.mean) / t.span,
        "cvar_lo_err": (c_lo - t.cvar_lo) / t.span,
        "cvar_hi_err": (c_hi - t.cvar_hi) / t.span,
        "width_lo": (v_lo - c_lo) / t.span,
        "width_hi": (c_hi - v_hi) / t.span,
        "true_width_lo": (t.var_lo - t.cvar_lo) / t.span,
        "true_width_hi": (t.cvar_hi - t.var_hi) / t.span,
    }


def train(name: str, kind: str, n: int, config: CriticLossConfig, *, steps: int, batch: int,
          seed: int = 0, lr: float = 0.02, average: float = 0.3) -> torch.Tensor:
    """Train direct quantile parameters [H, N] on per-sample targets; returns the ensemble [N],
    averaged over the last `average` fraction of the steps (Polyak averaging: the converged value
    without the last steps' sampling noise)."""
    from . import ops

    g = torch.Generator().manual_seed(seed)
    sampler = DISTRIBUTIONS[name]
    start = sampler(g, 4096)
    # start crossed (random order) around the mean: the loss must sort the atoms itself
    heads = (start.mean() + 0.1 * start.std() * torch.randn(H, n, generator=g, dtype=torch.float64)).float()
    heads.requires_grad_()
    opt = torch.optim.Adam([heads], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    m_mc = max(1, round(LAM * n)) if kind == "mixture" else 1
    first_avg = steps - max(1, int(average * steps))
    acc, count = torch.zeros(n, dtype=torch.float64), 0
    for step in range(steps):
        g_ret = sampler(g, batch).float()
        if kind == "point":
            target = g_ret.unsqueeze(-1)
        else:
            own = heads.detach().mean(0)
            pick = torch.rand(batch, n, generator=g).argsort(-1)[:, : n - m_mc]
            target = torch.cat([g_ret.unsqueeze(-1).expand(batch, m_mc), own[pick]], -1)
        out = ops.critic_loss(heads.unsqueeze(0).expand(batch, H, n), target, config=config)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        if step >= first_avg:
            acc += heads.detach().mean(0).double()
            count += 1
    return (acc / count).float()


def predicted_lower_width(t: Truth, config: CriticLossConfig) -> float:
    """What the tail terms aim for: the true lower width scaled by 1 - lower_contraction (the quantile
    loss pulls back toward the true width; docs/math.md gives the balance)."""
    return (1.0 - config.lower_contraction) * (t.var_lo - t.cvar_lo) / t.span


def run_suite(out: str, *, ns=(32, 200), kinds=("point", "mixture"), dists=None, names=None,
              steps: int = 1500, batch: int = 128, seed: int = 0, progress: bool = True) -> List[Dict]:
    from tqdm import tqdm

    os.makedirs(out, exist_ok=True)
    dists = list(dists or DISTRIBUTIONS)
    cfgs = configs()
    names = list(names or cfgs)
    jobs = [(d, k, n, c) for d in dists for k in kinds for n in ns for c in names]
    rows, learned = [], {}
    truths = {d: truth(d, 0.1, 0.1) for d in dists}
    bar = tqdm(jobs, desc="dvpo calibrate", disable=not progress, unit="run")
    for d, k, n, c in bar:
        bar.set_postfix_str(f"{d} {k} N={n} {c}")
        start = time.perf_counter()
        theta = train(d, k, n, cfgs[c], steps=steps, batch=batch, seed=seed)
        row = {"distribution": d, "targets": k, "N": n, "config": c,
               **metrics(theta, truths[d], 0.1, 0.1), "seconds": time.perf_counter() - start}
        if c == "default":
            row["predicted_width_lo"] = predicted_lower_width(truths[d], cfgs[c])
        rows.append(row)
        learned[(d, k, n, c)] = theta
    write_results(out, rows)
    plot(out, truths, learned, names)
    return rows


# Pass/fail bars (fractions of the return range) for the default configuration.
BARS = {"crossing": 0.02, "mean_err": 0.02, "w1": 0.03}
SYMMETRIC_CVAR_BAR = 0.03


def verdicts(rows: List[Dict]) -> List[str]:
    """Every way the suite's rows miss the bars: [] when the default config passes."""
    bad = []
    for r in rows:
        tag = f"{r['distribution']}/{r['targets']}/N={r['N']}/{r['config']}"
        if r["config"] == "default":
            for key, bar in BARS.items():
                if abs(r[key]) > bar:
                    bad.append(f"{tag}: |{key}| = {abs(r[key]):.4f} > {bar}")
        if r["config"] == "symmetric":
            for key in ("cvar_lo_err", "cvar_hi_err"):
                if abs(r[key]) > SYMMETRIC_CVAR_BAR:
                    bad.append(f"{tag}: |{key}| = {abs(r[key]):.4f} > {SYMMETRIC_CVAR_BAR}")
    return bad


COLUMNS = ("distribution", "targets", "N", "config", "crossing", "w1", "mean_err", "cvar_lo_err",
           "cvar_hi_err", "width_lo", "true_width_lo", "predicted_width_lo", "width_hi", "true_width_hi",
           "seconds")


def write_results(out: str, rows: List[Dict]) -> None:
    with open(os.path.join(out, "results.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.5f}" if isinstance(v, float) else v) for k, v in r.items()})
    lines = ["# dvpo calibrate: learned vs true return distributions", "",
             "Distances are fractions of the return range (true 0.1%-99.9% span); widths: lower = VaR - CVaR "
             "of the lowest 10%, upper = CVaR - VaR of the highest 10%. Bars for `default`: crossing <= 2%, "
             f"|mean error| <= {BARS['mean_err']}, W1 <= {BARS['w1']}; for `symmetric`: |CVaR errors| <= "
             f"{SYMMETRIC_CVAR_BAR}.", ""]
    for d in dict.fromkeys(r["distribution"] for r in rows):
        lines += [f"## {d}: {DESCRIPTIONS[d]}", "",
                  "| targets | N | config | crossing | W1 | mean err | lower CVaR err | upper CVaR err | "
                  "lower width (true, predicted) | upper width (true) |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---|---|"]
        for r in rows:
            if r["distribution"] != d:
                continue
            pred = f", {r['predicted_width_lo']:.4f}" if "predicted_width_lo" in r else ""
            lines.append(f"| {r['targets']} | {r['N']} | {r['config']} | {r['crossing']:.3f} | {r['w1']:.4f} | "
                         f"{r['mean_err']:+.4f} | {r['cvar_lo_err']:+.4f} | {r['cvar_hi_err']:+.4f} | "
                         f"{r['width_lo']:.4f} ({r['true_width_lo']:.4f}{pred}) | "
                         f"{r['width_hi']:.4f} ({r['true_width_hi']:.4f}) |")
        lines.append("")
    bad = verdicts(rows)
    lines += ["## Verdict", "", "PASS: the default configuration meets every bar." if not bad else
              "FAIL:\n\n" + "\n".join(f"- {b}" for b in bad), ""]
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write("\n".join(lines))


def plot(out: str, truths: Dict[str, Truth], learned: Dict, names: List[str]) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for d, t in truths.items():
        keys = [k for k in learned if k[0] == d]
        kinds = list(dict.fromkeys(k[1] for k in keys))
        n_max = max(k[2] for k in keys)
        fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.2), squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            ax.plot(t.grid.numpy(), t.quantiles.numpy(), color="black", lw=2.5, label="truth")
            for c in names:
                theta = learned.get((d, kind, n_max, c))
                if theta is None:
                    continue
                taus = (torch.arange(theta.numel(), dtype=torch.float64) + 0.5) / theta.numel()
                ax.plot(taus.numpy(), theta.double().numpy(), lw=1.3, label=c)  # in index order: crossings show
            # a collapsed fit can spike far outside the truth: keep the truth's range readable
            q_lo, q_hi = t.quantiles[0].item(), t.quantiles[-1].item()
            pad = 0.25 * (q_hi - q_lo)
            ax.set_ylim(q_lo - pad, q_hi + pad)
            ax.set_title(f"{d}, {kind} targets, N={n_max} (y clipped to the truth's range)")
            ax.set_xlabel("quantile level tau")
            ax.set_ylabel("return")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(DESCRIPTIONS[d], fontsize=10)
        fig.tight_layout()
        path = os.path.join(out, f"quantiles_{d}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _positive_int(text):
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_arguments(parser):
    parser.add_argument("--out", default="calibration", help="output folder (results.md/.csv, PNGs)")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--dist", action="append", choices=list(DISTRIBUTIONS),
                        help="a distribution (repeatable; default: all)")
    parser.add_argument("--config", action="append", choices=list(configs()),
                        help="a loss configuration (repeatable; default: all)")
    parser.add_argument("--n", action="append", type=_positive_int, help="quantiles N (repeatable; default 32 and 200)")
    parser.add_argument("--steps", type=_positive_int, default=1500, help="Adam steps per run")
    parser.add_argument("--batch", type=_positive_int, default=128, help="sampled returns per step")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: binary and bimodal, N=32, 400 steps (under a minute)")


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    dists, ns, steps = args.dist, tuple(args.n or (32, 200)), args.steps
    if args.quick:
        dists, ns, steps = dists or ["binary", "bimodal"], tuple(args.n or (32,)), min(steps, 400)
    rows = run_suite(args.out, ns=ns, dists=dists, names=args.config, steps=steps, batch=args.batch,
                     seed=args.seed)
    print(open(os.path.join(args.out, "results.md")).read())
    print(f"dvpo calibrate: wrote {os.path.join(args.out, 'results.md')}, results.csv and the PNGs")
    return 1 if verdicts(rows) else 0

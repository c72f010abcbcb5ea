"""The grid's results: `results.csv` (one row per run), `results.md` (mean ± std over seeds per
algorithm x noise model) and PNG plots (final accuracy vs noise model, learning curves)."""

from __future__ import annotations

import csv
import math
import os
import statistics
from typing import Dict, List, Optional, Sequence

from ..trainer.plots import tight_layout
from . import full_eval
from .grid import Grid, RunSpec, sanitize
from .runner import FINISHED, read_summary

COLUMNS = [
    "block", "task", "algo", "variant", "noise", "seed", "steps", "status",
    "heldout_acc_final", "heldout_acc_sampled_final", "heldout_reward_final",
    "reward_true_last10pct", "reward_noisy_last10pct", "sec_per_step_median", "wall_s", "run_dir",
    # extras
    "heldout_acc_initial", "heldout_acc_sampled_initial", "heldout_reward_initial",
    "heldout_reward_sampled_final", "score_initial", "score_final", "score_sampled_final",
    "score_sampled_initial", "cpu_sec_per_step_median", "error",
    # the distributional critic at the end of training (mean over the last 10% of steps)
    "value_spread_last10pct", "value_crossing_last10pct", "value_crossing_deep_last10pct",
    # the final policy on the task's whole held-out split (dvpo experiment --full-eval)
    "score_full", "score_sampled_full", "n_full", "score_initial_full",
]
CRITIC_METRICS = ("value_spread", "value_crossing", "value_crossing_deep")


def score_key(task: str) -> str:
    """The tables' metric: exact-match accuracy, or for dialogue its 0..1 constraint score."""
    return "heldout_reward" if task.partition(":")[0] == "dialogue" else "heldout_acc"


def metric_name(task: str, sampled: bool = False) -> str:
    what = "score" if score_key(task) == "heldout_reward" else "accuracy"
    return f"held-out {'sampled' if sampled else 'greedy'} {what} (true reward)"


def _read_metrics(run_dir: str) -> List[Dict]:
    from dvpo.trainer.loop import read_metrics

    try:
        return read_metrics(run_dir)
    except (OSError, ValueError):
        return []


def _num(x) -> Optional[float]:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def collect(specs: Sequence[RunSpec], out: str) -> List[Dict]:
    """One row per run (pending runs included, their numbers empty), plus its eval curve under '_curve'."""
    rows = []
    for s in specs:
        run_dir = os.path.join(out, s.rel_dir)
        summ = read_summary(run_dir) or {}
        status = summ.get("status") or ("partial" if os.path.exists(os.path.join(run_dir, "metrics.jsonl"))
                                        else "pending")
        row = {"block": s.block, "task": s.task, "algo": s.algo, "variant": s.variant, "noise": s.noise,
               "seed": s.seed, "steps": summ.get("steps"), "status": status, "run_dir": s.rel_dir,
               "error": summ.get("error", "")}
        curve = []
        if status in FINISHED:
            metrics = _read_metrics(run_dir)
            evals = [r for r in metrics if "heldout_acc" in r]
            first, last = (evals[0], evals[-1]) if evals else ({}, {})
            key = score_key(s.task)
            row.update({
                "heldout_acc_final": summ.get("heldout_acc_final", last.get("heldout_acc")),
                "heldout_acc_sampled_final": summ.get("heldout_acc_sampled_final", last.get("heldout_acc_sampled")),
                "heldout_reward_final": summ.get("heldout_reward_final", last.get("heldout_reward")),
                "reward_true_last10pct": summ.get("reward_true_last10pct"),
                "reward_noisy_last10pct": summ.get("reward_noisy_last10pct"),
                "sec_per_step_median": summ.get("sec_per_step_median"),
                "cpu_sec_per_step_median": summ.get("cpu_sec_per_step_median"),
                "wall_s": summ.get("wall_seconds"),
                "heldout_acc_initial": first.get("heldout_acc"),
                "heldout_acc_sampled_initial": first.get("heldout_acc_sampled"),
                "heldout_reward_initial": first.get("heldout_reward"),
                "heldout_reward_sampled_final": last.get("heldout_reward_sampled"),
                "score_initial": first.get(key),
                "score_final": last.get(key),
                "score_sampled_final": last.get(key + "_sampled"),
                "score_sampled_initial": first.get(key + "_sampled"),
            })
            curve = [(r["step"], _num(r.get(key))) for r in evals if _num(r.get(key)) is not None]
            full = full_eval.read(run_dir)
            if full is not None and full.get("step") == summ.get("steps"):
                start = full_eval.read(summ["sft_dir"]) if summ.get("sft_dir") else None
                row.update({"score_full": full.get(key), "score_sampled_full": full.get(key + "_sampled"),
                            "n_full": full.get("n_eval"),
                            "score_initial_full": None if start is None else start.get(key)})
            steps = [r for r in metrics if "value_spread" in r]
            tail = steps[len(steps) - max(1, len(steps) // 10):] if steps else []
            for name in CRITIC_METRICS:
                vals = [_num(r.get(name)) for r in tail]
                vals = [v for v in vals if v is not None]
                row[name + "_last10pct"] = statistics.fmean(vals) if vals else None
        row["_curve"] = curve
        rows.append(row)
    return rows


def write_csv(rows: List[Dict], path: str) -> str:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    return path


def _stats(values) -> Optional[tuple]:
    v = [x for x in (_num(y) for y in values) if x is not None]
    if not v:
        return None
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0), len(v)


def _cell(st, bold=False) -> str:
    if st is None:
        return "–"
    text = f"{st[0]:.3f} ± {st[1]:.3f} ({st[2]})"
    return f"**{text}**" if bold else text


def _groups(grid: Grid, rows: List[Dict]):
    """(name, task, labels in grid order, noises in grid order, rows of that task) per task. Blocks
    that share a task form one group (their rows pair by seed: a seed's runs share its SFT start); the
    name is the block's when one block covers the task, else "all"."""
    tasks = []
    for b in grid.blocks:
        tasks += [t for t in b["tasks"] if t not in tasks]
    for task in tasks:
        blocks = [b for b in grid.blocks if task in b["tasks"]]
        labels, noises = [], []
        for b in blocks:
            labels += [lab for lab in (f"{a}-{v}" if v else a for a in b["algos"] for v in b["variants"])
                       if lab not in labels]
            noises += [n for n in b["noises"] if n not in noises]
        names = {b["name"] for b in blocks}
        sub = [r for r in rows if r["block"] in names and r["task"] == task]
        if any(r["status"] in FINISHED for r in sub):      # a task not run yet gets no empty tables
            yield (blocks[0]["name"] if len(blocks) == 1 else "all"), task, labels, noises, sub


# two-sided 95% Student t quantiles by degrees of freedom (1..30); beyond 30 the normal's 1.96
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def paired_interval(diffs: Sequence[float]) -> Optional[tuple]:
    """(mean, lower, upper, n): the 95% t interval of the mean of per-seed differences; None under 2."""
    d = [float(x) for x in diffs]
    if len(d) < 2:
        return None
    m, sd = statistics.fmean(d), statistics.stdev(d)
    half = (_T975[len(d) - 2] if len(d) - 1 <= len(_T975) else 1.96) * sd / math.sqrt(len(d))
    return m, m - half, m + half, len(d)


MIN_PAIRED_SEEDS = 3  # fewer paired seeds make no claim (two equal differences give a zero-width interval)


def excludes_zero(ci: Optional[tuple]) -> bool:
    return ci is not None and ci[3] >= MIN_PAIRED_SEEDS and (ci[1] > 0 or ci[2] < 0)


def _paired(done: List[Dict], a: str, b: str, noise: str, key: str = "score_final") -> Optional[tuple]:
    """The paired interval of label a minus label b in one noise cell, over the seeds both finished."""
    va = {r["seed"]: _num(r.get(key)) for r in done if _label(r) == a and r["noise"] == noise}
    vb = {r["seed"]: _num(r.get(key)) for r in done if _label(r) == b and r["noise"] == noise}
    seeds = sorted(s for s in va if s in vb and va[s] is not None and vb[s] is not None)
    return paired_interval([va[s] - vb[s] for s in seeds])


def _label(r: Dict) -> str:
    return f"{r['algo']}-{r['variant']}" if r["variant"] else r["algo"]


def _table(labels, noises, sub, final_key, initial_key) -> List[str]:
    done = [r for r in sub if r["status"] in FINISHED]
    lines = ["| algorithm | " + " | ".join(noises) + " |", "|---|" + "---|" * len(noises)]
    init = []
    for n in noises:
        per_seed = {}
        for r in done:
            if r["noise"] == n and _num(r.get(initial_key)) is not None:
                per_seed.setdefault(r["seed"], r[initial_key])
        init.append(_stats(per_seed.values()))
    lines.append("| SFT start (initial) | " + " | ".join(_cell(s) for s in init) + " |")
    cells = {(lab, n): _stats(r.get(final_key) for r in done if _label(r) == lab and r["noise"] == n)
             for lab in labels for n in noises}
    # bold: the best mean of a column, only where its paired 95% interval against every other row
    # excludes 0
    best = {}
    for n in noises:
        have = [lab for lab in labels if cells[(lab, n)] is not None]
        if len(have) < 2:
            best[n] = None
            continue
        top = max(have, key=lambda lab: cells[(lab, n)][0])
        clear = all(excludes_zero(_paired(done, top, lab, n, final_key)) for lab in have if lab != top)
        best[n] = cells[(top, n)][0] if clear else None
    for lab in labels:
        lines.append(f"| {lab} | " + " | ".join(
            _cell(cells[(lab, n)], bold=best[n] is not None and cells[(lab, n)] is not None
                  and cells[(lab, n)][0] == best[n]) for n in noises) + " |")
    return lines


BASELINES = ("ppo", "grpo", "robust-ppo")


def _score_key(finished: List[Dict]) -> str:
    """The score the comparison uses: the whole held-out split when every finished run has it."""
    whole = bool(finished) and all(_num(r.get("score_full")) is not None for r in finished)
    return "score_full" if whole else "score_final"


def _start_key(finished: List[Dict], key: str) -> str:
    """The SFT start's score to show beside `key`: on the whole split too when every start has one."""
    whole = key == "score_full" and all(_num(r.get("score_initial_full")) is not None for r in finished)
    return "score_initial_full" if whole else "score_initial"


def _paired_table(labels, noises, sub, key: str = "score_final") -> List[str]:
    """Each dvpo row minus each baseline, paired by seed: mean [95% interval] (n seeds), bold where the
    interval excludes 0; and, per dvpo row, the noisy cells where it is above every baseline so."""
    done = [r for r in sub if r["status"] in FINISHED]
    cands = [lab for lab in labels if lab.split("-")[0] == "dvpo"]
    refs = [lab for lab in BASELINES if lab in labels]
    if not cands or not refs:
        return []
    what = "on the whole held-out split" if key == "score_full" else "the runs' own evaluation"
    lines = [f"Paired by seed (the same SFT start), final score difference ({what}): mean [95% interval] "
             "(seeds):", "",
             "| difference | " + " | ".join(noises) + " |", "|---|" + "---|" * len(noises)]
    for c in cands:
        for ref in refs:
            cells = []
            for n in noises:
                ci = _paired(done, c, ref, n, key)
                text = "–" if ci is None else f"{ci[0]:+.3f} [{ci[1]:+.3f}, {ci[2]:+.3f}] ({ci[3]})"
                cells.append(f"**{text}**" if excludes_zero(ci) else text)
            lines.append(f"| {c} − {ref} | " + " | ".join(cells) + " |")
    lines.append("")
    noisy = [n for n in noises if n != "none"]
    for c in cands:
        above = {n: [_paired(done, c, ref, n, key) for ref in refs] for n in noisy}
        wins = [n for n in noisy if all(excludes_zero(ci) and ci[1] > 0 for ci in above[n])]
        lines.append(f"- {c} above {', '.join(refs)} by more than the paired 95% interval in "
                     f"{len(wins)} of {len(noisy)} noisy cells" + (f" ({', '.join(wins)})" if wins else ""))
    lines.append("")
    return lines


def _critic_table(labels, noises, sub) -> List[str]:
    """The distributional critic's fan at the end of training, per row that has one: the spread between
    its 10% and 90% quantiles and the share of adjacent quantiles out of order by more than 1% of the
    fan (mean over the last 10% of steps, then over seeds)."""
    done = [r for r in sub if r["status"] in FINISHED]
    have = [lab for lab in labels
            if any(_label(r) == lab and _num(r.get("value_spread_last10pct")) is not None for r in done)]
    if not have:
        return []
    lines = ["The critic at the end of training: 10%-90% fan spread / deep crossing share (mean over seeds):",
             "", "| critic | " + " | ".join(noises) + " |", "|---|" + "---|" * len(noises)]
    for lab in have:
        cells = []
        for n in noises:
            rs = [r for r in done if _label(r) == lab and r["noise"] == n]
            sp = _stats(r.get("value_spread_last10pct") for r in rs)
            cr = _stats(r.get("value_crossing_deep_last10pct") for r in rs)
            cells.append("–" if sp is None or cr is None else f"{sp[0]:.2f} / {100 * cr[0]:.0f}%")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _shown_path(path: str) -> str:
    """A built-in grid as its path in the repository (e.g. dvpo/experiments/grids/main.toml), not this
    machine's."""
    pkg = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
    full = os.path.abspath(path)
    return os.path.relpath(full, pkg) if full.startswith(os.path.join(pkg, "dvpo") + os.sep) else path


def write_markdown(grid: Grid, rows: List[Dict], path: str, csv_rows: int) -> str:
    done = [r for r in rows if r["status"] in FINISHED]
    failed = [r for r in rows if r["status"] == "failed"]
    seeds = sorted({r["seed"] for r in rows})
    steps = sorted({int(r["steps"]) for r in done if r.get("steps") is not None})
    lines = [f"# Experiment grid `{grid.name}`", ""]
    if grid.description:
        lines += [grid.description, ""]
    lines += [
        f"- grid file: `{_shown_path(grid.path)}`",
        f"- seeds: {len(seeds)} ({', '.join(map(str, seeds))}); each seed's runs start from the same SFT warm start",
        f"- RL steps per run: {', '.join(map(str, steps)) if steps else '–'}",
        f"- runs: {len(done)} finished of {len(rows)}" + (f", {len(failed)} failed" if failed else ""),
        f"- results.csv: {csv_rows} rows (one per run)",
        "- cells: mean ± std over seeds (n seeds) of the final held-out evaluation under the true reward; "
        "a column's best mean is bold only where its paired 95% interval against every other row excludes 0 "
        f"(with at least {MIN_PAIRED_SEEDS} paired seeds)",
        "",
    ]
    for block, task, labels, noises, sub in _groups(grid, rows):
        fin = [r for r in sub if r["status"] in FINISHED]
        key = _score_key(fin)
        whole = key == "score_full"
        lines += [f"## {block} — {task}", ""]
        if whole:
            sizes = sorted({int(r["n_full"]) for r in fin})
            lines += [f"Final {metric_name(task)} on the whole held-out split ({', '.join(map(str, sizes))} "
                      "problems; `--full-eval`):", ""]
            start = _start_key(fin, key)
            lines += _table(labels, noises, sub, "score_full", start)
            if start != "score_initial_full":
                lines += ["", "(SFT start: the runs' own first evaluation, on their n_eval problems.)"]
            lines.append("")
        lines += [f"Final {metric_name(task)}, the runs' own evaluation:", ""]
        lines += _table(labels, noises, sub, "score_final", "score_initial")
        lines += ["", f"Final {metric_name(task, sampled=True)}:", ""]
        lines += _table(labels, noises, sub, "score_sampled_final", "score_sampled_initial")
        lines.append("")
        lines += _paired_table(labels, noises, sub, key)
        lines += _critic_table(labels, noises, sub)
    if done:
        lines += ["## Time", "", "| algorithm | median s/step (median over runs) | runs |", "|---|---|---|"]
        by = {}
        for r in done:
            if _num(r.get("sec_per_step_median")) is not None:
                by.setdefault(_label(r), []).append(float(r["sec_per_step_median"]))
        for lab, v in by.items():
            lines.append(f"| {lab} | {statistics.median(v):.2f} | {len(v)} |")
        lines.append("")
    if failed:
        lines += ["## Failed runs", ""]
        lines += [f"- `{r['run_dir']}`: {r.get('error', '')}" for r in failed]
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def write_plots(grid: Grid, rows: List[Dict], out: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for block, task, labels, noises, sub in _groups(grid, rows):
        done = [r for r in sub if r["status"] in FINISHED]
        if not done:
            continue
        key = _score_key(done)
        # every row minus ppo, paired by seed, with its 95% interval: the comparison the tables make
        if "ppo" in labels and len(labels) > 1:
            fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(noises) + 2.5), 4.0))
            others = [lab for lab in labels if lab != "ppo"]
            width = 0.6 / max(1, len(others))
            for i, lab in enumerate(others):
                xs, ms, lo, hi = [], [], [], []
                for j, n in enumerate(noises):
                    ci = _paired(done, lab, "ppo", n, key)
                    if ci is not None:
                        xs.append(j + (i - (len(others) - 1) / 2) * width)
                        ms.append(ci[0])
                        lo.append(ci[0] - ci[1])
                        hi.append(ci[2] - ci[0])
                if xs:
                    ax.errorbar(xs, ms, yerr=[lo, hi], marker="o", capsize=3, linestyle="none", label=lab)
            ax.axhline(0.0, color="k", lw=0.8)
            ax.set_xticks(range(len(noises)))
            ax.set_xticklabels(noises)
            ax.set_xlim(-0.6, len(noises) - 0.4)
            where = "whole held-out split" if key == "score_full" else "runs' own evaluation"
            paths.append(_save(fig, ax, "reward noise model", f"final score minus ppo's ({where})",
                               f"{grid.name}: {block} / {task}: paired by seed, mean and 95% interval",
                               os.path.join(out, f"paired_vs_ppo_{sanitize(block)}_{sanitize(task)}.png")))
        # final accuracy vs noise model
        fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(noises) + 2.5), 4.0))
        width = 0.6 / max(1, len(labels))
        for i, lab in enumerate(labels):
            xs, ms, ss = [], [], []
            for j, n in enumerate(noises):
                st = _stats(r[key] for r in done if _label(r) == lab and r["noise"] == n)
                if st is not None:
                    xs.append(j + (i - (len(labels) - 1) / 2) * width)
                    ms.append(st[0])
                    ss.append(st[1])
            if xs:
                ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=lab,
                            linestyle="-" if len(noises) > 1 else "none")
        ikey = _start_key(done, key)
        init = [_stats({r["seed"]: r[ikey] for r in done if r["noise"] == n}.values()) for n in noises]
        if any(s is not None for s in init):
            ax.plot([j for j, s in enumerate(init) if s is not None], [s[0] for s in init if s is not None],
                    "k:", marker="_", markersize=20, label="SFT start")
        ax.set_xticks(range(len(noises)))
        ax.set_xticklabels(noises)
        ax.set_xlim(-0.6, len(noises) - 0.4)
        paths.append(_save(fig, ax, "reward noise model", f"final {metric_name(task)}",
                           f"{grid.name}: {block} / {task} (mean ± std over seeds)",
                           os.path.join(out, f"acc_vs_noise_{sanitize(block)}_{sanitize(task)}.png")))
        # learning curves
        for n in noises:
            runs = [r for r in done if r["noise"] == n and r["_curve"]]
            if not runs:
                continue
            fig, ax = plt.subplots(figsize=(6.5, 4.0))
            for lab in labels:
                curves = [dict(r["_curve"]) for r in runs if _label(r) == lab]
                if not curves:
                    continue
                common = sorted(set.intersection(*(set(c) for c in curves)))
                if not common:
                    continue
                mean = [statistics.fmean(c[s] for c in curves) for s in common]
                std = [statistics.stdev([c[s] for c in curves]) if len(curves) > 1 else 0.0 for s in common]
                line, = ax.plot(common, mean, marker=".", label=f"{lab} (n={len(curves)})")
                ax.fill_between(common, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=line.get_color(), alpha=0.15)
            paths.append(_save(fig, ax, "RL step", metric_name(task),
                               f"{grid.name}: {block} / {task} / noise {n} (mean ± std over seeds)",
                               os.path.join(out, f"curves_{sanitize(block)}_{sanitize(task)}_{sanitize(n)}.png")))
    return paths


def _save(fig, ax, xlabel: str, ylabel: str, title: str, path: str) -> str:
    """Label, lay out, write and close one figure; returns its path."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    tight_layout(fig)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(grid: Grid, specs: Sequence[RunSpec], out: str, plots: bool = True) -> Dict:
    """results.csv, results.md and the plots in `out`; returns their paths."""
    rows = collect(specs, out)
    os.makedirs(out, exist_ok=True)
    res = {"csv": write_csv(rows, os.path.join(out, "results.csv"))}
    res["md"] = write_markdown(grid, rows, os.path.join(out, "results.md"), csv_rows=len(rows))
    res["plots"] = write_plots(grid, rows, out) if plots else []
    res["finished"] = sum(r["status"] in FINISHED for r in rows)
    res["total"] = len(rows)
    return res

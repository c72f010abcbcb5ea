"""`dvpo experiment`: grid files, the runner (SFT first, process pool, resume) and the report
(results.csv schema, results.md tables, plots). Runs the built-in smoke grid end to end."""

import csv
import os

import pytest

from dvpo.config import CriticLossConfig

from dvpo.cli import main
from dvpo.experiments import builtin_grids, expand, load_grid
from dvpo.experiments.report import COLUMNS

SPEC_COLUMNS = ["block", "task", "algo", "variant", "noise", "seed", "steps", "status", "heldout_acc_final",
                "heldout_acc_sampled_final", "heldout_reward_final", "reward_true_last10pct",
                "reward_noisy_last10pct", "sec_per_step_median", "wall_s", "run_dir"]


def test_builtin_grids_load_and_expand():
    assert {"main", "ablation", "sensitivity", "pilot", "smoke"} <= set(builtin_grids())
    main_runs = expand(load_grid("main"))
    assert len(main_runs) == 3 * 6 * 6 * 5        # 3 tasks x 6 noise cells x 6 algorithms x 5 seeds
    assert {s.label for s in main_runs} == {"dvpo", "dvpo-recipe", "ppo", "grpo", "robust-ppo", "reinforce++"}
    recipe = next(s.config("/o", "/c") for s in main_runs if s.variant == "recipe")
    assert recipe.tail_targets == "recipe" and recipe.algo == "dvpo"
    assert next(s.config("/o", "/c") for s in main_runs if s.label == "dvpo").tail_targets == "consistent"
    math_runs = expand(load_grid("main"), only=["math/"])
    assert len(math_runs) == 6 * 6 * 5 and {s.task for s in math_runs} == {"math"}
    assert [s.seed for s in main_runs] == sorted(s.seed for s in main_runs)      # seeds interleave
    assert len({s.rel_dir for s in main_runs}) == len(main_runs)
    steps = {s.config("/o", "/c").steps for s in main_runs}
    assert len(steps) == 1                                                       # same budget per run
    abl_all = expand(load_grid("ablation"))
    abl = [s for s in abl_all if not s.variant.startswith("adv_")]
    # 6 cumulative term groups + 2 actor advantages on math; the 2 advantages x 2 noise cells on dialogue
    assert len(abl) == 6 * 3 and len(abl_all) == 8 * 3 + 2 * 2 * 5 + 2 * 5
    math_adv = [s for s in abl_all if s.variant.startswith("adv_") and s.task == "math"]
    adv = {s.variant: s.config("/o", "/c") for s in math_adv}
    assert adv["adv_cvar25"].advantage == "cvar:0.25" and adv["adv_trim25"].advantage == "trim:0.25"
    assert {c.noise for c in adv.values()} == {"rm:0.8"} and {s.noise for s in abl} == {"rm:0.8"}
    dial = [s.config("/o", "/c") for s in abl_all if s.task == "dialogue"]
    assert {c.noise for c in dial} == {"flip:0.2", "flip:0.3", "rm:0.8", "missing:0.6"}
    assert {c.advantage for c in dial} == {"cvar:0.25", "trim:0.25"}
    qr = next(s.config("/o", "/c") for s in abl if s.variant == "qr_only")
    assert qr.loss_qh == 1.0 and qr.loss_risk == qr.loss_consist == qr.loss_shape == 0.0
    full = next(s.config("/o", "/c") for s in abl if s.variant == "+consist")
    default = CriticLossConfig()  # "+consist" is every term at its default weight
    assert (full.loss_consist, full.loss_risk) == (default.consist, default.risk) and full.loss_consist > 0
    sens = {s.variant: s.config("/o", "/c") for s in expand(load_grid("sensitivity"), seeds=[0])}
    assert sens["n500"].n_quantiles == 500 and sens["ab02"].alpha == sens["ab02"].beta == 0.2
    only = expand(load_grid("main"), seeds=[1], steps=7, only=["/vote:3/"])
    assert len(only) == 6 * 3 and all(s.seed == 1 and s.config("/o", "/c").steps == 7 for s in only)


@pytest.mark.parametrize("bad, key", [
    ("[base]\nstepz = 3\n", "stepz"),
    ("[base]\nsteps = 3\n[[block]]\nname='b'\ntasks=['math']\nalgos=['dvpo']\nlearning_rate=1\n", "learning_rate"),
    ("[[block]]\nname='b'\ntasks=['math']\nalgos=['dvpo']\n[block.variants]\nv = { n_quantile = 3 }\n",
     "n_quantile"),
    ("[[block]]\nname='b'\ntasks=['math']\nalgos=['dvpo', 'sac']\n", "sac"),
    ("[base]\nalgo = 'ppo'\n[[block]]\nname='b'\ntasks=['math']\nalgos=['dvpo']\n", "algo"),
    ("colour = 1\n", "colour"),
])
def test_bad_grid_key_raises(tmp_path, bad, key):
    p = tmp_path / "bad.toml"
    p.write_text(bad)
    with pytest.raises(ValueError) as e:
        load_grid(str(p))
    assert key in str(e.value) and "bad.toml" in str(e.value)


def _csv(path):
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return r.fieldnames, list(r)


def test_smoke_grid_end_to_end(tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["experiment", "--grid", "smoke", "--out", str(out), "--list"]) == 0
    listed = [l for l in capsys.readouterr().out.splitlines() if l.startswith("pending")]
    assert len(listed) == 8 and "smoke/math/dvpo/flip:0.4/s1" in "\n".join(listed)

    assert main(["experiment", "--grid", "smoke", "--out", str(out), "--jobs", "2", "--no-progress"]) == 0
    capsys.readouterr()
    cols, rows = _csv(out / "results.csv")
    assert cols == COLUMNS and cols[:len(SPEC_COLUMNS)] == SPEC_COLUMNS
    assert len(rows) == 8
    assert {(r["algo"], r["noise"], r["seed"]) for r in rows} == {
        (a, n, s) for a in ("dvpo", "ppo") for n in ("none", "flip:0.4") for s in ("0", "1")}
    for r in rows:
        assert r["status"] == "ok" and r["steps"] == "2", r
        assert 0.0 <= float(r["heldout_acc_final"]) <= 1.0
        assert float(r["sec_per_step_median"]) > 0
        assert os.path.exists(out / r["run_dir"] / "summary.json")
    # the same SFT warm start for every run of a seed
    import json
    sft_dirs = {}
    for r in rows:
        with open(out / r["run_dir"] / "summary.json") as f:
            sft_dirs.setdefault(r["seed"], set()).add(json.load(f)["sft_dir"])
    assert all(len(v) == 1 for v in sft_dirs.values()) and sft_dirs["0"] != sft_dirs["1"]

    # the distributional critic's end-of-training fan, for dvpo only
    for r in rows:
        spread, deep = r["value_spread_last10pct"], r["value_crossing_deep_last10pct"]
        if r["algo"] == "dvpo":
            assert float(spread) >= 0.0 and 0.0 <= float(deep) <= 1.0, r
        else:
            assert spread == deep == "", r
    md = (out / "results.md").read_text()
    assert "The critic at the end of training" in md and "| critic | none | flip:0.4 |" in md
    assert "| algorithm | none | flip:0.4 |" in md
    assert "SFT start (initial)" in md and "| dvpo |" in md and "| ppo |" in md
    assert "seeds: 2" in md and "(2)" in md
    assert "- grid file: `dvpo/experiments/grids/smoke.toml`" in md  # the repo's path, not this machine's
    for name in ("acc_vs_noise_smoke_math.png", "curves_smoke_math_none.png", "curves_smoke_math_flip_0.4.png",
                 "paired_vs_ppo_smoke_math.png"):
        assert (out / name).stat().st_size > 1000, name

    # resumable: a second invocation skips every run
    before = {r["run_dir"]: os.path.getmtime(out / r["run_dir"] / "summary.json") for r in rows}
    assert main(["experiment", "--grid", "smoke", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "all 8 runs already finished" in text
    assert before == {d: os.path.getmtime(out / d / "summary.json") for d in before}
    assert main(["experiment", "--grid", "smoke", "--out", str(out), "--list"]) == 0
    assert sum(l.startswith("done") for l in capsys.readouterr().out.splitlines()) == 8

    # --report-only rebuilds the outputs
    os.remove(out / "results.csv")
    assert main(["experiment", "--grid", "smoke", "--out", str(out), "--report-only", "--no-plots"]) == 0
    assert len(_csv(out / "results.csv")[1]) == 8

    # --full-eval: every final policy on the whole held-out split, cached per run
    from dvpo.tasks import get_task
    whole = len(get_task("math").heldout_set(1 << 30))
    assert main(["experiment", "--grid", "smoke", "--out", str(out), "--report-only", "--no-plots", "--full-eval",
                 "--no-progress"]) == 0
    assert "8 runs evaluated now, 0 already" in capsys.readouterr().out
    _, rows = _csv(out / "results.csv")
    assert whole > 256 and all(int(r["n_full"]) == whole and 0.0 <= float(r["score_full"]) <= 1.0 for r in rows)
    md = (out / "results.md").read_text()
    assert f"on the whole held-out split ({whole} problems" in md and "difference (on the whole held-out split)" in md
    assert "(SFT start: the runs' own first evaluation" not in md              # the starts were scored too
    assert all(0.0 <= float(r["score_initial_full"]) <= 1.0 for r in rows)
    for seed in ("0", "1"):   # one warm start per seed, scored once
        assert len({r["score_initial_full"] for r in rows if r["seed"] == seed}) == 1
    assert main(["experiment", "--grid", "smoke", "--out", str(out), "--report-only", "--no-plots", "--full-eval",
                 "--no-progress"]) == 0
    assert "0 runs evaluated now, 8 already" in capsys.readouterr().out


def test_failed_and_interrupted_runs(tmp_path, capsys):
    """A failing run is recorded without stopping the grid; a run cut short resumes from its checkpoint."""
    grid = tmp_path / "g.toml"
    grid.write_text("""
seeds = [0]
[base]
steps = 2
eval_every = 1
n_eval = 4
save_every = 1
prompts_per_step = 2
group_size = 2
hidden = 16
layers = 1
heads = 2
ffn = 32
n_quantiles = 4
n_heads = 2
sft_steps = 5
sft_batch = 8
sft_eval_every = 5
[[block]]
name = "b"
tasks = ["math"]
algos = ["ppo", "grpo"]
noises = ["none"]
[block.variants]
ok = {}
bad = { advantage = "nonsense" }
""")
    out = tmp_path / "exp"
    rc = main(["experiment", "--grid", str(grid), "--out", str(out), "--jobs", "1", "--no-progress",
               "--only", "ppo-ok"])
    assert rc == 0
    # cut the finished run back to "interrupted after step 1": resume must finish it
    run = out / "runs" / "b" / "math" / "ppo-ok" / "none" / "s0"
    os.remove(run / "summary.json")
    from dvpo.trainer.loop import read_metrics
    assert [r["step"] for r in read_metrics(str(run))] == [0, 1, 2]
    rc = main(["experiment", "--grid", str(grid), "--out", str(out), "--jobs", "1", "--no-progress"])
    assert rc == 1                                              # some runs failed
    assert [r["step"] for r in read_metrics(str(run))] == [0, 1, 2]
    text = capsys.readouterr().out
    assert "FAILED" in text or "failed" in text
    _, rows = _csv(out / "results.csv")
    status = {(r["algo"], r["variant"]): r["status"] for r in rows}
    assert status[("ppo", "ok")] == "ok" and status[("grpo", "ok")] == "ok"
    assert status[("ppo", "bad")] == "failed"
    assert "nonsense" in next(r["error"] for r in rows if (r["algo"], r["variant"]) == ("ppo", "bad"))
    assert "Failed runs" in (out / "results.md").read_text()


def test_paired_interval_known_answer():
    from dvpo.experiments.report import excludes_zero, paired_interval

    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.303 -> half-width 4.303 / sqrt(3)
    m, lo, hi, n = paired_interval([1.0, 2.0, 3.0])
    assert (m, n) == (2.0, 3)
    assert (lo, hi) == pytest.approx((2 - 4.303 / 3 ** 0.5, 2 + 4.303 / 3 ** 0.5))
    assert not excludes_zero((m, lo, hi, n))                    # 2 +- 2.48: three seeds are not enough
    assert excludes_zero(paired_interval([1.0, 1.1, 0.9, 1.0]))
    assert excludes_zero(paired_interval([-1.0, -1.1, -0.9]))    # clearly below 0 counts too
    assert not excludes_zero(paired_interval([-1.0, 0.5, 1.0])) and paired_interval([1.0]) is None
    assert paired_interval([0.1, 0.1])[1:3] == (0.1, 0.1) and not excludes_zero(paired_interval([0.1, 0.1]))  # 2 seeds
    assert not excludes_zero(None)


def _fake_rows(scores):
    """Finished rows for the report from {(label, noise): [score per seed]}."""
    rows = []
    for (lab, noise), vals in scores.items():
        algo, _, variant = lab.partition("-") if lab.startswith("dvpo-") else (lab, "", "")
        for seed, v in enumerate(vals):
            rows.append({"block": "b" if not variant else "b-" + variant, "task": "math", "algo": algo,
                         "variant": variant, "noise": noise, "seed": seed, "steps": 3, "status": "ok",
                         "score_final": v, "score_initial": 0.4, "score_sampled_final": v,
                         "score_sampled_initial": 0.2, "run_dir": f"{lab}/{noise}/s{seed}", "_curve": []})
    return rows


def test_report_pairs_blocks_by_seed_and_bolds_only_clear_winners(tmp_path):
    from dvpo.experiments.grid import load_grid
    from dvpo.experiments.report import write_markdown

    grid_file = tmp_path / "g.toml"
    grid_file.write_text("""
seeds = [0, 1, 2, 3]
[[block]]
name = "b"
tasks = ["math"]
algos = ["dvpo", "ppo", "grpo", "robust-ppo"]
noises = ["none", "flip:0.1"]
[[block]]
name = "b-recipe"
tasks = ["math"]
algos = ["dvpo"]
noises = ["none", "flip:0.1"]
variants = { recipe = { tail_targets = "recipe" } }
[[block]]
name = "later"
tasks = ["science"]
algos = ["dvpo", "ppo"]
noises = ["none"]
""")
    base = [0.50, 0.60, 0.55, 0.45]         # a seed effect shared by every algorithm (the SFT start)
    shift = {"dvpo": {"none": 0.0, "flip:0.1": 0.10}, "dvpo-recipe": {"none": 0.0, "flip:0.1": 0.0},
             "ppo": {"none": 0.0, "flip:0.1": 0.0}, "grpo": {"none": 0.0, "flip:0.1": -0.02},
             "robust-ppo": {"none": 0.0, "flip:0.1": 0.01}}
    wiggle = [0.004, -0.003, 0.002, -0.001]  # small per-seed noise: only dvpo at flip:0.1 is clearly best
    scores = {(lab, n): [b + d + (w if lab == "dvpo" else -w) * (n == "none") for b, w in zip(base, wiggle)]
              for lab, per in shift.items() for n, d in per.items()}
    md = write_markdown(load_grid(str(grid_file)), _fake_rows(scores), str(tmp_path / "r.md"), csv_rows=0)
    text = open(md).read()
    assert "## all — math" in text                                  # both blocks in one table
    assert "science" not in text                                    # a task not run yet: no empty tables
    assert "| dvpo-recipe |" in text and "| dvpo |" in text
    dvpo_row = next(l for l in text.splitlines() if l.startswith("| dvpo |"))
    none_cell, flip_cell = dvpo_row.split(" | ")[1:3]
    assert flip_cell.startswith("**0.625") and not none_cell.startswith("**")   # seed spread 0.06 in both
    # the paired differences: dvpo - ppo at flip:0.1 is exactly +0.10 on every seed
    diff_row = next(l for l in text.splitlines() if l.startswith("| dvpo − ppo |"))
    assert "**+0.100 [+0.100, +0.100] (4)**" in diff_row
    recipe_row = next(l for l in text.splitlines() if l.startswith("| dvpo-recipe − grpo |"))
    assert "+0.020" in recipe_row
    assert "dvpo above ppo, grpo, robust-ppo by more than the paired 95% interval in 1 of 1 noisy cells (flip:0.1)" \
        in text
    assert "dvpo-recipe above ppo, grpo, robust-ppo by more than the paired 95% interval in 0 of 1" in text

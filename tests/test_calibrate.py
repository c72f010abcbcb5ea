"""The known-answer suite (`dvpo calibrate`), small: the critic loss against distributions whose
quantile function is known. The full suite's numbers are in docs/math.md."""

import os

import pytest

from dvpo import calibrate, cli


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("calibrate"))
    rows = calibrate.run_suite(out, ns=(32,), kinds=("point",), dists=["binary"], steps=400, batch=128,
                               progress=False)
    return out, {r["config"]: r for r in rows}


def test_writes_tables_and_plots(smoke):
    out, rows = smoke
    assert set(rows) == {"default", "symmetric", "qh-only", "recipe"}
    for name in ("results.md", "results.csv", "quantiles_binary.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert "| point | 32 | default |" in open(os.path.join(out, "results.md")).read()


def test_quantile_loss_alone_recovers_the_truth(smoke):
    """A small normalized kappa makes the quantile Huber loss a quantile (not expectile) loss."""
    r = smoke[1]["qh-only"]
    assert r["w1"] < 0.015 and abs(r["mean_err"]) < 0.01 and r["crossing"] == 0.0


def test_consistent_tails_match_the_true_cvars(smoke):
    r = smoke[1]["symmetric"]
    assert abs(r["cvar_lo_err"]) < calibrate.SYMMETRIC_CVAR_BAR
    assert abs(r["cvar_hi_err"]) < calibrate.SYMMETRIC_CVAR_BAR


def test_recipe_collapses_the_distribution(smoke):
    """The published recipe's tail terms under per-sample targets: the finding the default fixes."""
    recipe, default = smoke[1]["recipe"], smoke[1]["default"]
    assert recipe["w1"] > 0.2 and recipe["crossing"] > 0.25
    assert default["w1"] < recipe["w1"] / 3 and default["crossing"] < recipe["crossing"] / 2


def test_truth_of_a_known_distribution():
    t = calibrate.truth("gaussian", 0.1, 0.1, draws=400_000)
    # N(0.5, 0.2): CVaR_0.1 = 0.5 - 0.2 * phi(1.2816) / 0.1 = 0.14940
    assert t.mean == pytest.approx(0.5, abs=2e-3)
    assert t.cvar_lo == pytest.approx(0.5 - 0.2 * 1.75498, abs=3e-3)
    assert t.cvar_hi == pytest.approx(0.5 + 0.2 * 1.75498, abs=3e-3)


def test_cli_rejects_bad_values(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["calibrate", "--steps", "0"])
    assert err.value.code == 2
    assert "--steps" in capsys.readouterr().err

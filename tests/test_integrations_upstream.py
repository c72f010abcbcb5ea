"""The machinery of tools/upstream_tests.sh (tests/upstream/): the comparison that fails CI on a
test the patched run loses, the JUnit parsing, and the conftest that patches dvpo into verl and
OpenRLHF (run on small stand-in "upstream" test files, in a pytest subprocess, without downloads).
The real upstream run is tools/upstream_tests.sh itself, in .ci/run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.test_doc_recipes import require

REPO = Path(__file__).resolve().parents[1]


def _load_runner():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_dvpo_run_upstream", REPO / "tests" / "upstream" / "run_upstream.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_upstream = _load_runner()


def _results(shipped, patched, calls):
    return {"shipped": {"rc": 0, "outcomes": shipped, "report": None},
            "patched": {"rc": 0 if all(o == "passed" for _, o in patched.values()) else 1,
                        "outcomes": patched, "report": calls}}


def test_compare_flags_every_kind_of_regression(tmp_path):
    f1, f2 = "tests/test_a.py", "tests/test_b.py"
    shipped = {"tests.test_a::t1": (f1, "passed"), "tests.test_a::t2": (f1, "passed"),
               "tests.test_a::t3": (f1, "skipped"), "tests.test_a::t4": (f1, "failed"),
               "tests.test_b::t5": (f2, "passed"), "tests.test_b::t6": (f2, "passed")}
    patched = {"tests.test_a::t1": (f1, "passed"), "tests.test_a::t2": (f1, "failed"),
               "tests.test_a::t3": (f1, "passed"), "tests.test_a::t4": (f1, "failed"),
               "tests.test_b::t5": (f2, "skipped")}                    # t6 is missing
    report = tmp_path / "calls.json"
    report.write_text(json.dumps({"file_calls": {f1: 3}, "calls": {"x": 3}, "patched": []}))
    rows, problems, upstream_failures, _ = run_upstream.compare("fw", "1.0", [f1, f2],
                                                                _results(shipped, patched, report))
    text = "\n".join(problems)
    assert "tests.test_a::t2: passed as shipped, failed with dvpo" in text
    assert "tests.test_b::t5: passed as shipped, skipped with dvpo" in text
    assert "tests.test_b::t6: passed as shipped, missing with dvpo" in text
    assert f"{f2}: the patched run never called dvpo's code" in text
    assert "t3" not in text and "t4" not in text          # skipped -> passed is fine; t4 fails upstream too
    assert upstream_failures == ["tests.test_a::t4"]
    assert rows[0] == (f1, "2 passed, 1 failed, 1 skipped", "2 passed, 2 failed", 3)
    # no regressions, calls everywhere: no problems
    report.write_text(json.dumps({"file_calls": {f1: 1, f2: 1}, "calls": {"x": 2}, "patched": []}))
    same = {k: v for k, v in shipped.items()}
    assert run_upstream.compare("fw", "1.0", [f1, f2], _results(shipped, same, report))[1] == []
    # a patched run that wrote no report proves nothing
    assert any("no dvpo call report" in p for p in run_upstream.compare(
        "fw", "1.0", [f1, f2], _results(shipped, same, tmp_path / "none.json"))[1])


def test_outcomes_from_junit(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text(textwrap.dedent("""\
        <testsuites><testsuite>
          <testcase classname="tests.trainer.test_x" name="test_ok"/>
          <testcase classname="tests.trainer.test_x.TestC" name="test_bad"><failure message="x"/></testcase>
          <testcase classname="tests.trainer.test_x" name="test_err"><error message="x"/></testcase>
          <testcase classname="tests.trainer.test_x" name="test_skip"><skipped message="x"/></testcase>
        </testsuite></testsuites>"""))
    out = run_upstream._outcomes(junit, ["tests/trainer/test_x.py"])
    assert out == {"tests.trainer.test_x::test_ok": ("tests/trainer/test_x.py", "passed"),
                   "tests.trainer.test_x.TestC::test_bad": ("tests/trainer/test_x.py", "failed"),
                   "tests.trainer.test_x::test_err": ("tests/trainer/test_x.py", "error"),
                   "tests.trainer.test_x::test_skip": ("tests/trainer/test_x.py", "skipped")}


def _run_with_conftest(root: Path, report: Path):
    shutil.copyfile(REPO / "tests" / "upstream" / "dvpo_patch_conftest.py", root / "conftest.py")
    (root / "pytest.ini").write_text("[pytest]\n")
    env = dict(os.environ, DVPO_UPSTREAM_REPORT=str(report))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(root / "pytest.ini"),
                           "--rootdir", str(root), "tests"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)


def test_conftest_patches_verl_before_the_tests_import_it(tmp_path):
    require("verl.trainer.ppo.core_algos", "pip install verl==0.9.1")
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_fake_upstream.py").write_text(textwrap.dedent("""\
        import torch
        from verl.trainer.ppo.core_algos import compute_gae_advantage_return, compute_value_loss, get_adv_estimator_fn

        def test_bound_at_import_is_dvpo():
            assert compute_gae_advantage_return.__module__ == "dvpo.integrations.verl"
            assert get_adv_estimator_fn("gae").__module__ == "dvpo.integrations.verl"
            adv, ret = compute_gae_advantage_return(torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3), 1.0, 1.0)
            assert ret.shape == (2, 3)

        def test_value_loss_is_the_exact_mse():
            v, r = torch.zeros(1, 2), torch.tensor([[1.0, 3.0]])
            loss, _ = compute_value_loss(v, r, v, torch.ones(1, 2), 10.0, "token-mean")
            assert loss.item() == 0.5 * (1 + 9) / 2
        """))
    report = tmp_path / "calls.json"
    proc = _run_with_conftest(tmp_path, report)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    calls = json.loads(report.read_text())
    assert calls["file_calls"] == {"tests/test_fake_upstream.py": 2}
    assert calls["calls"] == {"verl:compute_gae_advantage_return": 1, "verl:compute_value_loss": 1}
    assert any("ADV_ESTIMATOR_REGISTRY['gae']" in line for line in calls["patched"])


def test_conftest_rebinds_openrlhf_loaded_by_path(tmp_path):
    import importlib.util

    require("deepspeed", "OpenRLHF's loss module imports it")
    spec = importlib.util.find_spec("openrlhf")
    if spec is None:
        require("openrlhf", "pip install --no-deps openrlhf==0.11.2")
    models = Path(list(spec.submodule_search_locations)[0]) / "models"
    tests = tmp_path / "tests"
    tests.mkdir()
    # loads loss.py by file path at import and binds its function, as OpenRLHF's own tests do
    (tests / "test_fake_upstream.py").write_text(textwrap.dedent(f"""\
        import importlib.util, sys, types
        import torch
        pkg = types.ModuleType("_fake_openrlhf_models")
        pkg.__path__ = [{str(models)!r}]
        sys.modules["_fake_openrlhf_models"] = pkg
        for name in ("utils", "loss"):
            spec = importlib.util.spec_from_file_location(f"_fake_openrlhf_models.{{name}}", {str(models)!r} + f"/{{name}}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        aggregate_loss = sys.modules["_fake_openrlhf_models.loss"].aggregate_loss
        ValueLoss = sys.modules["_fake_openrlhf_models.loss"].ValueLoss

        def test_all_masked_batch_is_dvpo_zero_not_openrlhf_nan():
            loss = aggregate_loss(torch.ones(2, 3), torch.zeros(2, 3))
            assert loss.item() == 0.0                      # OpenRLHF's own gives NaN here
            v = torch.zeros(1, 2)
            assert ValueLoss(None)(v, v, torch.ones(1, 2)).item() == 0.5
        """))
    report = tmp_path / "calls.json"
    proc = _run_with_conftest(tmp_path, report)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    calls = json.loads(report.read_text())
    assert calls["calls"] == {"openrlhf:aggregate_loss": 1, "openrlhf:ValueLoss": 1}
    assert calls["file_calls"] == {"tests/test_fake_upstream.py": 2}

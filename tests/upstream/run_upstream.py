"""Run the frameworks' own test files twice, as shipped and with dvpo's adapters patched in, and fail
on any test that the patched run loses.

    python tests/upstream/run_upstream.py [--work DIR] [--framework verl|openrlhf ...] [--no-download]

(tools/upstream_tests.sh is the entry point; .ci/run calls it after installing the frameworks.)

For each framework installed here, at the installed version:

1. fetch its test files from PyPI with pip (the package registry; nothing else is contacted):
   * verl: the sdist (`pip download --no-deps --no-binary :all: verl==V`) carries `tests/`;
   * OpenRLHF: PyPI has no sdist, but the wheel (`pip download --no-deps --only-binary :all:
     openrlhf==V`) ships `tests/` next to `openrlhf/` (both under `openrlhf-V.data/purelib/`),
     which its tests load by file path;
   * TRL: neither the sdist nor the wheel of TRL 1.12 contains tests, so there is nothing to run
     (the TRL adapter is checked against TRL's own code by tests/test_integrations_trl.py and
     tests/test_doc_recipes.py, which run TRL's `PPOTrainer.train` with the documented diff);
2. run the selected files (UPSTREAM_FILES: the ones that exercise the value loss, loss aggregation,
   GAE / advantage estimation and the data metrics, on CPU, without downloading models) with
   pytest, once as shipped and once with tests/upstream/dvpo_patch_conftest.py copied in as their
   root `conftest.py`;
3. compare per test: a test that passes (or is skipped) as shipped but fails, errors, is skipped
   or is missing with dvpo is a regression; so is an upstream file whose patched run never called
   dvpo's code. Any regression -> exit code 1. Failures that the as-shipped run has too are
   upstream's and are reported, not counted.

The fetched files live under the work directory only (never in the repository).
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFTEST = HERE / "dvpo_patch_conftest.py"

# The upstream test files that exercise what dvpo replaces (paths inside the fetched package root).
UPSTREAM_FILES = {
    "verl": [
        "tests/trainer/ppo/test_value_loss_normalization_on_cpu.py",   # compute_value_loss, all modes
        "tests/trainer/ppo/test_loss_aggregation_on_cpu.py",           # agg_loss
        "tests/trainer/ppo/test_core_algos_on_cpu.py",                 # GAE, the estimator registry
        "tests/trainer/ppo/test_metric_utils_on_cpu.py",               # compute_data_metrics
        "tests/trainer/ppo/test_dynamic_policy_losses_on_cpu.py",      # agg_loss, under a policy loss
        "tests/trainer/ppo/test_rollout_corr_integration.py",          # agg_loss, under the policy losses
    ],
    "openrlhf": [
        "tests/test_loss_aggregation.py",                              # aggregate_loss (ValueLoss's reduction)
    ],
}
DISTRIBUTIONS = {"verl": "verl", "openrlhf": "openrlhf"}


def _log(msg):
    print(msg, flush=True)


def _download(framework, version, dest: Path, offline: bool) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    if framework == "verl":
        pattern, args = f"verl-{version}.tar.gz", ["--no-binary", ":all:"]
    else:
        pattern, args = f"openrlhf-{version}-*.whl", ["--only-binary", ":all:"]
    found = sorted(dest.glob(pattern))
    if not found and not offline:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *args, f"{framework}=={version}",
               "-d", str(dest)]
        _log("$ " + " ".join(cmd))
        subprocess.run(cmd, check=True)
        found = sorted(dest.glob(pattern))
    if not found:
        raise SystemExit(f"upstream tests: no {pattern} in {dest} (download failed or --no-download)")
    return found[-1]


def _extract(framework, version, archive: Path, root: Path) -> None:
    """The package root holding `tests/` (and, for OpenRLHF, the `openrlhf/` its tests load by path)."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    if framework == "verl":
        prefix = f"verl-{version}/tests/"
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.name.startswith(prefix) and (member.isfile() or member.isdir()):
                    rel = member.name[len(f"verl-{version}/"):]
                    target = root / rel
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                    else:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with tar.extractfile(member) as src, open(target, "wb") as dst:
                            shutil.copyfileobj(src, dst)
    else:
        purelib = f"openrlhf-{version}.data/purelib/"
        with zipfile.ZipFile(archive) as whl:
            for name in whl.namelist():
                if name.endswith("/"):
                    continue
                rel = name[len(purelib):] if name.startswith(purelib) else name
                if not (rel.startswith("openrlhf/") or rel.startswith("tests/")):
                    continue
                target = root / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with whl.open(name) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    # keep pytest from looking further up for a config (the work dir may sit inside dvpo's repo)
    (root / "pytest.ini").write_text("[pytest]\n")


def _run_pytest(root: Path, files, junit: Path, report: Path | None, timeout: int):
    env = dict(os.environ)
    env.pop("DVPO_UPSTREAM_REPORT", None)
    if report is not None:
        env["DVPO_UPSTREAM_REPORT"] = str(report)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", f"--junitxml={junit}",
           "--rootdir", str(root), "-c", str(root / "pytest.ini"), *files]
    _log(f"$ (cd {root} && {' '.join(cmd[1:])})")
    start = time.time()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    tail = "\n".join(proc.stdout.splitlines()[-25:])
    _log(tail)
    if proc.returncode not in (0, 1):  # 1 = some tests failed; anything else: collection/usage errors
        _log(proc.stderr[-4000:])
    return proc.returncode, time.time() - start


def _outcomes(junit: Path, files):
    """{test id: outcome} from a JUnit XML file; outcome in passed/failed/error/skipped."""
    out = {}
    if not junit.exists():
        return out
    modules = {f[:-3].replace("/", "."): f for f in files}
    for case in ET.parse(junit).getroot().iter("testcase"):
        classname, name = case.get("classname", ""), case.get("name", "")
        if case.find("failure") is not None:
            outcome = "failed"
        elif case.find("error") is not None:
            outcome = "error"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        else:
            outcome = "passed"
        file = next((f for mod, f in modules.items() if classname == mod or classname.startswith(mod + ".")),
                    classname)
        out[f"{classname}::{name}"] = (file, outcome)
    return out


def _count(outcomes, file):
    c = collections.Counter(o for f, o in outcomes.values() if f == file)
    return c


def _fmt(c):
    parts = [f"{c.get('passed', 0)} passed"]
    for k in ("failed", "error", "skipped"):
        if c.get(k):
            parts.append(f"{c[k]} {k}")
    return ", ".join(parts)


def run_framework(framework, work: Path, offline: bool, timeout: int):
    try:
        version = importlib.metadata.version(DISTRIBUTIONS[framework])
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"upstream tests: {framework} is not installed (install it first, as .ci/run does)")
    archive = _download(framework, version, work / "downloads", offline)
    files = UPSTREAM_FILES[framework]
    results = {}
    for variant in ("shipped", "patched"):
        root = work / variant / f"{framework}-{version}"
        _extract(framework, version, archive, root)
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise SystemExit(f"upstream tests: {archive.name} has no {', '.join(missing)}")
        report = None
        if variant == "patched":
            shutil.copyfile(CONFTEST, root / "conftest.py")
            report = work / f"{framework}-dvpo-calls.json"
            if report.exists():
                report.unlink()
        junit = work / f"{framework}-{variant}.xml"
        if junit.exists():
            junit.unlink()
        _log(f"\n== {framework} {version}: upstream tests {'with dvpo patched in' if report else 'as shipped'}")
        rc, seconds = _run_pytest(root, files, junit, report, timeout)
        results[variant] = dict(rc=rc, seconds=seconds, outcomes=_outcomes(junit, files), report=report)
    return version, files, results


def compare(framework, version, files, results):
    shipped, patched = results["shipped"]["outcomes"], results["patched"]["outcomes"]
    calls = {}
    report = results["patched"]["report"]
    if report is not None and report.exists():
        calls = json.loads(report.read_text())
    problems = []
    if results["shipped"]["rc"] not in (0, 1) or not shipped:
        problems.append(f"the as-shipped run did not complete (pytest exit code {results['shipped']['rc']})")
    if results["patched"]["rc"] not in (0, 1) or not patched:
        problems.append(f"the patched run did not complete (pytest exit code {results['patched']['rc']})")
    if not calls:
        problems.append("the patched run wrote no dvpo call report (was the conftest loaded?)")
    rows = []
    for file in files:
        s, p = _count(shipped, file), _count(patched, file)
        n_calls = calls.get("file_calls", {}).get(file, 0)
        rows.append((file, _fmt(s), _fmt(p), n_calls))
        if not s:
            problems.append(f"{file}: no tests ran as shipped")
        if calls and n_calls == 0:
            problems.append(f"{file}: the patched run never called dvpo's code")
    for key, (file, before) in sorted(shipped.items()):
        after = patched.get(key, (file, "missing"))[1]
        if before in ("passed", "skipped") and after != before and not (before == "skipped" and after == "passed"):
            problems.append(f"{key}: {before} as shipped, {after} with dvpo")
    upstream_failures = sorted(k for k, (_, o) in shipped.items() if o in ("failed", "error"))
    return rows, problems, upstream_failures, calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: a new temp dir)")
    parser.add_argument("--framework", action="append", choices=sorted(UPSTREAM_FILES),
                        help="only these (default: all)")
    parser.add_argument("--no-download", action="store_true", help="use the archives already in WORK/downloads")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="dvpo-upstream-"))
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    frameworks = args.framework or sorted(UPSTREAM_FILES)
    start = time.time()
    summary = ["| framework | upstream test file | as shipped | with dvpo patched in | calls into dvpo |",
               "| --- | --- | --- | --- | --- |"]
    all_problems = []
    for framework in frameworks:
        version, files, results = run_framework(framework, work, args.no_download, args.timeout)
        rows, problems, upstream_failures, calls = compare(framework, version, files, results)
        for file, s, p, n in rows:
            summary.append(f"| {framework} {version} | {file} | {s} | {p} | {n} |")
        if upstream_failures:
            _log(f"{framework}: failing as shipped (upstream's, not counted): " + ", ".join(upstream_failures))
        if calls:
            _log(f"{framework}: dvpo replacements called: "
                 + ", ".join(f"{k} x{v}" for k, v in sorted(calls.get("calls", {}).items())))
        all_problems += [f"{framework}: {p}" for p in problems]
    _log("\n" + "\n".join(summary))
    (work / "summary.md").write_text("\n".join(summary) + "\n")
    _log(f"\nupstream tests: {time.time() - start:.0f} s; work dir {work}")
    if all_problems:
        _log("\nREGRESSIONS with dvpo patched in:\n  " + "\n  ".join(all_problems))
        return 1
    _log("no regressions: every upstream test that passes as shipped passes with dvpo patched in")
    return 0


if __name__ == "__main__":
    sys.exit(main())

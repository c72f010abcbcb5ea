"""Every reference to a project file, in code, tests and docs, points to a file in the repo.

Checked over the files git tracks: relative Markdown links (resolved from the linking file) and
paths spelled in text (`docs/math.md`, `csrc/cpu/kernels.h`, ...; resolved from the repo root, or
from the citing file's folder). Nothing may point outside the project (the design notes the code
was first written against are not part of it).
"""

from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEXT = {".py", ".md", ".h", ".cpp", ".cu", ".cuh", ".sh", ".toml", ".cfg", ".txt", ".yml", ".yaml"}
TOP = ("docs", "csrc", "kernels", "dvpo", "tests", "tools", "bench", ".ci")
PATH = re.compile(r"(?<![\w/.-])((?:%s)/[\w./-]*\w\.(?:md|py|h|cpp|cu|cuh|sh|toml|json|csv|png))(?!\w)" % "|".join(
    re.escape(t) for t in TOP))
LINK = re.compile(r"\]\(([^)\s]+)\)")
OUTSIDE = re.compile(r"DESIGN\.md|PAPER\.md|TRAINER-NOTES\.md|\.\./shared\b")
# Written by the build or at run time, not committed.
GENERATED = {"dvpo/_build_info.py"}
# Paths inside the frameworks' own source trees (verl's and OpenRLHF's tests, which
# tools/upstream_tests.sh runs), and a test that builds fake upstream trees in a temporary folder.
UPSTREAM_PATHS = ("tests/trainer/", "tests/test_loss_aggregation.py")
BUILDS_FAKE_TREES = {"tests/test_integrations_upstream.py"}


def _tracked():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [ROOT / p for p in out.splitlines() if pathlib.Path(p).suffix in TEXT and (ROOT / p).is_file()]


FILES = _tracked() if (ROOT / ".git").exists() else []


def _exists(ref: str, where: pathlib.Path) -> bool:
    ref = ref.split("#")[0].rstrip(".")
    if not ref or ref in GENERATED:
        return True
    if any(ch in ref for ch in "*<>{}$"):  # a pattern or a placeholder, not a file
        return True
    return (ROOT / ref).exists() or (where.parent / ref).exists()


def _lines(path: pathlib.Path):
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        return
    for no, line in enumerate(text.splitlines(), 1):
        yield no, line


@pytest.mark.skipif(not FILES, reason="not a git checkout")
def test_paths_in_text_resolve():
    bad = []
    for path in FILES:
        if str(path.relative_to(ROOT)) in BUILDS_FAKE_TREES:
            continue
        for no, line in _lines(path):
            for ref in PATH.findall(line):
                if not ref.startswith(UPSTREAM_PATHS) and not _exists(ref, path):
                    bad.append(f"{path.relative_to(ROOT)}:{no}: {ref}")
    assert not bad, "references to files that are not in the repo:\n" + "\n".join(bad)


@pytest.mark.skipif(not FILES, reason="not a git checkout")
def test_markdown_links_resolve():
    bad = []
    for path in FILES:
        if path.suffix != ".md":
            continue
        for no, line in _lines(path):
            for ref in LINK.findall(line):
                if re.match(r"[a-z]+:", ref) or ref.startswith("#"):
                    continue
                target = (path.parent / ref.split("#")[0])
                if not target.exists():
                    bad.append(f"{path.relative_to(ROOT)}:{no}: {ref}")
    assert not bad, "Markdown links to files that are not in the repo:\n" + "\n".join(bad)


@pytest.mark.skipif(not FILES, reason="not a git checkout")
def test_nothing_points_outside_the_project():
    here = pathlib.Path(__file__).resolve()
    bad = [f"{p.relative_to(ROOT)}:{no}" for p in FILES if p.resolve() != here
           for no, line in _lines(p) if OUTSIDE.search(line)]
    assert not bad, "references to files outside the project:\n" + "\n".join(bad)

"""The `dvpo` command line and the build's CUDA decision."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from dvpo import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_check_command_passes_on_every_available_backend(capsys):
    assert cli.main(["check", "--shape", "2,5,3,7,9", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "ok" in out and "FAIL" not in out


def test_python_dash_m_entry_point_lists_commands():
    res = subprocess.run([sys.executable, "-m", "dvpo", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    for name in cli.COMMANDS:
        assert name in res.stdout


def _load_setup_helpers():
    """setup.py's decision functions, without running setup() (the module ends in setup(...))."""
    src = open(os.path.join(ROOT, "setup.py")).read()
    head = src.split("\nsetup(\n")[0]
    module = {"__file__": os.path.join(ROOT, "setup.py"), "__name__": "dvpo_setup"}
    exec(compile(head, "setup.py", "exec"), module)
    return module


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-wheel decision")
def test_build_skips_cuda_for_a_cpu_torch_and_says_why(monkeypatch, capsys):
    helpers = _load_setup_helpers()
    assert "CPU build" in helpers["cuda_build_reason"]()
    monkeypatch.delenv("DVPO_BUILD_CUDA", raising=False)
    assert helpers["want_cuda"]() is False
    assert "building without CUDA" in capsys.readouterr().out
    monkeypatch.setenv("DVPO_BUILD_CUDA", "1")
    with pytest.raises(SystemExit, match="DVPO_BUILD_CUDA=1"):
        helpers["want_cuda"]()


def test_gencode_flags_default_and_override(monkeypatch):
    helpers = _load_setup_helpers()
    monkeypatch.delenv("DVPO_CUDA_ARCHS", raising=False)
    flags = helpers["gencode_flags"]()
    assert "-gencode=arch=compute_80,code=sm_80" in flags
    assert "-gencode=arch=compute_90a,code=sm_90a" in flags
    assert "-gencode=arch=compute_80,code=compute_80" in flags  # PTX for newer GPUs
    monkeypatch.setenv("DVPO_CUDA_ARCHS", "90a;100a")
    assert helpers["gencode_flags"]()[-1] == "-gencode=arch=compute_90,code=compute_90"


def test_cpu_extension_is_built_and_registers_its_ops():
    import dvpo._C  # noqa: F401

    assert hasattr(torch.ops.dvpo_C, "quantile_huber")
    assert importlib.util.find_spec("dvpo.kernels") is not None or not os.path.exists(
        os.path.join(ROOT, "kernels", "__init__.py"))

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
    """setup.py's decision functions, without running setup() (the module ends in setup(...)).

    Executing the head makes setup.py's CUDA decision for this machine, which may set CUDA_HOME:
    the environment is restored afterwards."""
    src = open(os.path.join(ROOT, "setup.py")).read()
    head = src.split("\nsetup(\n")[0]
    module = {"__file__": os.path.join(ROOT, "setup.py"), "__name__": "dvpo_setup"}
    saved = dict(os.environ)
    try:
        exec(compile(head, "setup.py", "exec"), module)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return module


def _fake_toolkit(tmp_path, release="13.0", headers=True, runtime=True):
    """A CUDA toolkit dir with an nvcc that answers --version and --dryrun like the real one, and a
    wrapper script elsewhere on PATH (`exec <toolkit>/bin/nvcc "$@"`), as some machines install it."""
    kit = tmp_path / f"cuda-{release}"
    (kit / "bin").mkdir(parents=True)
    (kit / "include").mkdir()
    (kit / "lib64").mkdir()
    nvcc = kit / "bin" / "nvcc"
    nvcc.write_text(
        "#!/bin/sh\n"
        f'case "$*" in *--dryrun*) echo "#$ TOP={kit}/bin/.." >&2 ;; '
        f'*--version*) echo "Cuda compilation tools, release {release}, V{release}.1" ;; esac\n')
    nvcc.chmod(0o755)
    if headers:
        (kit / "include" / "cuda_runtime.h").write_text("// fake\n")
    if runtime:
        (kit / "lib64" / "libcudart.so").write_text("")
    wrap = tmp_path / "wrapbin"
    wrap.mkdir()
    (wrap / "nvcc").write_text(f'#!/bin/sh\nexec {nvcc} "$@"\n')
    (wrap / "nvcc").chmod(0o755)
    return kit, wrap


@pytest.fixture
def cuda_torch(monkeypatch, tmp_path):
    """setup.py's helpers as if torch were a CUDA 13.0 build, seeing only a fake toolkit."""
    helpers = _load_setup_helpers()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    for var in ("CUDA_HOME", "CUDA_PATH", "DVPO_BUILD_CUDA"):
        monkeypatch.delenv(var, raising=False)
    helpers["_wheel_cuda_dirs"] = lambda major: []  # torch's CUDA wheels, where installed, would answer
    real = helpers["_nvcc_candidates"]
    # only the nvcc on PATH: the machine's own /usr/local/cuda* would otherwise be found too
    helpers["_nvcc_candidates"] = lambda: [p for p in real() if str(tmp_path) in p]
    return helpers


def test_build_skips_cuda_for_a_cpu_torch_and_says_why(monkeypatch):
    helpers = _load_setup_helpers()
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.delenv("DVPO_BUILD_CUDA", raising=False)
    _info, reason = helpers["find_cuda"]()
    assert "CPU build" in reason
    build, mode, why, _chain = helpers["cuda_decision"]()
    assert (build, mode) == (False, "auto") and "CPU build" in why
    monkeypatch.setenv("DVPO_BUILD_CUDA", "1")
    with pytest.raises(SystemExit, match="DVPO_BUILD_CUDA=1 but the CUDA extension cannot be built"):
        helpers["cuda_decision"]()
    monkeypatch.setenv("DVPO_BUILD_CUDA", "0")
    assert helpers["cuda_decision"]()[:2] == (False, "off")
    monkeypatch.setenv("DVPO_BUILD_CUDA", "yes")
    with pytest.raises(SystemExit, match="DVPO_BUILD_CUDA must be 0, 1 or unset"):
        helpers["cuda_decision"]()


def test_cuda_toolkit_found_through_a_wrapper_script(cuda_torch, monkeypatch, tmp_path):
    kit, wrap = _fake_toolkit(tmp_path)
    monkeypatch.setenv("PATH", f"{wrap}{os.pathsep}{os.environ['PATH']}")
    info, reason = cuda_torch["find_cuda"]()
    assert reason is None, reason
    # the toolkit nvcc's dry run names, not the wrapper's directory (which has no include/)
    assert info["cuda_home"] == os.path.realpath(kit)
    assert info["include"] == str(kit / "include") and info["libdir"] == str(kit / "lib64")
    assert info["nvcc"] == str(wrap / "nvcc") and info["nvcc_major"] == 13
    assert cuda_torch["cuda_decision"]()[:3] == (True, "auto", "CUDA toolchain found")


@pytest.mark.parametrize("release, headers, runtime, expect", [
    ("12.8", True, True, "no nvcc of CUDA 13.x"),
    ("13.0", False, True, "cuda_runtime.h not found"),
    ("13.0", True, False, "libcudart.so not found"),
])
def test_cuda_decision_checks_instead_of_assuming(cuda_torch, monkeypatch, tmp_path, release, headers,
                                                  runtime, expect):
    _kit, wrap = _fake_toolkit(tmp_path, release, headers, runtime)
    monkeypatch.setenv("PATH", f"{wrap}{os.pathsep}{os.environ['PATH']}")
    _info, reason = cuda_torch["find_cuda"]()
    assert reason is not None and expect in reason
    build, mode, why, _ = cuda_torch["cuda_decision"]()
    assert (build, mode) == (False, "auto") and expect in why
    monkeypatch.setenv("DVPO_BUILD_CUDA", "1")
    with pytest.raises(SystemExit, match=expect):
        cuda_torch["cuda_decision"]()


def test_cuda_decision_without_any_nvcc(cuda_torch, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    _info, reason = cuda_torch["find_cuda"]()
    assert "no nvcc found" in reason


def test_no_cpp_standard_is_forced(monkeypatch):
    """torch's extension builder adds the standard its headers need (c++20 for torch >= 2.13): a
    forced -std=c++17 broke every build against torch 2.14."""
    helpers = _load_setup_helpers()
    for ext in helpers["extensions"]():
        args = ext.extra_compile_args
        flags = args if isinstance(args, list) else [f for v in args.values() for f in v]
        assert not [f for f in flags if f.startswith("-std")], (ext.name, flags)


def test_build_record_and_info_command(capsys):
    """The build wrote dvpo/_build_info.py; `dvpo info` and the backend status lines read it."""
    from dvpo import build_info, dispatch

    info = build_info.build()
    assert "cuda_reason" in info and info.get("torch") == torch.__version__, info
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "build: CUDA extension" in out and "CPU ISA in use" in out
    for name in dispatch.BACKENDS:
        assert name in out
    if not info["cuda_built"]:
        assert dispatch.backends()["cuda"] == f"not built: {info['cuda_reason']}"
        assert "ImportError" not in out


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

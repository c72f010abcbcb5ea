"""The public ops' dispatch (dvpo.ops, dvpo.dispatch), which no backend changes: the backend listing,
forcing a backend (DVPO_BACKEND, dispatch.use_backend) and the automatic choice on CPU. Each op's
contract, on every backend, is in tests/test_<op>.py (tests/backends.py lists the backends)."""

import types

import pytest
import torch

from dvpo import dispatch, ops
from dvpo.backends import reference as library_ref
from dvpo.dispatch import use_backend

from .utils import randn

CPU_BACKENDS = [b for b in ("reference", "cpp") if dispatch.backends("cpu")[b] == "available"]


def test_backends_listing_and_forcing(monkeypatch):
    listing = ops.backends()
    assert set(listing) == {"cuda", "triton", "cpp", "reference"}
    assert listing["reference"] == "available"
    assert "not" in ops.backends("cpu")["cuda"]
    monkeypatch.setenv("DVPO_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        ops.cvar(randn((3, 4)), 0.5)
    monkeypatch.setenv("DVPO_BACKEND", "quantum")
    with pytest.raises(ValueError, match="DVPO_BACKEND"):
        ops.cvar(randn((3, 4)), 0.5)


def test_use_backend_forces_and_restores(monkeypatch):
    monkeypatch.delenv("DVPO_BACKEND", raising=False)
    with use_backend("reference"):
        assert dispatch.selected_name("cvar", "cpu") == "reference"
        with use_backend(None):
            assert dispatch.forced() is None
        assert dispatch.forced() == "reference"
    assert dispatch.forced() is None
    with pytest.raises(ValueError, match="backend"):
        with use_backend("quantum"):
            pass


def test_automatic_dispatch_prefers_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv("DVPO_BACKEND", raising=False)
    expected = "cpp" if "cpp" in CPU_BACKENDS else "reference"
    assert dispatch.selected_name("quantile_huber", "cpu") == expected


def test_substitute_runs_a_module_as_a_backend(monkeypatch):
    """dispatch.substitute: a module stands in for a backend on the given device types (the tests run
    the CUDA emulation as `cuda` this way), and the real state comes back on exit."""
    monkeypatch.delenv("DVPO_BACKEND", raising=False)
    calls = []
    fake = types.SimpleNamespace(cvar=lambda x, level, upper: calls.append(level) or library_ref.cvar(x, level, upper))
    before = dispatch.backends("cpu")["cuda"]
    with dispatch.substitute("cuda", fake, devices=("cpu",)):
        assert dispatch.backends("cpu")["cuda"] == "available"
        assert dispatch.selected_name("cvar", "cpu") == "cuda"      # first in the order, and runs CPU now
        assert dispatch.selected_name("critic_loss", "cpu") == "cpp"  # the substitute lacks this op
        ops.cvar(torch.randn(3, 4), 0.5)
        with use_backend("cuda"), pytest.raises(RuntimeError, match="does not implement dvpo.critic_loss"):
            ops.critic_loss(torch.randn(3, 4), torch.randn(3, 5))
    assert calls == [0.5]
    assert dispatch.backends("cpu")["cuda"] == before
    with pytest.raises(ValueError, match="backend must be one of"):
        with dispatch.substitute("tpu", fake):
            pass

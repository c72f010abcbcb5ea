"""The public ops' dispatch (dvpo.ops, dvpo.dispatch), which no backend changes: the backend listing,
forcing a backend (DVPO_BACKEND, dispatch.use_backend) and the automatic choice on CPU. Each op's
contract, on every backend, is in tests/test_<op>.py (tests/backends.py lists the backends)."""

import pytest

from dvpo import dispatch, ops
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

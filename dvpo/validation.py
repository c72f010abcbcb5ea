"""Input checks for the public ops: every failure is a ValueError naming the argument and what was
expected. Only shapes, dtypes, devices and Python scalars are checked (no data-dependent checks),
so the checks cost nothing on the GPU and trace cleanly under torch.compile."""

from __future__ import annotations

import math

import torch

from .config import ALGORITHMS, REDUCTIONS


def tensor(name, t, *, min_dim=1):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor (fp32, bf16, fp16 or fp64), got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dim(s), got shape {tuple(t.shape)}")
    if t.shape[-1] < 1:
        raise ValueError(f"{name} must have a non-empty last dim, got shape {tuple(t.shape)}")


def same_device_dtype(ref_name, ref, name, t):
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}; "
                         f"cast it with .to({ref_name}.dtype)")


def leading(name, t, lead, what):
    if tuple(t.shape[:len(lead)]) != tuple(lead) or t.dim() < len(lead):
        raise ValueError(f"{name} must have leading dims {tuple(lead)} ({what}), got shape {tuple(t.shape)}")


def vector(name, t, n, device):
    """A per-quantile vector such as taus or weights: shape [n], floating, on `device`."""
    tensor(name, t)
    if tuple(t.shape) != (n,):
        raise ValueError(f"{name} must have shape [{n}] (one entry per quantile of pred), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def mask(m, lead, device):
    if m is None:
        return
    if not isinstance(m, torch.Tensor):
        raise ValueError(f"mask must be a torch.Tensor or None, got {type(m).__name__}")
    if m.dtype != torch.bool and not m.is_floating_point():
        raise ValueError(f"mask must be a bool or floating-point tensor (1 = real token), got {m.dtype}")
    if tuple(m.shape) != tuple(lead):
        raise ValueError(f"mask must have shape {tuple(lead)} (the leading dims), got {tuple(m.shape)}")
    if m.device != device:
        raise ValueError(f"mask must be on {device}, got {m.device}")


def positive(name, x):
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {x!r}")


def finite(name, x):
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {x!r}")


def level(name, x):
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 < x <= 1.0:
        raise ValueError(f"{name} must be a level in (0, 1], got {x!r}")


def unit_interval(name, x):
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 <= x <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {x!r}")


def reduction(r):
    if r not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {r!r}")


def algorithm(a):
    if a not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}; got {a!r}")

"""Patches dvpo's drop-ins into verl and OpenRLHF, for running the frameworks' own test files.

tools/upstream_tests.sh (tests/upstream/run_upstream.py) copies this file as `conftest.py` into the
root of the *patched* copy of the upstream tests it fetched from PyPI; the as-shipped copy has no such
conftest. It is not a conftest here (dvpo's own suite never loads it).

What is patched, all at N = 1 with `mse_config()` (the exact scalar value loss):

* verl: `dvpo.integrations.verl.patch_verl(config=mse_config())`, the plugin's own patch
  (`core_algos.compute_gae_advantage_return` and its `ADV_ESTIMATOR_REGISTRY` entry,
  `core_algos.compute_value_loss`, `workers.utils.losses.compute_value_loss` / `value_loss`,
  `metric_utils.compute_data_metrics`), plus `agg_loss` (in `core_algos` and `workers.utils.losses`)
  by `dvpo.integrations.verl.agg_loss`. This runs when the conftest is imported, i.e. before pytest
  imports any test module, so `from verl... import compute_value_loss` in a test binds dvpo's.
* OpenRLHF: its tests load `openrlhf/models/loss.py` by file path during collection, so after
  collection every loaded copy of that module gets `aggregate_loss` = dvpo's
  `dvpo.integrations.openrlhf.aggregate_loss` and `ValueLoss` = dvpo's (with `mse_config()`), and
  every test module's global names bound to the originals are rebound to dvpo's.

Every replacement counts its calls. With `DVPO_UPSTREAM_REPORT=path.json` the counts (per
replacement and per test file) are written there at the end of the session, so the runner can check
that each upstream file really ran dvpo's code (a patched run that never calls dvpo proves nothing).
"""

import collections
import functools
import json
import os
import sys

import pytest

from dvpo.integrations import mse_config

_CALLS = collections.Counter()              # replacement name -> calls
_FILE_CALLS = collections.Counter()         # test file -> calls into any replacement
_PATCHED = []                               # "where: what" lines, for the report and the header
_CURRENT = {"file": None}


def _counted(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _CALLS[name] += 1
        if _CURRENT["file"] is not None:
            _FILE_CALLS[_CURRENT["file"]] += 1
        return fn(*args, **kwargs)

    return wrapper


# ------------------------------------------------------------------------------------------- verl

def _patch_verl():
    try:
        import verl.trainer.ppo.core_algos as core_algos
        import verl.workers.utils.losses as losses
    except ImportError:
        return
    from dvpo.integrations import verl as dvpo_verl

    dvpo_verl.patch_verl(config=mse_config())
    # patch_verl leaves verl's agg_loss alone (its policy losses use it too); dvpo's is a drop-in
    for module in (core_algos, losses):
        dvpo_verl._PATCHED.append((module, "agg_loss", module.agg_loss, False))
        module.agg_loss = dvpo_verl.agg_loss
    # wrap everything patch_verl (and the lines above) installed in a call counter
    for container, key, _original, is_item in dvpo_verl._PATCHED:
        current = container[key] if is_item else getattr(container, key)
        name = f"verl:{getattr(current, '__name__', key)}"
        where = (f"{getattr(container, '__name__', 'ADV_ESTIMATOR_REGISTRY')}[{key!r}]" if is_item
                 else f"{container.__name__}.{key}")
        wrapped = _counted(name, current)
        if is_item:
            container[key] = wrapped
        else:
            setattr(container, key, wrapped)
        _PATCHED.append(f"{where} -> dvpo ({name})")


_patch_verl()


# --------------------------------------------------------------------------------------- OpenRLHF

def _openrlhf_replacements():
    from dvpo.integrations import openrlhf as dvpo_openrlhf

    class ValueLoss(dvpo_openrlhf.ValueLoss):
        """dvpo's ValueLoss with OpenRLHF's constructor and the exact MSE config."""

        def __init__(self, clip_eps=None, token_level_loss=True):
            super().__init__(clip_eps, token_level_loss, config=mse_config())

        def forward(self, *args, **kwargs):
            _CALLS["openrlhf:ValueLoss"] += 1
            if _CURRENT["file"] is not None:
                _FILE_CALLS[_CURRENT["file"]] += 1
            return super().forward(*args, **kwargs)

    return {"aggregate_loss": _counted("openrlhf:aggregate_loss", dvpo_openrlhf.aggregate_loss),
            "ValueLoss": ValueLoss}


def _is_openrlhf_loss_module(module):
    path = getattr(module, "__file__", None) or ""
    return path.replace(os.sep, "/").endswith("openrlhf/models/loss.py")


def _patch_openrlhf(session_modules):
    loss_modules = [m for m in list(sys.modules.values()) if _is_openrlhf_loss_module(m)]
    if not loss_modules:
        return
    replacements = _openrlhf_replacements()
    originals = {}
    for module in loss_modules:
        for name, new in replacements.items():
            old = getattr(module, name, None)
            if old is None:
                continue
            originals[id(old)] = new
            setattr(module, name, new)
            _PATCHED.append(f"{module.__name__}.{name} -> dvpo")
    # test modules that bound the originals at import (`aggregate_loss = _loss_module.aggregate_loss`)
    for module in session_modules:
        for name, value in list(vars(module).items()):
            if id(value) in originals:
                setattr(module, name, originals[id(value)])
                _PATCHED.append(f"{module.__name__}.{name} -> dvpo")


# ------------------------------------------------------------------------------------------ hooks

def pytest_collection_modifyitems(session, config, items):
    modules = {id(item.module): item.module for item in items if getattr(item, "module", None) is not None}
    _patch_openrlhf(list(modules.values()))


def pytest_report_header(config):
    return ["dvpo patched in (N = 1, mse_config()):"] + [f"  {line}" for line in _PATCHED]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _CURRENT["file"] = item.nodeid.split("::")[0]
    yield
    _CURRENT["file"] = None


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("DVPO_UPSTREAM_REPORT")
    if not path:
        return
    with open(path, "w") as f:
        json.dump({"patched": _PATCHED, "calls": dict(_CALLS), "file_calls": dict(_FILE_CALLS)}, f, indent=1)

"""Checkpoints without pickle: weights and optimizer tensors in safetensors, everything else
(step, counters, RNG states, vote labels) in JSON. A checkpoint is written to a temporary dir and
renamed into place, so an interrupted save never leaves a half-written `ckpt/`."""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from typing import Dict

import torch


# ---- RNG states ----------------------------------------------------------------------------------

def generator_state(g: torch.Generator) -> str:
    return base64.b64encode(g.get_state().numpy().tobytes()).decode("ascii")


def set_generator_state(g: torch.Generator, text: str):
    raw = base64.b64decode(text.encode("ascii"))
    g.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone())


def python_random_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_python_random_state(rng: random.Random, state: list):
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))


def global_rng_states() -> Dict:
    out = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
           "python": python_random_state(random)}  # the module-level generator
    if torch.cuda.is_available():
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode("ascii") for s in torch.cuda.get_rng_state_all()]
    return out


def set_global_rng_states(states: Dict):
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(states["torch"])), dtype=torch.uint8).clone())
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()
                                      for s in states["cuda"]])


# ---- optimizers ------------------------------------------------------------------------------------

def optimizer_tensors(name: str, opt: torch.optim.Optimizer):
    """(tensors for safetensors, JSON-able rest) of an optimizer's state_dict."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{name}.{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(name: str, opt: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor], meta: Dict):
    state: Dict[int, Dict] = {}
    prefix = name + "."
    for key, v in tensors.items():
        if key.startswith(prefix):
            pid, k = key[len(prefix):].split(".", 1)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ---- files ------------------------------------------------------------------------------------------

def write_json(path: str, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def begin(path: str) -> str:
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit(tmp: str, path: str):
    old = path + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)

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


# ---- a trainer's checkpoint ------------------------------------------------------------------------

def save_trainer(tr):
    """Rank 0 writes `OUT/ckpt` of the `Trainer` `tr` (every rank calls this: the vote labels are
    gathered): the policy (HF safetensors + tokenizer), the critic, the optimizers' tensors, and in
    state.json the step, counters, every generator's state and the vote labels."""
    from safetensors.torch import save_file

    from .models import save_critic

    votes = dict(tr.votes)
    if tr.dist.enabled:
        for part in tr.dist.gather_objects(tr.votes):
            votes.update(part)
    if not tr.dist.is_main:
        return
    path = os.path.join(tr.out, "ckpt")
    tmp = begin(path)
    tr.policy.save_pretrained(os.path.join(tmp, "policy"))
    tr.tok.save_pretrained(os.path.join(tmp, "policy"))
    if tr.critic is not None:
        save_critic(tr.critic, os.path.join(tmp, "critic"))
    tensors, opt_meta = optimizer_tensors("policy", tr.opt)
    meta = {"policy": opt_meta}
    if tr.critic_opt is not None:
        t2, m2 = optimizer_tensors("critic", tr.critic_opt)
        tensors.update(t2)
        meta["critic"] = m2
    save_file(tensors, os.path.join(tmp, "optim.safetensors"))
    state = {
        "step": tr.step, "bad_streak": tr.bad_streak, "init_dir": tr.init_dir,
        "optimizers": meta,
        "rng": {"sample": generator_state(tr.g_sample), "vote": generator_state(tr.g_vote),
                "shuffle": generator_state(tr.g_shuffle), "noise": generator_state(tr.g_noise),
                "prompts": python_random_state(tr.prompt_rng), "global": global_rng_states()},
        "votes": [[k, list(v) if v is not None else None] for k, v in votes.items()],
    }
    write_json(os.path.join(tmp, "state.json"), state)
    commit(tmp, path)


def load_trainer(tr, path: str):
    """Restore what `save_trainer` wrote into the set-up `Trainer` `tr` (its models are loaded already)."""
    from safetensors.torch import load_file

    from .models import load_critic_into

    state = read_json(os.path.join(path, "state.json"))
    if tr.critic is not None:
        load_critic_into(tr.critic, os.path.join(path, "critic"))
    tensors = load_file(os.path.join(path, "optim.safetensors"), device=str(tr.device))
    load_optimizer("policy", tr.opt, tensors, state["optimizers"]["policy"])
    if tr.critic_opt is not None:
        load_optimizer("critic", tr.critic_opt, tensors, state["optimizers"]["critic"])
    rng = state["rng"]
    set_generator_state(tr.g_sample, rng["sample"])
    set_generator_state(tr.g_vote, rng["vote"])
    set_generator_state(tr.g_shuffle, rng["shuffle"])
    set_generator_state(tr.g_noise, rng["noise"])
    set_python_random_state(tr.prompt_rng, rng["prompts"])
    set_global_rng_states(rng["global"])
    tr.votes = {k: (tuple(v) if v is not None else None) for k, v in state["votes"]}
    tr.step = state["step"]
    tr.bad_streak = state["bad_streak"]

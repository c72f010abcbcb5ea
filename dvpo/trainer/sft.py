"""SFT warm-up: teacher forcing on the task's SFT set until a target accuracy, cached by
(task, model config, SFT hyper-parameters, seed) so every run of a grid starts from the same policy."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import time

import torch

from .config import SFTConfig, to_dict


def _stderr(msg):
    print(msg, file=sys.stderr, flush=True)


def cache_root(cfg: SFTConfig) -> str:
    return cfg.sft_cache or os.environ.get("DVPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dvpo")


def sft_dir(cfg: SFTConfig) -> str:
    """Where the SFT checkpoint for this config lives (its cache entry, or cfg.out)."""
    if cfg.out:
        return cfg.out
    key = cfg.sft_key()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{cfg.task}-s{key['seed']}-{digest}")
    return os.path.join(cache_root(cfg), "sft", name)


def sft(cfg: SFTConfig, *, force: bool = False, log=None) -> str:
    """Train (or find in the cache) the SFT warm start; returns its checkpoint dir (a Hugging Face
    model + tokenizer dir, with `sft.json` describing it)."""
    log = _stderr if log is None else (log or (lambda *a: None))   # False: silent
    path = sft_dir(cfg)
    if not force and os.path.exists(os.path.join(path, "sft.json")):
        return path
    from dvpo.tasks import get_task

    from dvpo.masked import masked_mean
    from .evaluate import evaluate
    from .models import autocast, build_policy, pick_device
    from .rollout import encode_prompts, encode_responses, score

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed = cfg.seed if cfg.sft_seed is None else cfg.sft_seed
    device = pick_device(cfg.device)
    task = get_task(cfg.task)
    torch.manual_seed(seed)
    model, tok = build_policy(cfg, task, device)
    rng = random.Random(f"sft:{seed}")
    val = task.validation_set(256)
    target = task.sft_target if cfg.sft_target_acc is None else cfg.sft_target_acc
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.sft_warmup)))
    history, acc, step = [], 0.0, 0
    t0 = time.time()
    from tqdm.auto import tqdm

    bar = tqdm(range(1, cfg.sft_steps + 1), desc=f"sft {cfg.task}", disable=not cfg.progress, leave=False)
    for step in bar:
        pairs = [task.sft_example(rng) for _ in range(cfg.sft_batch)]
        p_ids, p_mask = encode_prompts(tok, [p for p, _ in pairs], device)
        r_ids, r_mask = encode_responses(tok, [r for _, r in pairs], device)
        with autocast(device):
            logp, _, _ = score(model, p_ids, p_mask, r_ids, r_mask)
        loss = -masked_mean(logp, r_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % cfg.sft_eval_every == 0 or step == cfg.sft_steps:
            with autocast(device):
                acc = evaluate(model, tok, task, val, task.max_new_tokens)["heldout_acc"]
            history.append({"step": step, "loss": float(loss.detach()), "val_acc": acc})
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", val_acc=f"{acc:.2f}")
            if acc >= target:
                break
    bar.close()
    tmp = path + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    meta = {"key": cfg.sft_key(), "config": to_dict(cfg), "steps": step, "val_acc": acc,
            "seconds": time.time() - t0, "history": history, "task": task.describe()}
    with open(os.path.join(tmp, "sft.json"), "w") as f:
        json.dump(meta, f, indent=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if force and os.path.exists(path):
        shutil.rmtree(path)
    try:
        os.rename(tmp, path)
    except OSError:                    # another process finished the same SFT first: keep its copy
        if not os.path.exists(os.path.join(path, "sft.json")):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"SFT warm start: {step} steps, validation accuracy {acc:.3f}, {time.time() - t0:.1f} s -> {path}")
    return path

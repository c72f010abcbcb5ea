"""Policy and critic models: any Hugging Face causal LM as the policy (a tiny Llama- or
Qwen2-style config built offline by default), and a critic made of a backbone (its own copy of the
policy trunk, or the policy's trunk itself with `shared_critic`) plus H linear heads of N outputs
(`[B, T, H, N]`: N quantiles each for DVPO, N = 1 scalar values for PPO and robust PPO)."""

from __future__ import annotations

import copy
import json
import os
from typing import Optional

import torch
from torch import nn


def pick_device(name: str = "auto") -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cache_kwarg(model) -> str:
    """The name under which this model's forward takes a KV cache: `cache` in recent transformers
    5.x, `past_key_values` before (5.17 and 4.x). Both forwards take **kwargs, so passing the wrong
    name is silently ignored and every decoding step would see only its new token."""
    import inspect

    fwd = getattr(model, "module", model).forward  # DDP-wrapped models too
    try:
        params = inspect.signature(fwd).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def attn_implementation(device: torch.device, requested: str = "auto", bf16: bool = True) -> str:
    """flash_attention_2 on a GPU when flash-attn is importable (and the forward passes run under bf16
    autocast, which it needs), else SDPA (also on CPU)."""
    if requested not in (None, "", "auto"):
        return requested
    if device.type == "cuda" and bf16:
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except Exception:
            pass
    return "sdpa"


def autocast(device: torch.device, bf16: bool = True):
    """bf16 autocast on a GPU; nothing on CPU (bf16 gives no speed-up there)."""
    import contextlib

    if device.type == "cuda" and bf16:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def tiny_config(arch: str, vocab_size: int, hidden: int, layers: int, heads: int, ffn: int,
                max_positions: int, bos_id: int, eos_id: int, pad_id: int):
    """A small random-init model config (tied embeddings), Llama- or Qwen2-style."""
    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=ffn,
                  max_position_embeddings=max_positions, tie_word_embeddings=True,
                  bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
                  attention_dropout=0.0)
    if arch == "llama":
        from transformers import LlamaConfig
        return LlamaConfig(**common)
    if arch == "qwen2":
        from transformers import Qwen2Config
        return Qwen2Config(**common)
    raise ValueError(f"arch must be llama or qwen2, got {arch!r}")


def build_policy(cfg, task, device: torch.device):
    """(policy, tokenizer): from `cfg.model` (a local HF checkpoint with its tokenizer) or a tiny
    config for the task's character tokenizer. Random init uses the current torch seed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    attn = attn_implementation(device, cfg.attn, getattr(cfg, "bf16", True))
    if cfg.model:
        tok = AutoTokenizer.from_pretrained(cfg.model)
        model = AutoModelForCausalLM.from_pretrained(cfg.model, attn_implementation=attn, dtype=torch.float32)
    else:
        from dvpo.tasks import tokenizer_for
        tok = tokenizer_for(task)
        mc = tiny_config(cfg.arch, len(tok), cfg.hidden, cfg.layers, cfg.heads, cfg.ffn, cfg.max_positions,
                         tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        model = AutoModelForCausalLM.from_config(mc, attn_implementation=attn, dtype=torch.float32)
    prepare_tokenizer(tok)
    model.to(device)
    model.eval()            # no dropout in RL: sampling and updates see the same function
    return model, tok


def prepare_tokenizer(tok):
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: responses could not end")
    return tok


def load_policy(path: str, device: torch.device, attn: str = "auto", bf16: bool = True):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation(device, attn, bf16),
                                                 dtype=torch.float32)
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(path))
    model.to(device)
    model.eval()
    return model, tok


def trunk(policy) -> nn.Module:
    """The policy's transformer without the LM head (e.g. `LlamaForCausalLM.model`)."""
    return policy.base_model


class Critic(nn.Module):
    """Backbone + H linear heads of N outputs each. With `backbone=None` (shared critic) the caller
    passes the policy's last hidden states to `heads_from_hidden`."""

    def __init__(self, hidden_size: int, n_heads: int, n_out: int, backbone: Optional[nn.Module] = None,
                 init_std: float = 0.002):
        super().__init__()
        self.backbone = backbone
        self.n_heads, self.n_out, self.hidden_size = n_heads, n_out, hidden_size
        self.heads = nn.Linear(hidden_size, n_heads * n_out)
        nn.init.normal_(self.heads.weight, std=init_std)
        nn.init.zeros_(self.heads.bias)

    def heads_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.heads(hidden.float())
        return out.view(*hidden.shape[:-1], self.n_heads, self.n_out)

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        if self.backbone is None:
            raise RuntimeError("a shared critic has no backbone: use heads_from_hidden")
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        return self.heads_from_hidden(h)

    def meta(self) -> dict:
        return {"hidden_size": self.hidden_size, "n_heads": self.n_heads, "n_out": self.n_out,
                "shared": self.backbone is None}


def build_critic(policy, n_heads: int, n_out: int, shared: bool, seed: int) -> Critic:
    """A critic whose backbone is a copy of the policy's trunk (initialised from it), or shared.
    The heads are initialised from `seed` (torch's global generator is left untouched)."""
    hidden = policy.config.get_text_config().hidden_size if hasattr(policy.config, "get_text_config") \
        else policy.config.hidden_size
    backbone = None if shared else copy.deepcopy(trunk(policy))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        critic = Critic(hidden, n_heads, n_out, backbone)
    return critic.to(next(policy.parameters()).device)


def save_critic(critic: Critic, path: str):
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in critic.state_dict().items()}
    save_file(state, os.path.join(path, "critic.safetensors"))
    with open(os.path.join(path, "critic.json"), "w") as f:
        json.dump(critic.meta(), f)


def load_critic_into(critic: Critic, path: str):
    from safetensors.torch import load_file

    state = load_file(os.path.join(path, "critic.safetensors"), device=str(next(critic.parameters()).device))
    critic.load_state_dict(state)
    return critic

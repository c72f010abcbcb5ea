"""Configuration dataclasses of the trainer (cheap to import: no transformers here).

`TrainConfig` is the whole experiment: `dvpo.trainer.train(TrainConfig(...))` runs it and the
`dvpo train` command line is generated from its fields (``--field-name``), so both stay in sync.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Optional

from .algorithms import ALGOS

def _loss_defaults():
    # dvpo.config imports torch only for a type: cheap enough here
    from dvpo.config import CriticLossConfig
    return CriticLossConfig()


_LOSS = _loss_defaults()


def _f(default, help_text, **kw):
    return dataclasses.field(default=default, metadata={"help": help_text, **kw})


@dataclasses.dataclass
class ModelFields:
    model: Optional[str] = _f(None, "local Hugging Face checkpoint dir (model + tokenizer) instead of the tiny config")
    arch: str = _f("llama", "tiny config style: llama or qwen2", choices=("llama", "qwen2"))
    hidden: int = _f(64, "tiny config: hidden size")
    layers: int = _f(2, "tiny config: layers")
    heads: int = _f(4, "tiny config: attention heads")
    ffn: int = _f(256, "tiny config: FFN size")
    max_positions: int = _f(128, "tiny config: max positions")
    attn: str = _f("auto", "attention implementation (auto: flash_attention_2 on GPU if installed, else sdpa)")
    device: str = _f("auto", "cpu, cuda or auto")
    threads: int = _f(0, "torch.set_num_threads (0: leave torch's default)")


@dataclasses.dataclass
class SFTFields:
    sft_steps: int = _f(1500, "SFT warm-up: at most this many steps")
    sft_target_acc: Optional[float] = _f(None, "SFT warm-up: stop once greedy accuracy on a train-split validation set "
                                               "reaches this (default: the task's, e.g. 0.35 for math)")
    sft_lr: float = _f(3e-3, "SFT warm-up: AdamW learning rate")
    sft_batch: int = _f(128, "SFT warm-up: batch size")
    sft_warmup: int = _f(50, "SFT warm-up: linear LR warm-up steps")
    sft_eval_every: int = _f(10, "SFT warm-up: validation every this many steps")
    sft_seed: Optional[int] = _f(None, "seed of the SFT warm start (default: the run's seed)")
    sft_cache: Optional[str] = _f(None, "SFT checkpoint cache dir (default $DVPO_CACHE or ~/.cache/dvpo)")


@dataclasses.dataclass
class SFTConfig(ModelFields, SFTFields):
    task: str = _f("math", "task: math, science or dialogue (name[:levels], e.g. math:1-5)")
    seed: int = _f(0, "random seed")
    out: Optional[str] = _f(None, "write the SFT checkpoint here (default: the cache)")
    progress: bool = _f(True, "tqdm progress bars")

    def sft_key(self) -> dict:
        """What determines the SFT checkpoint (its cache key)."""
        names = [f.name for f in dataclasses.fields(ModelFields) if f.name not in ("device", "threads")]
        names += [f.name for f in dataclasses.fields(SFTFields) if f.name not in ("sft_seed", "sft_cache")]
        key = {n: getattr(self, n) for n in names}
        key.update(task=self.task, seed=self.seed if self.sft_seed is None else self.sft_seed, version=1)
        return key


@dataclasses.dataclass
class TrainConfig(SFTConfig):
    algo: str = _f("dvpo", "the RL algorithm: " + ", ".join(ALGOS) + " (dvpo/trainer/algorithms/)", choices=ALGOS)
    noise: str = _f("none", "reward noise: none, flip:P, gauss:S, rm:ACC, missing:P, vote:K (chain with +)")
    steps: int = _f(200, "RL steps")
    out: Optional[str] = _f(None, "run directory (metrics.jsonl, plots, checkpoints)")
    resume: bool = _f(False, "continue the run in --out from its last checkpoint")
    init: Optional[str] = _f(None, "start from this policy checkpoint dir instead of the SFT warm start")
    # sampling
    prompts_per_step: int = _f(32, "prompts per step")
    group_size: int = _f(8, "samples per prompt (G)")
    temperature: float = _f(1.0, "sampling temperature")
    max_new_tokens: int = _f(0, "response length cap (0: the task's)")
    # optimisation
    ppo_epochs: int = _f(2, "passes over each batch")
    minibatches: int = _f(1, "minibatches per epoch")
    clip_eps: float = _f(0.2, "PPO ratio clip")
    cliprange_value: float = _f(0.5, "value clip (per quantile for DVPO; 0: off)")
    policy_lr: float = _f(3e-4, "policy AdamW learning rate")
    critic_lr: float = _f(1e-3, "critic AdamW learning rate (separate critic)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    grad_clip: float = _f(1.0, "gradient norm clip (0: off)")
    kl_coef: float = _f(0.001, "KL-to-reference coefficient (in the reward; a k3 loss for grpo)")
    entropy_coef: float = _f(0.0, "entropy bonus")
    vf_coef: float = _f(0.5, "critic loss weight when the critic shares the policy trunk")
    gamma: float = _f(1.0, "discount")
    lam: float = _f(0.95, "GAE lambda")
    bf16: bool = _f(True, "bf16 autocast on a GPU (CPU always runs fp32)")
    # critic
    shared_critic: bool = _f(False, "critic heads on the policy trunk instead of a separate copy")
    n_heads: int = _f(3, "critic heads H (dvpo: quantile heads; robust-ppo: scalar critics)")
    n_quantiles: int = _f(32, "quantiles per head N (dvpo; the paper uses 200)")
    taus: str = _f("midpoint", "quantile grid: midpoint (2i-1)/2N or paper i/N", choices=("midpoint", "paper"))
    advantage: str = _f("mean", "dvpo actor advantage: mean over quantiles, cvar:ALPHA (lower CVaR over "
                        "quantiles) or trim:ALPHA (negative side floored at the critic's ALPHA-quantile)")
    grpo_scale: bool = _f(True, "grpo: divide by the group std (off: Dr. GRPO)")
    # critic loss: defaults are dvpo.CriticLossConfig's (docs/math.md; --tail-targets recipe and --kappa 1
    # --no-normalize-kappa with every --loss-* at 1 give the published recipe)
    kappa: float = _f(_LOSS.kappa, "critic loss: Huber kappa")
    alpha: float = _f(_LOSS.alpha, "critic loss: lower-tail level alpha")
    beta: float = _f(_LOSS.beta, "critic loss: upper-tail level beta")
    risk_gamma: float = _f(_LOSS.risk_gamma, "critic loss: risk weight exponent gamma")
    normalize_kappa: bool = _f(_LOSS.normalize_kappa, "critic loss: divide the Huber loss by kappa")
    tail_targets: str = _f(_LOSS.tail_targets, "critic loss tail terms: consistent with per-sample targets, or the "
                           "published recipe's (which collapses the distribution)", choices=("consistent", "recipe"))
    lower_contraction: float = _f(_LOSS.lower_contraction, "critic loss: shrink the lower tail about its VaR by "
                                  "1 - this (consistent tails)")
    upper_expansion: float = _f(_LOSS.upper_expansion, "critic loss: widen the upper tail by 1 + this (consistent tails)")
    shift_expectile: float = _f(_LOSS.shift_expectile, "critic loss: expectile of the mean anchor, 0.5 = the mean "
                                "(consistent tails)")
    loss_qh: float = _f(_LOSS.qh, "critic loss weight: quantile Huber")
    loss_risk: float = _f(_LOSS.risk, "critic loss weight: risk-weighted quantile loss")
    loss_cvar: float = _f(_LOSS.cvar, "critic loss weight: lower-tail CVaR alignment")
    loss_gain: float = _f(_LOSS.gain, "critic loss weight: upper-tail gain")
    loss_shift: float = _f(_LOSS.shift, "critic loss weight: mean shift")
    loss_shape: float = _f(_LOSS.shape, "critic loss weight: tail shape")
    loss_curv: float = _f(_LOSS.curv, "critic loss weight: tail curvature")
    loss_consist: float = _f(_LOSS.consist, "critic loss weight: multi-head consistency")
    # rewards
    missing_fill: float = _f(0.0, "the reward used where missing:P withheld it")
    # logging, evaluation, checkpoints
    eval_every: int = _f(25, "held-out evaluation every this many steps (and at the start and end)")
    n_eval: int = _f(256, "held-out problems per evaluation")
    save_every: int = _f(50, "checkpoint every this many steps (and at the end)")
    max_bad_steps: int = _f(3, "abort after this many non-finite losses in a row")
    plots: bool = _f(True, "write PNG plots at the end")

    def critic_loss_config(self):
        from dvpo import CriticLossConfig

        return CriticLossConfig(kappa=self.kappa, alpha=self.alpha, beta=self.beta, risk_gamma=self.risk_gamma,
                                normalize_kappa=self.normalize_kappa, tail_targets=self.tail_targets,
                                lower_contraction=self.lower_contraction, upper_expansion=self.upper_expansion,
                                shift_expectile=self.shift_expectile, qh=self.loss_qh, risk=self.loss_risk,
                                cvar=self.loss_cvar, gain=self.loss_gain, shift=self.loss_shift,
                                shape=self.loss_shape, curv=self.loss_curv, consist=self.loss_consist)

    def sft_config(self) -> SFTConfig:
        names = [f.name for f in dataclasses.fields(SFTConfig) if f.name != "out"]
        return SFTConfig(**{n: getattr(self, n) for n in names}, out=None)

    def algorithm(self):
        """This run's `Algorithm` (the registry in `dvpo/trainer/algorithms/`)."""
        from .algorithms import get_algorithm

        return get_algorithm(self.algo)(self)

    def critic_shape(self):
        """(H, N) of the critic's output, or None for the critic-free algorithms."""
        return self.algorithm().critic_shape()


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_json(cfg) -> str:
    return json.dumps(to_dict(cfg), indent=1, sort_keys=True)


def from_dict(cls, d: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


# ---- argparse from the dataclass -------------------------------------------------------------

def _bool(text: str) -> bool:
    t = str(text).lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def task_arg(text: str) -> str:
    """A task spec NAME[:LEVELS] (argparse type), checked by building the task (cheap: no data yet)."""
    from dvpo.tasks import TASKS, get_task

    name = str(text).partition(":")[0]
    if name not in TASKS:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected one of {', '.join(TASKS)}, "
                                          f"optionally with levels NAME:LEVELS (e.g. math:1-5)")
    try:
        get_task(text)
    except ValueError:
        levels = list(get_task(name).levels_available)
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected {name}:LEVELS with levels among {levels} "
            f"(e.g. {name}:{levels[0]}, {name}:{levels[0]}-{levels[-1]} or {name}:all)") from None
    return text


def noise_arg(text: str) -> str:
    """A noise spec (argparse type): the error says which part is wrong and lists the accepted forms."""
    from dvpo.tasks.noise import FORMS, parse_noise

    try:
        parse_noise(text)
    except ValueError as exc:
        msg = str(exc)
        if FORMS not in msg:
            msg += f"; accepted: {FORMS}"
        elif "+" not in str(text):
            msg = f"expected {FORMS}"             # the message would only repeat the value
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: {msg}") from None
    return text


def advantage_arg(text: str) -> str:
    """An actor-advantage spec (argparse type): mean, cvar:ALPHA or trim:ALPHA."""
    from .advantages import parse_advantage

    try:
        parse_advantage(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected mean, cvar:ALPHA or trim:ALPHA with "
                                          f"ALPHA in (0, 1] (e.g. trim:0.1)") from None
    return text


def _value_types() -> dict:
    """Strict argparse types for the fields that have a valid range: a bad value is a one-line usage
    error naming the flag, the value and what is accepted (instead of a traceback from deep inside).
    Fields not listed here (new ones included) get the plain type of their default."""
    from dvpo import cli

    attn = cli.one_of("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
    types = {
        "model": cli.existing_dir, "init": cli.existing_dir, "attn": attn, "device": cli.device,
        "threads": cli.nonneg_int, "sft_target_acc": cli.probability, "sft_lr": cli.positive_float,
        "sft_warmup": cli.nonneg_int, "sft_seed": cli.any_int, "seed": cli.any_int, "task": task_arg,
        "noise": noise_arg, "advantage": advantage_arg, "temperature": cli.positive_float,
        "max_new_tokens": cli.nonneg_int, "clip_eps": cli.nonneg_float, "cliprange_value": cli.nonneg_float,
        "policy_lr": cli.nonneg_float, "critic_lr": cli.nonneg_float, "weight_decay": cli.nonneg_float,
        "grad_clip": cli.nonneg_float, "kl_coef": cli.nonneg_float, "entropy_coef": cli.finite_float,
        "vf_coef": cli.nonneg_float, "gamma": cli.probability, "lam": cli.probability,
        "kappa": cli.positive_float, "alpha": cli.level, "beta": cli.level, "risk_gamma": cli.finite_float,
        "lower_contraction": cli.probability, "upper_expansion": cli.nonneg_float, "shift_expectile": cli.probability,
        "missing_fill": cli.finite_float,
    }
    for name in ("hidden", "layers", "heads", "ffn", "max_positions", "sft_steps", "sft_batch", "sft_eval_every",
                 "steps", "prompts_per_step", "group_size", "ppo_epochs", "minibatches", "n_heads", "n_quantiles",
                 "eval_every", "n_eval", "save_every", "max_bad_steps"):
        types[name] = cli.positive_int
    for name in ("loss_qh", "loss_risk", "loss_cvar", "loss_gain", "loss_shift", "loss_shape", "loss_curv",
                 "loss_consist"):
        types[name] = cli.nonneg_float
    return types


# what a default of None means, for --help
_NONE_DEFAULTS = {
    "model": "none: the tiny config", "init": "none: the SFT warm start",
    "out": "runs/ALGO_TASK_NOISE_sSEED",
}


class Default:
    """An argparse default that remembers it was not given on the command line."""

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        return repr(self.value)

    def __str__(self):
        return str(self.value)


def add_config_arguments(parser: argparse.ArgumentParser, cls, skip=(), defaults=None):
    """One ``--name`` per field (underscores become dashes); booleans take ``--name`` / ``--no-name``.
    Defaults are wrapped in `Default` so `explicit_fields` can tell what the user gave. Every help
    text ends with the default; values are checked by `_value_types` (one-line usage errors)."""
    defaults = defaults or {}
    types = _value_types()
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default)
        help_text = f.metadata.get("help", "")
        if "default" not in help_text.lower():
            shown = _NONE_DEFAULTS.get(f.name, "none") if default is None else default
            help_text += f" (default: {shown})"
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=Default(default),
                                help=help_text)
            continue
        kind = type(f.default) if f.default is not None else str
        if f.name in ("sft_seed",):
            kind = int
        elif f.name in ("sft_target_acc",):
            kind = float
        kind = types.get(f.name, kind)
        kw = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        parser.add_argument(flag, dest=f.name, type=kind, default=Default(default), help=help_text, **kw)


def check_config(cfg) -> Optional[tuple]:
    """What the per-flag types cannot see (several fields together): None, or (flag, value, what is
    expected) for a one-line usage error."""
    if getattr(cfg, "algo", None) in ALGOS:
        from .algorithms import get_algorithm

        problem = get_algorithm(cfg.algo).check(cfg)
        if problem is not None:
            return problem
    if not cfg.model and cfg.hidden % cfg.heads:         # transformers rejects it with a long traceback
        return "--heads", cfg.heads, f"a divisor of --hidden ({cfg.hidden})"
    if hasattr(cfg, "critic_loss_config"):
        try:
            cfg.critic_loss_config()
        except ValueError as exc:  # "config.FIELD must be ..., got X": name the flag that set it
            msg = str(exc)
            field = msg.split()[0].removeprefix("config.")
            flag = "--" + ("loss_" + field if field in _LOSS_WEIGHTS else field).replace("_", "-")
            return flag, getattr(cfg, "loss_" + field if field in _LOSS_WEIGHTS else field, None), \
                msg.split(" must be ", 1)[-1].rsplit(", got", 1)[0]
    return None


_LOSS_WEIGHTS = ("qh", "risk", "cvar", "gain", "shift", "shape", "curv", "consist")


def _unwrap(v):
    return v.value if isinstance(v, Default) else v


def explicit_fields(args) -> set:
    """The config fields that were given on the command line."""
    return {k for k, v in vars(args).items() if not isinstance(v, Default)}


def config_from_args(cls, args, **overrides):
    names = {f.name for f in dataclasses.fields(cls)}
    values = {n: _unwrap(getattr(args, n)) for n in names if hasattr(args, n)}
    values.update(overrides)
    return cls(**values)

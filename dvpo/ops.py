"""dvpo's public ops: the DVPO critic loss and its parts, fused (never building the `[tokens, N, M]`
pair tensor), plus distributional GAE.

Every op takes tensors with any leading dims (`[...]`: e.g. `[B, T]`, batch and sequence), in fp32, bf16,
fp16 (computed in fp32) or fp64 (computed in fp64); inputs are validated (a ValueError names the argument
and what was expected) and each call runs on the best available backend for its device (CUDA, Triton,
C++, or the PyTorch reference; `backends()` says which are available, `DVPO_BACKEND` forces one). They
are `torch.library` ops (dvpo.library), so they work under `torch.compile`. The formulas: docs/math.md.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor

from . import dispatch, library
from . import reference as ref
from . import validation as check
from .config import TERM_NAMES, CriticLossConfig, CriticLossOutput

__all__ = ["quantile_huber", "risk_weights", "cvar", "critic_loss", "distributional_gae", "backends"]


def backends(device=None):
    """Which backends can run the ops: {"cuda" | "triton" | "cpp" | "reference": status}.

    Args:
        device: a torch.device or string ("cpu", "cuda", ...); given, the status also says whether the
            backend can run tensors on that device. None: only whether it is installed and built.

    Returns:
        A dict from backend name (in the order dispatch tries them) to "available" or the reason it
        is not (e.g. that the CUDA extension was not built).

    Example:
        >>> dvpo.ops.backends("cpu")["reference"]
        'available'
    """
    return dispatch.backends(device)


def _tokens(lead) -> int:
    return math.prod(lead)


def _flat_mask(mask):
    """The per-token mask of the loss ops, [tokens], in the dtype it came in: every backend reads a
    bool mask natively and converts float weights to its accumulation dtype itself, so a conversion
    here would be a second pass over the mask (a kernel launch on a GPU)."""
    return None if mask is None else mask.reshape(-1)


def _reduce(per_token: Tensor, mask: Optional[Tensor], reduction: str) -> Tensor:
    """An op's masked per-token losses reduced as `reduction` says (a sequence is a row of the last
    leading dim): one dvpo::reduce_tokens call, deterministic and without a host sync (one launch on a
    GPU); "none" returns them as they are."""
    if reduction == "none":
        return per_token
    shape = per_token.shape
    rows = per_token.reshape(math.prod(shape[:-1]), shape[-1]) if per_token.dim() > 0 else per_token.reshape(1, 1)
    with _private_gradients():
        loss, _ = library.reduce_tokens(rows, None if mask is None else mask.reshape(rows.shape), reduction)
    return loss


# Default taus and risk weights, made once per (N, gamma, dtype, device): building them per call
# copies from the host (a blocking copy on a GPU) and launches small kernels. Bounded, and bypassed
# while torch.compile traces (a traced tensor must not be cached).
_CONSTANTS: "OrderedDict[tuple, Tensor]" = OrderedDict()
_CONSTANTS_MAX = 64


def _compiling() -> bool:
    fn = getattr(torch.compiler, "is_compiling", None)
    return bool(fn()) if fn is not None else False


def _constant(key: tuple, make) -> Tensor:
    if _compiling():
        return make()
    hit = _CONSTANTS.get(key)
    if hit is None:
        with torch.inference_mode(False), torch.no_grad():
            hit = make()
        _CONSTANTS[key] = hit
        if len(_CONSTANTS) > _CONSTANTS_MAX:
            _CONSTANTS.popitem(last=False)
    else:
        _CONSTANTS.move_to_end(key)
    return hit


def _private_gradients():
    """The library ops' gradient output is dropped here, so their backward may scale it in place
    (eager only: under torch.compile the compiler plans the buffers, and nothing is entered)."""
    return contextlib.nullcontext() if _compiling() else library.private_gradients()


def _default_taus(n, device, acc) -> Tensor:
    return _constant(("taus", n, str(device), acc), lambda: ref.taus(n, device=device, dtype=acc))


def _taus_arg(taus, n, like, acc):
    if taus is None:
        return _default_taus(n, like.device, acc)
    check.vector("taus", taus, n, like.device)
    return taus.to(acc)


def _risk_weights_arg(taus, t, config) -> Tensor:
    """The risk weights of `t` (taus in the accumulation dtype); cached when `t` is the default grid."""
    gamma = float(config.risk_gamma) if config.risk else 0.0
    make = (lambda: ref.risk_weights(t, gamma)) if config.risk else (lambda: torch.ones_like(t))
    if taus is not None:
        return make()
    return _constant(("risk", t.shape[0], gamma, str(t.device), t.dtype), make)


def risk_weights(taus: Tensor, gamma: float = 1.0) -> Tensor:
    """Per-quantile risk weights w_i = exp(-gamma tau_i) / mean_k exp(-gamma tau_k).

    They have mean 1 and, for gamma > 0, are largest at the lowest quantiles: passed as `weights` to
    `quantile_huber` they give the risk-weighted quantile loss, which fits the lower tail of the value
    distribution harder (what `critic_loss` uses, with `config.risk_gamma`).

    Args:
        taus: `[N]` quantile levels in (0, 1], floating point (e.g. `dvpo.taus(N)`).
        gamma: a finite number; 0 gives all-ones weights, negative values favour the upper quantiles.

    Returns:
        `[N]` weights on taus' device, in fp32 (fp64 for fp64 taus).

    Example:
        >>> dvpo.ops.risk_weights(dvpo.taus(4), gamma=1.0)
        tensor([1.3997, 1.0901, 0.8490, 0.6612])
    """
    check.tensor("taus", taus)
    if taus.dim() != 1:
        raise ValueError(f"taus must have shape [N], got {tuple(taus.shape)}")
    check.finite("gamma", gamma)
    return ref.risk_weights(taus, gamma)


def quantile_huber(pred: Tensor, target: Tensor, taus: Optional[Tensor] = None, *, kappa: float = 1.0,
                   weights: Optional[Tensor] = None, normalize_kappa: bool = False,
                   mask: Optional[Tensor] = None, reduction: str = "token-mean",
                   algorithm: str = "auto") -> Tensor:
    """Quantile Huber loss of predicted quantiles `pred` against target samples `target`, per token:
    (1/(N M)) sum_i w_i sum_j |tau_i - 1{z_j < pred_i}| Huber_kappa(z_j - pred_i), then reduced.

    Args:
        pred: `[..., N]` predicted quantiles (any leading dims, e.g. `[B, T, N]`); the gradient flows here.
        target: `[..., M]` target samples (e.g. distributional returns), same leading dims, dtype and
            device as `pred`; treated as constant (detached). M may differ from N.
        taus: `[N]` quantile level of each of pred's quantiles, same device; None: the midpoints
            `dvpo.taus(N)` = (2i-1)/(2N).
        kappa: the Huber threshold (> 0): quadratic for |error| <= kappa, linear beyond.
        weights: optional `[N]` per-quantile weights w_i (e.g. `risk_weights(taus)`); None: all 1.
        normalize_kappa: divide the Huber loss by kappa.
        mask: optional `[...]` (pred's leading dims), bool or float, 1 = real token: per-token weights;
            tokens at 0 are not read at all (NaN in padding cannot leak into the loss or gradients).
        reduction: how per-token losses become the result (verl's loss_agg_mode; a sequence is a row of
            the last leading dim): "token-mean" (masked mean over all tokens, the default),
            "seq-mean-token-mean" (per-sequence masked mean, then mean over sequences with a real token),
            "seq-mean-token-sum" (per-sequence masked sum, then that mean), or "none" (the masked
            per-token losses, shape `[...]`). An all-masked batch gives 0, not NaN.
        algorithm: how the N x M pairs are visited (the same loss up to rounding): "pairwise" (O(N M)
            per token), "sorted" (targets sorted once, O((N + M) log M); faster for large N, M) or "auto"
            (the backend picks by shape); backends without a sorted kernel run pairwise.

    Returns:
        A scalar tensor (`[...]` with reduction="none"), fp32 (fp64 for fp64 inputs), differentiable
        with respect to `pred`.

    Example:
        >>> pred = torch.zeros(2, 3, 10, requires_grad=True)      # [B, T, N]
        >>> target = torch.ones(2, 3, 10)                         # [B, T, M]
        >>> dvpo.ops.quantile_huber(pred, target)
        tensor(0.2500, grad_fn=...)
    """
    check.tensor("pred", pred)
    check.tensor("target", target)
    check.same_device_dtype("pred", pred, "target", target)
    lead = pred.shape[:-1]
    if target.shape[:-1] != lead:
        raise ValueError(f"target must have leading dims {tuple(lead)} like pred, got shape {tuple(target.shape)}")
    check.positive("kappa", kappa)
    check.mask(mask, lead, pred.device)
    check.reduction(reduction)
    check.algorithm(algorithm)
    n, m = pred.shape[-1], target.shape[-1]
    acc = ref.acc_dtype(pred.dtype)
    t = _taus_arg(taus, n, pred, acc)
    if weights is not None:
        check.vector("weights", weights, n, pred.device)
        weights = weights.to(acc)
    tokens = _tokens(lead)
    with _private_gradients():
        loss, _ = library.quantile_huber(pred.reshape(tokens, n), target.detach().reshape(tokens, m), t, weights,
                                         _flat_mask(mask), float(kappa), bool(normalize_kappa), algorithm)
    return _reduce(loss.reshape(lead), mask, reduction)


def cvar(x: Tensor, level: float, *, upper: bool = False) -> Tensor:
    """Conditional value at risk of the N equally weighted atoms in the last dim: the mean of the lowest
    `level` fraction of them (the boundary atom with its fractional weight), or of the highest with
    `upper`. Computed from ranks, without sorting: atoms may come in any order (crossing quantiles).

    Args:
        x: `[..., N]` atoms (any leading dims), floating point.
        level: the tail fraction, in (0, 1]; 1 gives the plain mean.
        upper: the upper tail (the mean of the highest `level` fraction) instead of the lower.

    Returns:
        `[...]` (x's leading dims), fp32 (fp64 for fp64 inputs), differentiable with respect to `x`
        (ties: the lower index counts as lower).

    Example:
        >>> x = torch.tensor([[4.0, 1.0, 3.0, 2.0]])
        >>> dvpo.ops.cvar(x, 0.5), dvpo.ops.cvar(x, 0.5, upper=True)
        (tensor([1.5000]), tensor([3.5000]))
    """
    check.tensor("x", x)
    check.level("level", level)
    lead, n = x.shape[:-1], x.shape[-1]
    with _private_gradients():
        value, _ = library.cvar(x.reshape(_tokens(lead), n), float(level), bool(upper))
    return value.reshape(lead)


def critic_loss(theta: Tensor, target: Tensor, taus: Optional[Tensor] = None, *, mask: Optional[Tensor] = None,
                config: Optional[CriticLossConfig] = None, reduction: str = "token-mean",
                algorithm: str = "auto", deterministic: bool = False) -> CriticLossOutput:
    """The DVPO critic loss of predicted return quantiles `theta` against target samples `target`,
    fused: forward and gradient in one pass per token, without building the `[tokens, N, M]` pairs.

    Per token it is a weighted sum of eight terms (`dvpo.TERM_NAMES`), the first seven on the mean of
    the heads: quantile Huber ("qh"), quantile Huber weighted towards the low quantiles ("risk"),
    lower-tail CVaR alignment ("cvar"), upper-tail CVaR alignment ("gain"), a mean anchor ("shift"),
    tail spread ("shape"), tail curvature ("curv"), and agreement between the heads ("consist"). The
    tail terms make the critic risk-aware: the lower tail is contracted (noisy low rewards cannot drag
    it down) and the upper tail kept wide; how, and how much, is set by `config`.

    Args:
        theta: `[..., N]` quantiles, or `[..., H, N]` from H heads (heads whenever theta has one dim
            more than target), same dtype and device as target; the gradient flows here.
        target: `[..., M]` target samples per token (e.g. the returns of `distributional_gae`), treated as
            constant (detached). M may differ from N.
        taus: `[N]` quantile level of each of theta's quantiles, same device; None: the midpoints
            `dvpo.taus(N)` = (2i-1)/(2N) (`dvpo.taus(N, "paper")` gives i/N).
        mask: optional `[...]` (target's leading dims), bool or float, 1 = real token: per-token weights;
            tokens at 0 are not read at all (NaN in padding cannot leak into the loss or gradients).
        config: a `dvpo.CriticLossConfig`: the Huber threshold, the tail levels, the risk-weight
            exponent, how the tail terms form their targets, and the weight of each term (0 switches a
            term off: its work is skipped and it is reported as 0). Its fields are documented on
            `dvpo.CriticLossConfig` (`help(dvpo.CriticLossConfig)`), not repeated here. None: the
            defaults, `CriticLossConfig()`.
        reduction: how per-token losses become `loss` (verl's loss_agg_mode; a sequence is a row of the
            last leading dim): "token-mean" (masked mean over all tokens, the default),
            "seq-mean-token-mean" (per-sequence masked mean, then mean over sequences with a real token),
            "seq-mean-token-sum" (per-sequence masked sum, then that mean), or "none" (the masked
            per-token losses, shape `[...]`). An all-masked batch gives 0, not NaN.
        algorithm: how the N x M pairs of the Huber terms are visited (the same loss up to rounding):
            "pairwise" (O(N M) per token), "sorted" (targets sorted once, O((N + M) log M); faster for
            large N, M) or "auto" (the backend picks by shape); backends without a sorted kernel run pairwise.
        deterministic: accepted for API compatibility; every backend already reduces in a fixed order (no
            atomics), so results are bitwise reproducible run to run whatever its value.

    Returns:
        A `dvpo.CriticLossOutput`: `.loss`, the reduced total (a scalar, or `[...]` with
        reduction="none"), fp32 (fp64 for fp64 inputs), differentiable with respect to `theta`; and
        `.terms`, a dict from each name in `dvpo.TERM_NAMES` to its unweighted per-token values `[...]`
        (detached, 0 at masked tokens and for switched-off terms), for logging.

    Example:
        >>> B, T, H, N, M = 2, 16, 3, 32, 32
        >>> heads = torch.randn(B, T, H, N, requires_grad=True)       # a critic's H quantile heads
        >>> returns = torch.randn(B, T, M)                            # e.g. from distributional_gae
        >>> mask = torch.ones(B, T, dtype=torch.bool)
        >>> out = dvpo.ops.critic_loss(heads, returns, mask=mask, config=dvpo.CriticLossConfig(alpha=0.1))
        >>> out.loss.backward()
        >>> sorted(out.terms) == sorted(dvpo.TERM_NAMES)
        True
    """
    check.tensor("theta", theta)
    check.tensor("target", target)
    check.same_device_dtype("theta", theta, "target", target)
    config = CriticLossConfig() if config is None else config
    if not isinstance(config, CriticLossConfig):
        raise ValueError(f"config must be a dvpo.CriticLossConfig or None, got {type(config).__name__}")
    check.reduction(reduction)
    check.algorithm(algorithm)
    has_heads = theta.dim() == target.dim() + 1
    heads = theta if has_heads else theta.unsqueeze(-2)
    lead = target.shape[:-1]
    if heads.shape[:-2] != lead:
        raise ValueError(f"theta must be [..., N] or [..., H, N] with leading dims {tuple(lead)} like target, "
                         f"got shape {tuple(theta.shape)}")
    check.mask(mask, lead, theta.device)
    h, n, m = heads.shape[-2], heads.shape[-1], target.shape[-1]
    acc = ref.acc_dtype(theta.dtype)
    t = _taus_arg(taus, n, theta, acc)
    risk_w = _risk_weights_arg(taus, t, config)
    tokens = _tokens(lead)
    with _private_gradients():
        total, terms, _ = library.critic_loss(
            heads.reshape(tokens, h, n), target.detach().reshape(tokens, m), t, risk_w, _flat_mask(mask),
            float(config.kappa), float(config.alpha), float(config.beta), bool(config.normalize_kappa),
            config.kernel_params(), algorithm)
    terms = terms.reshape(lead + (len(TERM_NAMES),))
    return CriticLossOutput(
        loss=_reduce(total.reshape(lead), mask, reduction),
        terms={name: terms[..., k] for k, name in enumerate(TERM_NAMES)},
    )


def distributional_gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0,
                       lam: float = 0.95):
    """Generalized advantage estimation per value quantile: the critic's targets and the actor's
    advantages from per-token rewards and value quantiles.

    For each quantile j, a reversed scan over the real tokens of each sequence (padding is skipped, so
    the recursion links consecutive real tokens; after the last one the next value is 0):
    delta_t = r_t + gamma V_next,j - V_t,j; A_t,j = delta_t + gamma lam A_next,j; R_t,j = V_t,j + A_t,j.

    Args:
        rewards: `[B, T]` per-token rewards (e.g. the outcome reward at the last response token),
            floating point, on values' device.
        values: `[B, T, M]` the critic's M value quantiles per token (e.g. the mean over heads).
        mask: `[B, T]` bool or float, 1 = real token (required).
        gamma: discount, in [0, 1].
        lam: GAE lambda, in [0, 1].

    Returns:
        (advantages, returns): advantages `[B, T]` = mean over j of A_t,j (the actor's advantage) and
        returns `[B, T, M]` = R_t,j (the critic's targets, e.g. `critic_loss`'s `target`), both 0 at
        padding, fp32 (fp64 for fp64 values), without gradient (inputs are detached).

    Example:
        >>> rewards = torch.zeros(2, 5); rewards[:, -1] = 1.0       # outcome reward at the last token
        >>> values = torch.zeros(2, 5, 32)                          # [B, T, M]
        >>> adv, returns = dvpo.ops.distributional_gae(rewards, values, torch.ones(2, 5), gamma=1.0, lam=0.95)
        >>> adv.shape, returns.shape
        (torch.Size([2, 5]), torch.Size([2, 5, 32]))
    """
    check.tensor("values", values, min_dim=3)
    if values.dim() != 3:
        raise ValueError(f"values must have shape [B, T, M], got {tuple(values.shape)}")
    check.tensor("rewards", rewards)
    if values.device != rewards.device:
        raise ValueError(f"rewards must be on the same device as values ({values.device}), got {rewards.device}")
    if tuple(rewards.shape) != tuple(values.shape[:2]):
        raise ValueError(f"rewards must have shape {tuple(values.shape[:2])} ([B, T] of values), "
                         f"got {tuple(rewards.shape)}")
    if mask is None:
        raise ValueError("mask must be a [B, T] tensor (1 = real token), got None")
    check.mask(mask, values.shape[:2], values.device)
    check.unit_interval("gamma", gamma)
    check.unit_interval("lam", lam)
    acc = ref.acc_dtype(values.dtype)
    return library.distributional_gae(rewards.detach().to(acc), values.detach(), mask,
                                      float(gamma), float(lam))

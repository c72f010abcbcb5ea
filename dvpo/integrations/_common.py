"""What the three adapters share: the clipped distributional value loss, verl-style aggregation,
distributional GAE on framework-shaped tensors, the quantile value head and the "plain MSE" config.

Nothing here imports verl, TRL or OpenRLHF: every adapter works (and is tested) without them.

Conventions (the same in every adapter):

* A scalar critic's tensors (`[B, T]`) are read as one quantile (`[B, T, 1]`), so an adapter is a
  drop-in replacement for the framework's function with the framework's own tensors.
* Quantile values are `[B, T, N]`; an ensemble of H quantile heads is `[B, T, H, N]` (the loss then
  adds the consistency term, and GAE uses the head mean). Returns (the critic's targets) are
  `[B, T, M]`, M may differ from N.
* Value clipping (PPO's `cliprange_value`) is applied per quantile (per head and quantile for heads)
  around the old values: `v_clip = clip(v, old - eps, old + eps)`. The per-token critic loss is
  `max(L(v), L(v_clip))`, where `L` is the whole DVPO critic loss of that token (all terms), exactly
  as PPO takes `max((v - R)^2, (v_clip - R)^2)`; the gradient flows through the branch that wins
  (through the clipped quantiles only where they are inside the clip range). `clipfrac` is the
  fraction of real tokens where the clipped branch's loss is strictly larger. With
  `cliprange_value=None` there is no clipping (one fused kernel call instead of two) and clipfrac = 0.
* Shapes are checked at the boundary and never broadcast: a wrong shape is a ValueError that names
  the argument and the shape it must have. What goes in comes out: `[B, T]` values give `[B, T]`
  returns, `[B, T, N]` give `[B, T, N]` (heads `[B, T, H, N]` give the head mean's `[B, T, N]`).
* Output dtypes follow each framework's own type promotion (`result_dtype`); the arithmetic runs in
  at least float32 (dvpo's kernels) and is cast to that dtype at the end.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import masked as _masked
from .. import ops
from ..clipped_loss import clip_bounds
from ..clipped_loss import clipped_critic_loss as _clipped_critic_loss
from ..config import CriticLossConfig
from ..masked import safe_div

__all__ = [
    "MSE_KAPPA",
    "LOSS_AGG_MODES",
    "mse_config",
    "QuantileValueHead",
    "aggregate",
    "clipped_critic_loss",
    "distributional_returns",
    "masked_whiten",
    "check_token_tensor",
    "result_dtype",
    "quantile_mean",
    "expand_token_mask",
]

# A quantile Huber kappa so large that the Huber loss is quadratic for every residual a float32
# square can hold (|u| <= 1e18; u^2 overflows fp32 past ~1.8e19), yet small enough that kappa^2
# stays finite in fp32 inside any kernel.
MSE_KAPPA = 1e18

# verl's loss_agg_mode values (verl.trainer.ppo.core_algos.agg_loss, verl 0.9).
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm",
                  "seq-mean-token-mean")


def mse_config() -> CriticLossConfig:
    """The DVPO critic loss configured as the scalar critic's `0.5 * (v - R)^2`, exactly.

    With N = M = 1 and tau = 0.5 (the midpoint grid of one quantile), the quantile Huber term is
    `|tau - 1{u < 0}| * L_k(u) = 0.5 * L_k(u)` with `u = R - v`, and `L_k(u) = 0.5 u^2` while
    `|u| <= kappa` (`kappa = MSE_KAPPA`, never exceeded by a finite fp32 square). So the term is
    `0.25 (v - R)^2`; the weight `qh = 2` makes it `0.5 (v - R)^2`; every other term is switched off
    (weight 0) and the Huber loss is not divided by kappa (`normalize_kappa=False`; the default
    config divides). All factors are powers of two, so the per-token value is bitwise `0.5 * (v - R)^2` in
    float64 (and matches the frameworks' MSE value losses to rounding in every dtype).

    With N > 1 (or M > 1) the same config is a plain quantile regression with quadratic loss, that is
    `(1/(N M)) sum_ij |tau_i - 1{u_ij<0}| (z_j - theta_i)^2` (an expectile loss), not an MSE.
    """
    return CriticLossConfig(kappa=MSE_KAPPA, normalize_kappa=False, qh=2.0, risk=0.0, cvar=0.0, gain=0.0,
                            shift=0.0, shape=0.0, curv=0.0, consist=0.0)


# ----------------------------------------------------------------------------------------------
# The quantile value head
# ----------------------------------------------------------------------------------------------

class QuantileValueHead(nn.Linear):
    """A distributional value head: `Linear(hidden_size, num_heads * num_quantiles)`.

    `forward(hidden [..., D])` returns `[..., N]` when `num_heads == 1` and `[..., H, N]` otherwise:
    the shapes `dvpo.ops.critic_loss` and the adapters take. It replaces the frameworks'
    `Linear(hidden, 1)` value head (whose output they `.squeeze(-1)`: a no-op for N > 1).

    It *is* an `nn.Linear` (parameters `weight` `[H N, D]` and `bias`), so a checkpoint saved with it
    loads into a plain `Linear(hidden, H * N)` head, e.g. a Hugging Face `*ForSequenceClassification`
    / `*ForTokenClassification` model with `num_labels = H * N`, and back.

    Initialization: weights ~ N(0, 1 / (D + 1)) (the usual value-head init), biases 0 (all quantiles
    start equal; the quantile loss spreads them). `quantile_init=(lo, hi)` instead starts the biases
    spread evenly over [lo, hi] in tau order, so the initial quantiles do not cross.
    """

    def __init__(self, hidden_size: int, num_quantiles: int, num_heads: int = 1, *, bias: bool = True,
                 quantile_init: Optional[Tuple[float, float]] = None, device=None, dtype=None):
        for name, value in (("hidden_size", hidden_size), ("num_quantiles", num_quantiles),
                            ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if quantile_init is not None and not bias:
            raise ValueError("quantile_init needs bias=True")
        self.num_quantiles = num_quantiles
        self.num_heads = num_heads
        self.quantile_init = quantile_init
        super().__init__(hidden_size, num_heads * num_quantiles, bias=bias, device=device, dtype=dtype)

    @property
    def hidden_size(self) -> int:
        return self.in_features

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.normal_(0.0, 1.0 / (self.in_features + 1))
            if self.bias is not None:
                if self.quantile_init is None:
                    self.bias.zero_()
                else:
                    lo, hi = self.quantile_init
                    grid = torch.linspace(lo, hi, self.num_quantiles, dtype=torch.float64)
                    self.bias.copy_(grid.repeat(self.num_heads).to(self.bias))

    def forward(self, hidden: Tensor) -> Tensor:
        out = super().forward(hidden)
        if self.num_heads == 1:
            return out
        return out.unflatten(-1, (self.num_heads, self.num_quantiles))

    def extra_repr(self) -> str:
        return (f"hidden_size={self.in_features}, num_quantiles={self.num_quantiles}, "
                f"num_heads={self.num_heads}, bias={self.bias is not None}")


# ----------------------------------------------------------------------------------------------
# Aggregation (verl's loss_agg_mode)
# ----------------------------------------------------------------------------------------------

def aggregate(loss_mat: Tensor, loss_mask: Tensor, loss_agg_mode: str = "token-mean", *, dp_size: int = 1,
              batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None,
              seq_count_eps: float = 0.0) -> Tensor:
    """Reduce a per-token loss `[B, T]` with verl's `loss_agg_mode` semantics (verl 0.9 `agg_loss`).

    * `token-mean`: `sum(loss * mask) / batch_num_tokens * dp_size` (`batch_num_tokens` defaults to
      `mask.sum()`, the local token count),
    * `token-sum`: `sum(loss * mask) * dp_size`,
    * `seq-mean-token-sum`: per-sequence token sums, averaged over sequences with a real token
      (`global_batch_size` defaults to their count), `* dp_size`,
    * `seq-mean-token-sum-norm`: the same divided by `loss_scale_factor` (default: T, the horizon),
    * `seq-mean-token-mean`: per-sequence token means, averaged over sequences with a real token.

    `seq_count_eps` is added to each sequence's token count in `seq-mean-token-mean` (verl and
    OpenRLHF add 1e-8; their adapters pass it, so results match theirs to the last bit).

    Masked tokens contribute exactly nothing (NaN/inf there cannot leak in). Unlike verl, an
    all-masked micro-batch gives 0 instead of NaN (dvpo's contract). `dp_size > 1` needs the global
    normalizer (`batch_num_tokens` or `global_batch_size`), as in verl.
    """
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {', '.join(LOSS_AGG_MODES)}; got {loss_agg_mode!r}")
    if not isinstance(loss_mat, torch.Tensor) or loss_mat.dim() != 2:
        raise ValueError(f"loss_mat must be the per-token loss, shape [B, T], got {_shape_of(loss_mat)}")
    check_token_tensor(loss_mask, "loss_mask", tuple(loss_mat.shape), what="[B, T] (the shape of loss_mat)")
    m = loss_mask.to(loss_mat.dtype)
    masked = torch.where(loss_mask != 0, loss_mat, torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device)) * m
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("batch_num_tokens (the global token count) is required when dp_size > 1")
            batch_num_tokens = m.sum()
        return safe_div(masked.sum(), batch_num_tokens) * dp_size
    if loss_agg_mode == "token-sum":
        return masked.sum() * dp_size
    row_w = m.sum(-1)
    seq_valid = (row_w > 0).to(loss_mat.dtype)
    if loss_agg_mode == "seq-mean-token-mean":
        # the count in the mask's own dtype plus the eps, with torch's promotion (as the frameworks do:
        # for an integer mask the 1e-8 is lost in float32, for a float64 mask it is kept)
        count = loss_mask.sum(-1)
        if seq_count_eps:
            count = count + seq_count_eps
        seq_loss = safe_div(masked.sum(-1), count.to(loss_mat.dtype))
    else:
        seq_loss = masked.sum(-1)
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        global_batch_size = seq_valid.sum()
    loss = safe_div((seq_loss * seq_valid).sum(), global_batch_size) * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of `x` over real tokens (0 when there is none); `mask` broadcasts from the left dims."""
    return _masked.masked_mean(x, mask)


def masked_whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """PPO's advantage whitening over real tokens: `(x - mean) / sqrt(var + eps)`, with the masked
    mean and the unbiased (Bessel-corrected) masked variance, as verl's and TRL's `masked_whiten`
    (no NaN for fewer than two real tokens: the variance is then taken as is). `dvpo.masked` is the
    one implementation (the trainer uses it with the population variance)."""
    return _masked.masked_whiten(x, mask, unbiased=True, shift_mean=shift_mean, eps=eps)


# ----------------------------------------------------------------------------------------------
# The clipped distributional critic loss
# ----------------------------------------------------------------------------------------------

def _dims(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _shape_of(x) -> str:
    return _dims(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def check_token_tensor(x: Tensor, name: str, lead: Tuple[int, ...], *, what: str = "[B, T]") -> Tensor:
    """`x` must be a tensor of exactly the per-token shape `lead` (`[B, T]`); a ValueError naming
    `name` and the expected shape otherwise (no broadcasting: `[B, 1]` or `[B, T, 1]` are errors)."""
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(lead):
        raise ValueError(f"{name} must have shape {what} = {_dims(lead)}, got {_shape_of(x)}")
    return x


def as_quantiles(x: Tensor, name: str, lead: Tuple[int, ...]) -> Tensor:
    """`[B, T]` -> `[B, T, 1]` (a scalar critic is one quantile); `[B, T, N]` and `[B, T, H, N]` pass.
    Anything else (other leading dims, more dims) is a ValueError naming `name`."""
    if (not isinstance(x, torch.Tensor) or x.dim() < len(lead) or x.dim() > len(lead) + 2
            or tuple(x.shape[:len(lead)]) != tuple(lead)):
        raise ValueError(f"{name} must have shape [B, T] = {_dims(lead)}, [B, T, N] = {_dims(lead)[:-1]}, N] or "
                         f"[B, T, H, N] = {_dims(lead)[:-1]}, H, N], got {_shape_of(x)}")
    if x.dim() == len(lead):
        return x.unsqueeze(-1)
    return x


def result_dtype(*tensors, floor: Optional[torch.dtype] = None) -> torch.dtype:
    """The dtype a framework's own arithmetic on these tensors ends in: torch's type promotion over
    their dtypes (`None` and Python numbers ignored; integer/bool masks do not change a float dtype),
    promoted with `floor` if given (verl and OpenRLHF multiply by a `.float()` sequence mask in their
    sequence-level modes, which makes a bf16 loss float32). Integer-only inputs give float32."""
    dtype = None
    for x in tensors:
        if isinstance(x, torch.Tensor):
            dtype = x.dtype if dtype is None else torch.promote_types(dtype, x.dtype)
    if dtype is None or not dtype.is_floating_point:
        dtype = torch.float32
    if floor is not None:
        dtype = torch.promote_types(dtype, floor)
    return dtype


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """dvpo's kernels compute in float32 or float64: the output dtype widened to at least float32."""
    return torch.promote_types(dtype, torch.float32)


def quantile_mean(x: Tensor, lead: Tuple[int, ...], name: str = "values") -> Tensor:
    """The scalar value per token: `[B, T]` as is, `[B, T, N]` -> mean over N, `[B, T, H, N]` -> mean
    over heads and quantiles. For the frameworks' metrics, which expect `[B, T]`."""
    x = as_quantiles(x, name, lead)
    return x.reshape(*lead, -1).mean(-1)


def expand_token_mask(mask: Tensor, x: Tensor, *, mask_name: str = "mask", x_name: str = "values") -> Tensor:
    """`mask` `[B, T]` viewed as `[B, T, 1, ...]` to multiply or fill `x` (`[B, T]`, `[B, T, N]` or
    `[B, T, H, N]`) per token. The mask must be exactly `x.shape[:2]` (no other broadcasting)."""
    if not isinstance(x, torch.Tensor) or not 2 <= x.dim() <= 4:
        raise ValueError(f"{x_name} must have shape [B, T], [B, T, N] or [B, T, H, N], got {_shape_of(x)}")
    check_token_tensor(mask, mask_name, tuple(x.shape[:2]))
    return mask.reshape(*mask.shape, *([1] * (x.dim() - 2)))


def _old_like(old: Tensor, pred: Tensor, lead, name: str, pred_name: str) -> Tensor:
    """The old values in the prediction's shape: the same shape, or `[B, T, N]` for heads
    `[B, T, H, N]` (every head is clipped around the old ensemble). Nothing else is broadcast."""
    old_q = as_quantiles(old, f"{name} (the old values)", lead)
    if old_q.shape == pred.shape:
        return old_q
    if pred.dim() == len(lead) + 2 and old_q.dim() == len(lead) + 1 and old_q.shape[-1] == pred.shape[-1]:
        return old_q.unsqueeze(-2)
    heads = f" or [B, T, N] = {_dims(pred.shape[:2] + pred.shape[-1:])}" if pred.dim() == 4 else ""
    raise ValueError(f"{name} (the old values) must have the shape of {pred_name}, {_dims(pred.shape)}{heads}, "
                     f"got {_shape_of(old)}")


def clipped_critic_loss(vpreds: Tensor, returns: Tensor, old_values: Optional[Tensor], mask: Optional[Tensor],
                        cliprange_value: Optional[float], *, config: Optional[CriticLossConfig] = None,
                        taus: Optional[Tensor] = None, clip: Callable = clip_bounds,
                        names: Tuple[str, str, str, str] = ("vpreds", "returns", "values", "mask")):
    """Per-token `max(L(v), L(v_clip))` of the fused DVPO critic loss, unreduced.

    `vpreds`: `[B, T]`, `[B, T, N]` or heads `[B, T, H, N]`; `returns`: `[B, T]` or `[B, T, M]`;
    `old_values`: the shape of `vpreds` (or `[B, T, N]` for heads); `mask`: `[B, T]` (any dtype,
    nonzero = real token). `names` are the caller's argument names for (vpreds, returns, old values,
    mask), used in the ValueErrors. Returns `(per_token [B, T] fp32 (fp64 for fp64 inputs),
    clipped [B, T] bool, terms)` where `clipped` marks tokens whose clipped branch is strictly larger
    and `terms` are the unclipped branch's eight per-token terms (for logging).
    """
    v_name, r_name, o_name, m_name = names
    if not isinstance(vpreds, torch.Tensor) or not 2 <= vpreds.dim() <= 4:
        raise ValueError(f"{v_name} must have shape [B, T], [B, T, N] or [B, T, H, N], got {_shape_of(vpreds)}")
    lead = tuple(vpreds.shape[:2])
    pred = as_quantiles(vpreds, v_name, lead)
    if not isinstance(returns, torch.Tensor) or returns.dim() not in (2, 3) or tuple(returns.shape[:2]) != lead:
        raise ValueError(f"{r_name} must have shape [B, T] = {_dims(lead)} or [B, T, M] = {_dims(lead)[:-1]}, M] "
                         f"(the first two dims of {v_name}), got {_shape_of(returns)}")
    target = as_quantiles(returns, r_name, lead)
    dtype = torch.promote_types(pred.dtype, target.dtype)
    pred = pred.to(dtype)
    target = target.detach().to(dtype)
    real = None
    if mask is not None:
        real = check_token_tensor(mask, m_name, lead) != 0
    if taus is not None:
        taus = taus.to(device=pred.device, dtype=dtype)
    cfg = CriticLossConfig() if config is None else config
    old = None
    if cliprange_value is not None:
        if old_values is None:
            raise ValueError(f"{o_name} (the old values) are required for value clipping "
                             f"(cliprange_value is not None)")
        old = _old_like(old_values, pred, lead, o_name, v_name).detach().to(dtype)
    return _clipped_critic_loss(pred, target, old, real, None if old is None else cliprange_value, config=cfg,
                                taus=taus, clip=clip)


# ----------------------------------------------------------------------------------------------
# Distributional GAE on framework tensors
# ----------------------------------------------------------------------------------------------

def distributional_returns(rewards: Tensor, values: Tensor, mask: Tensor, gamma, lam, *,
                           names: Tuple[str, str, str] = ("rewards", "values", "mask"),
                           dtype: Optional[torch.dtype] = None):
    """`dvpo.ops.distributional_gae` on framework tensors.

    `values` `[B, T]`, `[B, T, N]` or heads `[B, T, H, N]` (the head mean is used); `rewards` and
    `mask` (any dtype, nonzero = real token) exactly `[B, T]`. `names` are the caller's argument
    names (for the ValueErrors). Returns (advantages `[B, T]` unwhitened, returns in the shape of
    `values`: `[B, T]` for `[B, T]`, `[B, T, N]` for `[B, T, N]` and for heads), 0 at padding,
    computed in `compute_dtype(dtype)` (`dtype`: default `result_dtype(rewards, values)`); the
    caller casts to its framework's dtype. The scan links consecutive real tokens.
    """
    r_name, v_name, m_name = names
    if not isinstance(values, torch.Tensor) or not 2 <= values.dim() <= 4:
        raise ValueError(f"{v_name} must have shape [B, T], [B, T, N] or [B, T, H, N], got {_shape_of(values)}")
    lead = tuple(values.shape[:2])
    check_token_tensor(rewards, r_name, lead, what=f"[B, T] (the first two dims of {v_name})")
    check_token_tensor(mask, m_name, lead, what=f"[B, T] (the first two dims of {v_name})")
    acc = compute_dtype(result_dtype(rewards, values) if dtype is None else dtype)
    v = values.detach().to(acc)
    if v.dim() == 4:
        v = v.mean(-2)
    scalar = v.dim() == 2
    if scalar:
        v = v.unsqueeze(-1)
    advantages, returns = ops.distributional_gae(rewards.detach().to(acc), v, mask != 0, gamma=float(gamma),
                                                 lam=float(lam))
    if scalar:
        returns = returns.squeeze(-1)
    return advantages, returns

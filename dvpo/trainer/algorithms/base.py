"""`Algorithm`: what one RL algorithm contributes to the trainer's step.

The loop (`dvpo/trainer/loop.py`) is the same for every algorithm: rollout -> rewards -> values ->
advantages -> K epochs of minibatch updates of actor and critic -> log. An algorithm fills in:

- `critic`: "none", "scalar" or "distributional", and `critic_shape(cfg)`: the heads H and
  quantiles N of the critic's `[B, T, H, N]` output (None without a critic);
- `view(values)`: the critic output as the algorithm reads it (PPO: `[B, T]`, H scalar critics:
  `[B, T, H]`, DVPO: `[B, T, H, N]`); the batch stores this view;
- `kl_in_reward`: whether the KL penalty to the reference is part of the per-token reward;
- `advantages(batch, rewards, mean)`: raw advantages, the critic's targets and metrics; the
  trainer then whitens them over the global batch if `whiten` is set;
- `value_loss(values, mb, taus)`: the critic loss of a minibatch, and its metrics;
- `extra_losses(logp, mb)`: further actor losses, (name, weight, value) each (GRPO's k3 KL);
- `check(cfg)`: configuration errors the CLI's per-flag types cannot see.

The PPO surrogate (`losses.policy_loss`), the entropy bonus, the optimisers and the distributed
plumbing are the trainer's and the same for all.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Tuple

from torch import Tensor

# the trainer's distributed-aware masked mean for metrics: mean(x, mask=None) -> float
MetricMean = Callable[..., float]


class Algorithm:
    name: str = ""
    critic: str = "none"            # "none" | "scalar" | "distributional"
    kl_in_reward: bool = True
    whiten: bool = True             # whiten the raw advantages over the global batch
    uses_heads: bool = False        # the critic has --n-heads heads

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def check(cls, cfg) -> Optional[Tuple[str, object, str]]:
        """None, or (flag, value, what is expected) for a one-line usage error."""
        if cls.uses_heads and cfg.n_heads < 1:
            return "--n-heads", cfg.n_heads, "an integer >= 1"
        return None

    def critic_shape(self) -> Optional[Tuple[int, int]]:
        return None

    def critic_loss_config(self):
        """The fused critic loss's config (the distributional critic only)."""
        return None

    def view(self, values: Tensor) -> Tensor:
        return values

    def advantages(self, batch, rewards: Tensor, mean: MetricMean) -> Tuple[Tensor, Optional[Tensor], Dict]:
        """(raw advantages [B, T], critic targets or None, metrics over the global batch)."""
        raise NotImplementedError

    def value_loss(self, values: Tensor, mb, taus: Optional[Tensor]) -> Tuple[Tensor, Dict]:
        """(critic loss of the minibatch, {metric: value}); values in the algorithm's view."""
        raise NotImplementedError(f"{self.name} has no critic")

    def extra_losses(self, logp: Tensor, mb) -> Iterable[Tuple[str, float, Tensor]]:
        return ()

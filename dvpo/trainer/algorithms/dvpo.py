"""DVPO: a distributional critic (H quantile heads x N quantiles), targets and advantages from the
fused distributional GAE on the ensemble's quantiles, the fused critic loss (all eight terms) with
per-quantile value clipping. The actor's advantage is the mean over quantiles, a lower CVaR
(`--advantage cvar:ALPHA`) or the mean floored at the critic's ALPHA-quantile (`--advantage
trim:ALPHA`), whitened."""

from __future__ import annotations

import time


from .. import advantages as adv
from .. import losses
from .base import Algorithm


class DVPO(Algorithm):
    name = "dvpo"
    critic = "distributional"
    uses_heads = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.loss_config = cfg.critic_loss_config()

    def critic_shape(self):
        return (self.cfg.n_heads, self.cfg.n_quantiles)

    def critic_loss_config(self):
        return self.loss_config

    def advantages(self, batch, rewards, mean):
        cfg, mask = self.cfg, batch.mask
        quant = batch.values.mean(-2)                                     # ensemble [B, T, N]
        a, returns = adv.dvpo_advantages(rewards, quant, mask, gamma=cfg.gamma, lam=cfg.lam, advantage=cfg.advantage)
        n = quant.shape[-1]
        lo, hi = max(0, int(0.1 * n)), min(n - 1, int(0.9 * n))
        srt = quant.sort(-1).values
        # Crossing: neighbour quantiles out of order. Where the true quantile function is flat (0/1
        # outcomes tie many quantiles) any noise orders half of them wrongly, so the deep count, out
        # of order by more than 1% of the token's fan, is the one that says the fan is disordered.
        step_down = -quant.diff(dim=-1)
        fan = (srt[..., -1] - srt[..., 0]).unsqueeze(-1)
        return a, returns, {"value_mean": mean(quant[:, 0]),
                            "value_spread": mean(srt[..., hi] - srt[..., lo], mask),
                            "value_crossing": mean((step_down > 0).float().mean(-1), mask),
                            "value_crossing_deep": mean((step_down > 0.01 * fan).float().mean(-1), mask)}

    def value_loss(self, values, mb, taus):
        t0 = time.perf_counter()
        loss, terms = losses.distributional_value_loss(values, mb.old_values, mb.returns, mb.mask, self.loss_config,
                                                        self.cfg.cliprange_value, taus=taus, denom=mb.denom)
        metrics = {"t_critic_loss": time.perf_counter() - t0}
        for name, v in terms.items():
            metrics["term_" + name] = float(losses.masked_mean(v.float(), mb.mask, denom=mb.denom))
        return loss, metrics



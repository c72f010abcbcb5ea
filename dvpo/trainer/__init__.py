"""The thin DVPO trainer (Hugging Face causal LMs, a distributional critic on the fused ops).

    from dvpo.trainer import TrainConfig, train
    summary = train(TrainConfig(algo="dvpo", task="math", noise="flip:0.3", steps=200, seed=0, out="runs/x"))

Importing this package is cheap (transformers is imported when a function runs).
"""

from __future__ import annotations

from .config import SFTConfig, TrainConfig


def train(config: TrainConfig, **kwargs) -> dict:
    """Run (or resume) an RL experiment; returns its summary (see `dvpo.trainer.loop.train`)."""
    from .loop import train as _train

    return _train(config, **kwargs)


def sft(config: SFTConfig, **kwargs) -> str:
    """The SFT warm start's checkpoint dir (trained once per task/model/seed, then cached)."""
    from .sft import sft as _sft

    return _sft(config, **kwargs)


def evaluate_checkpoint(path: str, **kwargs) -> dict:
    """Held-out evaluation of a run dir or a policy checkpoint dir."""
    from .loop import evaluate_checkpoint as _ev

    return _ev(path, **kwargs)


__all__ = ["TrainConfig", "SFTConfig", "train", "sft", "evaluate_checkpoint"]

"""Tasks with exact verifiers for the true reward, and the noise models the trainer sees it through.

    from dvpo.tasks import get_task, parse_noise
    task = get_task("math:1-3")      # name[:levels]
    noise = parse_noise("flip:0.3")
"""

from __future__ import annotations

from .base import BOS, EOS, PAD, Problem, Task, is_heldout
from .noise import NoiseModel, parse_noise

TASKS = ("math", "science", "dialogue")


def get_task(spec: str) -> Task:
    """A task from its spec `name[:levels]`, e.g. "math", "math:1-5", "dialogue:3"."""
    name, _, levels = spec.partition(":")
    if name == "math":
        from .math import MathTask as cls
    elif name == "science":
        from .science import ScienceTask as cls
    elif name == "dialogue":
        from .dialogue import DialogueTask as cls
    else:
        raise ValueError(f"task must be one of {', '.join(TASKS)} (optionally name:levels), got {spec!r}")
    return cls(levels or None)


def tokenizer_for(task: Task):
    """The task's character-level PreTrainedTokenizerFast (built in code)."""
    from .tokenizer import char_tokenizer

    return char_tokenizer(task.alphabet)


__all__ = ["get_task", "tokenizer_for", "parse_noise", "NoiseModel", "Problem", "Task", "is_heldout",
           "TASKS", "PAD", "BOS", "EOS"]

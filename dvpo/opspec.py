"""The kernel interface of every dvpo op, written once: its arguments, their types and its outputs.

Every backend implements each op on flattened tensors (tokens first) and returns per-token values
*and* the gradient with respect to the op's first argument, computed in the same pass (the targets
are detached, so the backward only scales that stored gradient). This table is the one place the
interface is spelled out:

- dvpo/library.py registers the public `dvpo::` custom ops from it (schema, fake outputs, autograd);
- the `cpp` and `cuda` backends forward each op to `torch.ops.dvpo_C` through `forwarder`, which
  coerces the scalars to the schema's types;
- tests/test_opspec.py checks it against everything still written by hand: the C++ schemas
  (csrc/cpu/bindings.cpp, read back from `torch.ops.dvpo_C`), the `reference` and `triton` backends'
  Python signatures, and the fake outputs against a real call.

Outputs are in the accumulation dtype of the first argument (fp64 for fp64, else fp32); the last
output of a differentiable op is the gradient of its first output w.r.t. the first argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from .config import PARAM_NAMES, TERM_NAMES

# The schema types the interface uses, and how a Python value is coerced to each.
_COERCE: Dict[str, Optional[Callable]] = {
    "Tensor": None, "Tensor?": None,
    "float": float, "bool": bool, "str": str,
    "float[]": lambda xs: [float(x) for x in xs],
}


@dataclass(frozen=True)
class Arg:
    name: str
    type: str      # a torch schema type: Tensor, Tensor?, float, bool, str, float[]
    doc: str = ""  # shape or meaning, for the docs and error messages

    def __post_init__(self):
        if self.type not in _COERCE:
            raise ValueError(f"unsupported schema type {self.type!r} for argument {self.name}")


@dataclass(frozen=True)
class Out:
    """An output shaped like the leading `dims` dims of argument `like` (all of them when None),
    followed by `extra` trailing sizes."""
    name: str
    like: str
    dims: Optional[int] = None
    extra: Tuple[int, ...] = ()

    def shape(self, args: Dict[str, object]) -> Tuple[int, ...]:
        lead = tuple(args[self.like].shape)
        return (lead if self.dims is None else lead[:self.dims]) + tuple(self.extra)


@dataclass(frozen=True)
class OpSpec:
    name: str
    args: Tuple[Arg, ...]
    outputs: Tuple[Out, ...]
    differentiable: bool  # the first output is differentiable w.r.t. the first argument
    doc: str

    @property
    def arg_names(self) -> Tuple[str, ...]:
        return tuple(a.name for a in self.args)

    def schema(self) -> str:
        """The torch schema after the op name: `(Tensor pred, ...) -> (Tensor, Tensor)`."""
        args = ", ".join(f"{a.type} {a.name}" for a in self.args)
        return f"({args}) -> ({', '.join('Tensor' for _ in self.outputs)})"

    def coerce(self, values) -> list:
        """The call's arguments with each scalar converted to its schema type."""
        if len(values) != len(self.args):
            raise TypeError(f"dvpo.{self.name} takes {len(self.args)} arguments "
                            f"({', '.join(self.arg_names)}), got {len(values)}")
        out = []
        for a, v in zip(self.args, values):
            conv = _COERCE[a.type]
            out.append(v if conv is None else conv(v))
        return out


OPS: Dict[str, OpSpec] = {spec.name: spec for spec in (
    OpSpec(
        "quantile_huber",
        (Arg("pred", "Tensor", "[T, N] predicted quantiles"), Arg("target", "Tensor", "[T, M] target samples"),
         Arg("taus", "Tensor", "[N]"), Arg("weights", "Tensor?", "[N] or None"), Arg("mask", "Tensor?", "[T] or None"),
         Arg("kappa", "float"), Arg("normalize_kappa", "bool"), Arg("algorithm", "str")),
        (Out("loss", "pred", 1), Out("grad", "pred")),
        True, "quantile Huber loss per token and its gradient w.r.t. pred"),
    OpSpec(
        "cvar",
        (Arg("x", "Tensor", "[T, N] atoms"), Arg("level", "float"), Arg("upper", "bool")),
        (Out("value", "x", 1), Out("coef", "x")),
        True, "CVaR per token and its coefficients (= its gradient w.r.t. x)"),
    OpSpec(
        "critic_loss",
        (Arg("heads", "Tensor", "[T, H, N] quantile heads"), Arg("target", "Tensor", "[T, M] target samples"),
         Arg("taus", "Tensor", "[N]"), Arg("risk_weights", "Tensor", "[N]"), Arg("mask", "Tensor?", "[T] or None"),
         Arg("kappa", "float"), Arg("alpha", "float"), Arg("beta", "float"), Arg("normalize_kappa", "bool"),
         Arg("params", "float[]", f"[{len(PARAM_NAMES)}]: {', '.join(PARAM_NAMES)}"), Arg("algorithm", "str")),
        (Out("total", "heads", 1), Out("terms", "heads", 1, (len(TERM_NAMES),)), Out("grad", "heads")),
        True, "the fused critic loss per token, its unweighted terms, and the gradient w.r.t. heads"),
    OpSpec(
        "distributional_gae",
        (Arg("rewards", "Tensor", "[B, T]"), Arg("values", "Tensor", "[B, T, M]"), Arg("mask", "Tensor", "[B, T]"),
         Arg("gamma", "float"), Arg("lam", "float")),
        (Out("advantages", "values", 2), Out("returns", "values")),
        False, "per-quantile GAE: advantages [B, T] and returns [B, T, M]"),
)}


def forwarder(spec: OpSpec, kernel: Callable) -> Callable:
    """A backend function for `spec` that calls a compiled kernel (e.g. torch.ops.dvpo_C.<op>) with
    the scalars coerced to the schema's types."""
    def call(*values):
        return kernel(*spec.coerce(values))
    call.__name__ = call.__qualname__ = spec.name
    call.__doc__ = f"dvpo.{spec.name}{spec.schema()}: {spec.doc}."
    return call


def describe() -> str:
    """The interface as text (one op a line), for docs and `help`."""
    lines = []
    for spec in OPS.values():
        args = ", ".join(f"{a.name}{'' if not a.doc else ' ' + a.doc}" for a in spec.args)
        outs = ", ".join(o.name for o in spec.outputs)
        lines.append(f"{spec.name}({args}) -> ({outs})")
    return "\n".join(lines)

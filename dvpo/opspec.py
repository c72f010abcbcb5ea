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

Outputs are in the accumulation dtype of the first argument (fp64 for fp64, else fp32). The last
output of a differentiable op is the gradient of its first output w.r.t. the first argument; the loss
ops' and cvar's [T, N]-shaped gradients are in the first argument's own dtype (`Out.dtype` "input"):
bf16 heads get a bf16 gradient, so storing it and the backward's pass over it move half the bytes,
and the backward needs no cast. (reduce_tokens' gradient, one weight per token of its fp32 input,
stays in the accumulation dtype.)
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
    type: str        # a torch schema type: Tensor, Tensor?, float, bool, str, float[]
    shape: str = ""  # for the docs: "[T,N]"; "[12]" for a list

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
    text: str = ""  # the shape for the docs: "[T]"
    dtype: str = "acc"  # "acc": the accumulation dtype of the first argument; "input": its own dtype

    def __post_init__(self):
        if self.dtype not in ("acc", "input"):
            raise ValueError(f"Out.dtype must be 'acc' or 'input', got {self.dtype!r} for output {self.name}")

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
        (Arg("pred", "Tensor", "[T,N]"), Arg("target", "Tensor", "[T,M]"), Arg("taus", "Tensor", "[N]"),
         Arg("weights", "Tensor?", "[N]"), Arg("mask", "Tensor?", "[T]"), Arg("kappa", "float"),
         Arg("normalize_kappa", "bool"), Arg("algorithm", "str")),
        (Out("loss", "pred", 1, text="[T]"), Out("grad", "pred", text="[T,N]", dtype="input")),
        True, "quantile Huber loss per token and its gradient w.r.t. pred"),
    OpSpec(
        "cvar",
        (Arg("x", "Tensor", "[T,N]"), Arg("level", "float"), Arg("upper", "bool")),
        (Out("value", "x", 1, text="[T]"), Out("coef", "x", text="[T,N]", dtype="input")),
        True, "CVaR per token and its coefficients (= its gradient w.r.t. x)"),
    OpSpec(
        "critic_loss",
        (Arg("heads", "Tensor", "[T,H,N]"), Arg("target", "Tensor", "[T,M]"), Arg("taus", "Tensor", "[N]"),
         Arg("risk_weights", "Tensor", "[N]"), Arg("mask", "Tensor?", "[T]"), Arg("kappa", "float"),
         Arg("alpha", "float"), Arg("beta", "float"), Arg("normalize_kappa", "bool"),
         Arg("params", "float[]", f"[{len(PARAM_NAMES)}]"), Arg("algorithm", "str")),
        (Out("total", "heads", 1, text="[T]"), Out("terms", "heads", 1, (len(TERM_NAMES),), f"[T,{len(TERM_NAMES)}]"),
         Out("grad", "heads", text="[T,H,N]", dtype="input")),
        True, "the fused critic loss per token, its unweighted terms, and the gradient w.r.t. heads"),
    OpSpec(
        "distributional_gae",
        (Arg("rewards", "Tensor", "[B,T]"), Arg("values", "Tensor", "[B,T,M]"), Arg("mask", "Tensor", "[B,T]"),
         Arg("gamma", "float"), Arg("lam", "float")),
        (Out("advantages", "values", 2, text="[B,T]"), Out("returns", "values", text="[B,T,M]")),
        False, "per-quantile GAE: advantages and returns"),
    OpSpec(
        "reduce_tokens",
        (Arg("values", "Tensor", "[R,S]"), Arg("mask", "Tensor?", "[R,S]"), Arg("reduction", "str")),
        (Out("loss", "values", 0, text="[]"), Out("weights", "values", text="[R,S]")),
        True, "masked per-token values (a row per sequence) reduced to one number, and its gradient"),
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
    """The interface as text, one op a line (docs/architecture.md quotes it; a test compares)."""
    def arg(a: Arg) -> str:
        if a.type.startswith("Tensor"):
            return f"{a.name}{a.shape}{'?' if a.type.endswith('?') else ''}"
        return f"{a.name}{a.shape}: {a.type}"
    return "\n".join(
        f"{spec.name}({', '.join(arg(a) for a in spec.args)}) -> ({', '.join(o.name + o.text for o in spec.outputs)})"
        for spec in OPS.values())

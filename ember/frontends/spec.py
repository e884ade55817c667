"""What a model takes and gives: names, shapes (with symbolic dims) and dtypes.

Frontends produce an :class:`ImportedModel`; the artifact's manifest stores the specs as plain JSON, and the
runtime checks every call's inputs against them before any kernel runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

Dim = Union[int, str]  # an int is a fixed size; a str names a symbolic dimension ("batch")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[Dim, ...] | None  # None: rank unknown until run time (outputs only)
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": None if self.shape is None else list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], None if d["shape"] is None else tuple(d["shape"]), d["dtype"])

    def describe(self) -> str:
        dims = "..." if self.shape is None else ", ".join(str(s) for s in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


@dataclass
class ImportedModel:
    """A Relax module whose ``main`` takes the model inputs followed by the weights, plus the weights.

    ``mod["main"]`` carries the attribute ``num_input`` (the count of real inputs), which is what
    ``relax.transform.LiftTransformParams`` needs to separate weight-only computation from the model.
    """

    mod: object  # tvm.IRModule
    params: list  # numpy arrays, in the order of main's weight parameters
    param_names: list[str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec] = field(default_factory=list)
    source: str = ""  # what the user handed us, for messages and the manifest


def shape_of(ty) -> tuple[Dim, ...] | None:
    """Turn a Relax TensorType's shape into ints and names of symbolic dims (None: rank unknown).

    A dim the importer could not express (data-dependent, e.g. NonZero's output) is named "?".
    """
    if ty.shape is None:
        ndim = int(ty.ndim)
        return None if ndim < 0 else tuple("?" for _ in range(ndim))
    dims = []
    for d in ty.shape.values:
        if hasattr(d, "value"):
            dims.append(int(d.value))
        else:
            dims.append(str(d))
    return tuple(dims)


def output_specs(mod, names: list[str] | None = None) -> list[TensorSpec]:
    """Output specs from the return struct info of ``main`` (a tensor or a flat tuple of tensors)."""
    from tvm import relax

    ret = mod["main"].ret_ty
    fields = list(ret.fields) if hasattr(ret, "fields") else [ret]
    specs = []
    for i, f in enumerate(fields):
        if not isinstance(f, relax.TensorType):
            raise NotImplementedError(f"model output {i} is {f}, not a tensor; nested outputs are not supported")
        name = names[i] if names and i < len(names) else f"output{i}"
        specs.append(TensorSpec(name, shape_of(f), str(f.dtype)))
    return specs

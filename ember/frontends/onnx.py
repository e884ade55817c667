"""ONNX → Relax.

Accepts a path to a ``.onnx`` file or an ``onnx.ModelProto``. Weights stored as external data are read only
from inside the model's own folder: a location that is absolute or climbs out of it (``../``, a symlink) is
refused, because a model file must not be able to make ember read arbitrary files.
"""

from __future__ import annotations

import copy
import os

from ..errors import ModelLoadError, UnsupportedOpError
from ..passes.matmul_broadcast import DropMatmulBroadcast
from .onnx_rewrite import fold_constant_of_shape, fold_shape_arithmetic
from .spec import ImportedModel, TensorSpec, output_specs, shape_of

BATCH = "batch"


def _read(path: str):
    import onnx
    from google.protobuf.message import DecodeError

    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path}: is a directory; pass the .onnx file inside it")
    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not an ONNX model (the protobuf does not parse: {e})") from None
    # Protobuf parses many non-ONNX files as an empty message; a real model has a graph with outputs.
    if model.ir_version <= 0 or len(model.graph.output) == 0:
        raise ModelLoadError(f"{path}: not an ONNX model (no IR version or no graph outputs)")
    return model


def _load_external_data(model, base_dir: str | None, source: str):
    from onnx import external_data_helper as edh

    tensors = [t for t in edh._get_all_tensors(model) if edh.uses_external_data(t)]
    if not tensors:
        return model
    if base_dir is None:
        raise ModelLoadError(f"{source}: the model keeps weights in external files; pass the path of the .onnx "
                             "file (not a ModelProto) so ember knows the folder to read them from")
    root = os.path.realpath(base_dir)
    for t in tensors:
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        full = os.path.realpath(os.path.join(root, loc))
        if os.path.isabs(loc) or os.path.commonpath([root, full]) != root:
            raise ModelLoadError(f"{source}: initializer '{t.name}' points to external data at '{loc}', outside "
                                 f"the model's folder {root}; move the data file next to the model")
        if not os.path.isfile(full):
            raise ModelLoadError(f"{source}: initializer '{t.name}' needs external data file '{loc}', which is "
                                 f"missing from {root}")
    edh.load_external_data_for_model(model, root)
    return model


def _check_ops(model, source: str):
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | {"If", "Constant"}
    bad: dict[str, list[str]] = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type not in known or (node.domain not in ("", "ai.onnx")):
            bad.setdefault(f"{node.domain + '.' if node.domain else ''}{node.op_type}", []).append(
                node.name or f"#{i}")
    if bad:
        parts = [f"{op} (node{'s' if len(n) > 1 else ''} {', '.join(repr(x) for x in n[:3])}"
                 f"{' …' if len(n) > 3 else ''})" for op, n in bad.items()]
        raise UnsupportedOpError(
            f"{source}: unsupported ONNX operator(s): {'; '.join(parts)}. Replace them in the exporting code, or "
            "file an issue with the model.", ops=list(bad), nodes=[x for n in bad.values() for x in n])


def _input_specs(model, dynamic_batch: bool):
    from onnx import helper

    init = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in init:
            continue
        tt = vi.type.tensor_type
        shape = []
        for j, d in enumerate(tt.shape.dim):
            if dynamic_batch and j == 0:
                shape.append(BATCH)
            elif d.HasField("dim_value"):
                shape.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                shape.append(d.dim_param)
            else:
                shape.append(f"{vi.name}_dim{j}")
        dtype = str(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        specs.append(TensorSpec(vi.name, tuple(shape), dtype))
    return specs


def import_onnx(model, *, dynamic_batch=False, input_names=None, output_names=None) -> ImportedModel:
    import onnx
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    if isinstance(model, (str, os.PathLike)):
        source = os.fspath(model)
        proto = _read(source)
        proto = _load_external_data(proto, os.path.dirname(os.path.abspath(source)), source)
    elif isinstance(model, onnx.ModelProto):
        source = model.graph.name or "<ModelProto>"
        proto = _load_external_data(copy.deepcopy(model), None, source)
    else:
        raise ModelLoadError(f"cannot read an ONNX model from {type(model).__name__}")
    _check_ops(proto, source)
    fold_shape_arithmetic(proto)
    fold_constant_of_shape(proto)
    specs = _input_specs(proto, dynamic_batch)
    if input_names or output_names:
        raise ModelLoadError("input_names/output_names are for torch models; an ONNX model names its own inputs "
                             f"({', '.join(s.name for s in specs)}) and outputs")
    from tvm import tirx as tir

    sym: dict = {}  # one tir.Var per symbolic dim name, so inputs that share "batch" share the variable
    shape_dict = {s.name: [d if isinstance(d, int) else sym.setdefault(d, tir.Var(d, "int64")) for d in s.shape]
                  for s in specs}
    dtype_dict = {s.name: s.dtype for s in specs}
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None)
    try:
        mod = from_onnx(proto, shape_dict=shape_dict, dtype_dict=dtype_dict, opset=opset,
                        keep_params_in_input=True)
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise ModelLoadError(f"{source}: TVM's ONNX importer failed: {type(e).__name__}: "
                             f"{msg[-1] if msg else ''}") from e
    mod, params = relax.frontend.detach_params(mod)
    mod = DropMatmulBroadcast(mod)  # Expand + MatMul: weights would be stored once per batch element
    func = mod["main"]
    n_in = int(func.attrs["num_input"])
    if n_in != len(specs):
        raise ModelLoadError(f"{source}: expected {len(specs)} graph inputs, the importer made {n_in}")
    # Shapes as the importer resolved them (it may refine unknown dims), names as the user wrote them.
    specs = [TensorSpec(s.name, shape_of(v.ty), str(v.ty.dtype))
             for s, v in zip(specs, func.params[:n_in])]
    weights = [p.numpy() for p in params.get("main", [])]
    param_names = [v.name for v in func.params[n_in:]]
    outs = output_specs(mod, [o.name for o in proto.graph.output])
    return ImportedModel(mod, weights, param_names, specs, outs, source=source)


"""PyTorch → Relax through ``torch.export``.

Accepts an ``nn.Module`` with example inputs, an ``ExportedProgram``, or a ``.pt2`` file written by
``torch.export.save``. With ``dynamic_batch=True`` dimension 0 of every input becomes the symbolic ``batch``.
The weights are kept as parameters of ``main`` (not baked in as constants) so the compiler can transform them
once, ahead of time, and the artifact can store them beside the library.
"""

from __future__ import annotations

import os
import re

import numpy as np

from ..errors import ModelLoadError, UnsupportedOpError
from ..passes.matmul_broadcast import DropMatmulBroadcast
from .spec import ImportedModel, TensorSpec, output_specs, shape_of

BATCH = "batch"
_MAX_BATCH = 65536


def _to_torch(x):
    import torch

    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise ModelLoadError(f"example input of type {type(x).__name__} is not a torch tensor or numpy array")


def _export(model, example_inputs, dynamic_batch: bool):
    import torch

    if example_inputs is None:
        raise ModelLoadError("a torch model needs example_inputs: a tuple with one tensor per forward() argument")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    args = tuple(_to_torch(a) for a in example_inputs)
    dynamic_shapes = None
    if dynamic_batch:
        # torch.export specializes a size-1 dimension to the constant 1, so trace with batch 2 when the
        # example has batch 1; the compiled model accepts any batch size all the same.
        if any(a.dim() == 0 for a in args):
            raise ModelLoadError("dynamic_batch needs every input to have a batch dimension (dim 0)")
        if all(a.shape[0] == 1 for a in args):
            args = tuple(torch.cat([a, a], dim=0) for a in args)
        batch = torch.export.Dim(BATCH, min=1, max=_MAX_BATCH)
        dynamic_shapes = tuple({0: batch} for _ in args)
    model = model.eval()
    try:
        with torch.no_grad():
            return torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
    except Exception as e:  # torch's own message is the useful part; say which step failed
        raise ModelLoadError(f"torch.export could not trace {type(model).__name__}: {e}") from e


def _unsupported(ep, message: str) -> UnsupportedOpError:
    ops = re.findall(r"'([^']+)'", message)

    def norm(n: str) -> str:
        return n.split(".")[0].lstrip("_")

    wanted = {norm(o) for o in ops}

    def find(graph):
        found = []
        for node in graph.nodes:
            name = getattr(node.target, "__name__", str(node.target))
            if node.op == "call_function" and norm(name) in wanted:
                where = [ln.strip() for ln in (node.meta.get("stack_trace") or "").strip().splitlines()]
                code = next((ln for ln in reversed(where) if ln.startswith("File ")), "")
                found.append(f"node '{node.name}' ({name}){' ' + code if code else ''}")
        return found

    nodes = find(ep.graph)
    if not nodes:  # the op appeared only after decomposition: look where the importer looked
        try:
            nodes = find(ep.run_decompositions().graph)
        except Exception:  # the message is still useful without node names
            nodes = []
    listed = "; ".join(nodes[:5]) or "the model"
    return UnsupportedOpError(
        f"the torch model uses operator(s) ember cannot import yet: {', '.join(ops)} — in {listed}. "
        "Rewrite that part of the model with supported operations, or export it to ONNX and compile that.",
        ops=ops, nodes=nodes)


def import_torch(model, example_inputs=None, *, dynamic_batch=False, input_names=None,
                 output_names=None) -> ImportedModel:
    import torch
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    source = type(model).__name__
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.exists(path):
            raise ModelLoadError(f"{path}: no such file (expected a .pt2 saved with torch.export.save or an .onnx)")
        try:
            model = torch.export.load(path)
        except Exception as e:
            raise ModelLoadError(f"{path}: not a torch.export program ({e}); save one with torch.export.save") from e
        source = path
    if isinstance(model, torch.export.ExportedProgram):
        ep = model
    elif isinstance(model, torch.nn.Module):
        ep = _export(model, example_inputs, dynamic_batch)
    else:
        raise ModelLoadError(f"cannot compile an object of type {type(model).__name__}: pass a torch.nn.Module, "
                             "an ExportedProgram, an ONNX ModelProto or a path to a .pt2/.onnx file")
    try:
        mod = from_exported_program(ep, keep_params_as_input=True, unwrap_unit_return_tuple=False)
    except AssertionError as e:
        if "Unsupported function types" in str(e):
            raise _unsupported(ep, str(e)) from None
        raise
    mod, params = relax.frontend.detach_params(mod)
    # torch.export records the batch Dim's max (65536) as the symbol's upper bound; TVM's memory planner would
    # then reserve every batch-sized buffer at that bound (tens of GB for MiniLM). Without it, those buffers
    # are allocated per call at the actual batch size.
    if "tir_var_upper_bound" in (mod["main"].attrs or {}):
        mod["main"] = mod["main"].without_attr("tir_var_upper_bound")
    # expand + bmm of non-contiguous linears would otherwise store weights copied per batch (see the pass)
    mod = DropMatmulBroadcast(mod)
    weights = [p.numpy() for p in params.get("main", [])]
    func = mod["main"]
    n_in = int(func.attrs["num_input"])
    user_inputs = list(ep.graph_signature.user_inputs)
    names = list(input_names) if input_names else user_inputs
    if len(names) != n_in:
        raise ModelLoadError(f"input_names has {len(names)} names but the model takes {n_in} inputs")
    inputs = [TensorSpec(names[i], shape_of(v.ty), str(v.ty.dtype))
              for i, v in enumerate(func.params[:n_in])]
    outputs = output_specs(mod, list(output_names) if output_names else None)
    if output_names and len(output_names) != len(outputs):
        raise ModelLoadError(f"output_names has {len(output_names)} names but the model returns {len(outputs)} "
                             "outputs")
    if dynamic_batch:
        # torch names the symbol after its solver (s97); users and the manifest call it "batch".
        sym = {s.shape[0]: BATCH for s in inputs if isinstance(s.shape[0], str)}
        inputs = [TensorSpec(s.name, (BATCH,) + s.shape[1:], s.dtype) for s in inputs]
        outputs = [TensorSpec(o.name, o.shape and tuple(sym.get(d, d) for d in o.shape), o.dtype) for o in outputs]
    param_names = [v.name for v in func.params[n_in:]]
    # torch.export names outputs after the graph node that made them ("linear_2"), which means nothing to a
    # user; outputs are output0, output1, ... in the order forward() returns them.
    return ImportedModel(mod, weights, param_names, inputs, outputs, source=source)

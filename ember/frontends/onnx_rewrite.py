"""ONNX graph rewrites ember applies before TVM's importer, for patterns real exporters emit that the importer
mishandles.

``fold_constant_of_shape``: ``ConstantOfShape`` whose shape is a constant becomes a ``Constant``. PyTorch's
exporter writes ``ConstantOfShape(shape=[])`` (an empty shape: a scalar) for BERT-style models; TVM 0.27's
importer broadcasts that to a 1-d tensor and fails ("broadcast_to expects ... ndim 0").

    before:  c = Constant(value=int64[0] {})      y = ConstantOfShape(c, value=float[1] {1.0})
    after:   y = Constant(value=float[] 1.0)
"""

from __future__ import annotations

import numpy as np


def _constants(graph) -> dict:
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(a.t)
    return values


def fold_constant_of_shape(model) -> int:
    """Rewrite in place; returns how many nodes were folded."""
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = _constants(graph)
    folded = 0
    for i, node in enumerate(list(graph.node)):
        if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx"):
            continue
        shape = consts.get(node.input[0]) if node.input else None
        if shape is None:
            continue
        fill = np.zeros(1, np.float32)
        for a in node.attribute:
            if a.name == "value":
                fill = numpy_helper.to_array(a.t).reshape(-1)
        value = np.full(tuple(int(d) for d in shape.reshape(-1)), fill[0], dtype=fill.dtype)
        const = helper.make_node("Constant", [], [node.output[0]], name=(node.name or f"cos{i}") + "_folded",
                                 value=numpy_helper.from_array(value))
        graph.node.remove(node)
        graph.node.insert(i, const)
        folded += 1
    return folded


# Ops cheap enough to evaluate at import time when all their inputs are constants (shape arithmetic).
_FOLDABLE = {
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not",
    "And", "Or", "Where", "Cast", "Concat", "Gather", "Unsqueeze", "Squeeze", "Slice", "Reshape", "Range",
    "Expand", "ConstantOfShape", "Min", "Max", "Floor", "Ceil", "Sqrt", "Identity", "Tile", "Transpose",
    "ReduceProd", "ReduceSum", "CumSum", "Trilu", "Mod",
}
_MAX_FOLDED_ELEMENTS = 1 << 16  # never bake large tensors into the graph: this pass is for shape arithmetic


def _static_shapes(model) -> dict:
    """Value name -> list of dims (int, or None when symbolic) from ONNX shape inference."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference is an optimisation here; without it nothing is folded
        return {}
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    return shapes


def fold_shape_arithmetic(model) -> int:
    """Evaluate shape computations whose values are known at import time; returns how many nodes were folded.

    ``Shape(x)`` followed by ``Gather``/``Slice`` of static dims of x, and then any cheap op whose inputs are all
    constant, become ``Constant`` nodes. Exporters build position ids and masks from ``Shape`` → ``Range``;
    TVM's importer turns those into data-dependent shapes the VM cannot compute ("has not been computed"),
    whereas with a static sequence length they are plain constants.

        before:  s = Shape(ids)  n = Gather(s, 1)  r = Range(0, n, 1)      (ids: int64[batch, 128])
        after:   r = Constant(int64[128] {0, 1, ..., 127})
    """
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    consts = _constants(graph)
    shapes = _static_shapes(model)
    partial: dict = {}  # Shape outputs with some symbolic dims: value name -> dims (int or None)
    folded = 0
    new_nodes = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or len(node.output) != 1 or not node.output[0]:
            new_nodes.append(node)
            continue
        value = None
        ins = list(node.input)
        if node.op_type == "Shape" and ins and ins[0] in shapes:
            dims = shapes[ins[0]]
            attrs = {a.name: a.i for a in node.attribute}
            start, end = attrs.get("start", 0), attrs.get("end", len(dims))
            sel = dims[slice(start, end)]
            if sel and all(d is not None for d in sel):
                value = np.array(sel, np.int64)
            else:
                partial[node.output[0]] = sel  # so that Gather(Shape(x), i) of a static dim folds below
        elif node.op_type == "Gather" and len(ins) == 2 and ins[0] in partial and ins[1] in consts:
            idx = consts[ins[1]]
            picked = [partial[ins[0]][int(i)] for i in np.asarray(idx).reshape(-1)]
            if all(d is not None for d in picked):
                value = np.array(picked, np.int64).reshape(np.asarray(idx).shape)
        elif node.op_type in _FOLDABLE and ins and all((not i) or i in consts for i in ins):
            try:
                inputs = [numpy_helper.from_array(np.asarray(consts[i]), f"i{k}") if i else None
                          for k, i in enumerate(ins)]
                names = [f"i{k}" if i else "" for k, i in enumerate(ins)]
                one = helper.make_node(node.op_type, names, ["o"], **{
                    a.name: helper.get_attribute_value(a) for a in node.attribute})
                g = helper.make_graph([one], "fold", [], [helper.make_empty_tensor_value_info("o")],
                                      [t for t in inputs if t is not None])
                m = helper.make_model(g, opset_imports=list(model.opset_import))
                out = ReferenceEvaluator(m).run(None, {})[0]
                if np.asarray(out).size <= _MAX_FOLDED_ELEMENTS:
                    value = np.asarray(out)
            except Exception:  # anything the reference evaluator cannot do stays for TVM to import
                value = None
        if value is None:
            new_nodes.append(node)
            continue
        consts[node.output[0]] = value
        new_nodes.append(helper.make_node("Constant", [], [node.output[0]], name=(node.name or "n") + "_folded",
                                          value=numpy_helper.from_array(value)))
        folded += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    return folded

"""Find the quantizable layers of an imported Relax ``main`` and rewrite them into calls of the quantized kernels.

What is matched (weights are parameters of ``main`` after ``num_input``, float32):

    lv  = R.permute_dims(w, axes=[1, 0])        # nn.Linear from the torch frontend: w is [N, K]
    y   = R.matmul(x, lv)                        # or R.matmul(x, w) with w [K, N] (ONNX MatMul / Gemm)
    out = R.add(bias, y)                         # optional, fused when y has no other use and bias is [N]
    emb = R.take(table, ids, axis=0)             # embedding tables (weight-only schemes)

INT8 schemes on CPU targets also match ``R.nn.conv2d`` (+ bias, + BatchNorm): see :mod:`.conv`.

Anything else — a weight that is not float32, already packed by another pass (N:M sparsity), 1-D, or used in
some other op — is left as it is. The rewrite (see :class:`Rewriter`) turns a site into

    x2  = R.reshape(x, [-1, K])
    y2  = R.call_tir(ember_wo4_matmul, (x2, qweight, scales[, zeros][, bias]), [M, N])   # weight-only
    # or: (codes, xs) = R.call_tir(ember_quantize_activations, (x2[, clip]), ...)
    #     y2 = R.call_tir(ember_int8_matmul, (codes, wpacked, wsum, xs, wscale[, bias]), [M, N])
    out = R.reshape(y2, [..., N])

and ``main`` then takes the quantized arrays as new weight parameters instead of the fp32 ones.

Dynamic INT8 also fuses producers (:func:`find_norms`): ``layer_norm(add(a, r))`` whose output only int8 sites
quantize becomes one ``layernorm_quantize`` call returning (y, codes, scale), and the sites use those codes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tvm
from tvm import relax

_MATMUL = tvm.ir.Op.get("relax.matmul")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_ADD = tvm.ir.Op.get("relax.add")
_TAKE = tvm.ir.Op.get("relax.take")
_RESHAPE = tvm.ir.Op.get("relax.reshape")
_GELU = tvm.ir.Op.get("relax.nn.gelu")
_LAYER_NORM = tvm.ir.Op.get("relax.nn.layer_norm")


def sinfo(expr):
    return getattr(expr, "struct_info", None) or getattr(expr, "ty", None)


def dtype_of(expr) -> str:
    return str(getattr(sinfo(expr), "dtype", ""))


def static_shape(expr):
    """Static int shape of a tensor expression, or None."""
    si = sinfo(expr)
    shape = getattr(si, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    out = []
    for d in shape.values:
        if not hasattr(d, "value"):
            return None
        out.append(int(d.value))
    return tuple(out)


@dataclass
class Site:
    """One quantizable layer."""

    kind: str  # "matmul" or "embedding"
    name: str  # the weight parameter's name (what the report calls the layer)
    weight_index: int  # index into ImportedModel.params
    transposed: bool  # matmul weight stored [N, K] (nn.Linear) rather than [K, N]
    k: int  # reduction size (embedding: row length D)
    n: int  # output columns (embedding: table rows V)
    x: relax.Expr = None  # matmul activation input (embedding: the ids)
    # The tensor x was reshaped from (last dim K), if any: the torch frontend gives the q, k and v projections one
    # reshape each of the same hidden state, so sites sharing a source share its run-time quantization.
    x_src: relax.Expr = None
    out_var: relax.Var = None  # the binding whose value the rewrite replaces
    skip_vars: list = field(default_factory=list)  # bindings made dead by the rewrite (the un-fused matmul)
    bias_index: int | None = None
    activation: str | None = None  # "gelu": the erf GELU that is the matmul's only consumer, in the epilogue
    out_shape: list | None = None  # shape of out_var when it is not x's leading dims + [N] (fused through a reshape)
    conv: object = None  # kind "conv2d": the conv's geometry (conv.ConvSpec)
    conv_bias: tuple | None = None  # conv2d: the fused bias, ("param", index) or ("const", array)
    bn: dict | None = None  # conv2d: the inference BatchNorm folded into the weights (conv.find_conv_sites)


def find_sites(func: relax.Function, param_names: list[str], embeddings: bool, activations: bool = False,
               convs: bool = False) -> list[Site]:
    """activations: also fuse a GELU that is a matmul's only consumer (for kernels with an activation epilogue).
    convs: also NCHW conv2d layers (+ bias, + BatchNorm), see :mod:`.conv` (INT8 schemes on CPU targets)."""
    n_in = int(func.attrs["num_input"])
    weights = {p: i for i, p in enumerate(func.params[n_in:])}
    bindings, uses = {}, {}
    blocks = func.body.blocks
    for block in blocks:
        for b in block.bindings:
            if isinstance(b, relax.VarBinding):
                bindings[b.var] = b.value
            value = b.value
            for v in relax.analysis.free_vars(value) if not isinstance(value, relax.Var) else [value]:
                uses[v] = uses.get(v, 0) + 1
    ret = func.body.body
    for v in relax.analysis.free_vars(ret) if not isinstance(ret, relax.Var) else [ret]:
        uses[v] = uses.get(v, 0) + 1

    def fp32_weight(v):
        return isinstance(v, relax.Var) and v in weights and dtype_of(v) == "float32"

    sites: list[Site] = []
    by_matmul = {}
    for var, value in bindings.items():
        if not isinstance(value, relax.Call):
            continue
        if value.op.same_as(_MATMUL) and len(value.args) == 2:
            x, w = value.args
            if dtype_of(x) != "float32" or getattr(sinfo(x), "ndim", 0) < 2:
                continue
            xshape = getattr(sinfo(x), "shape", None)
            if xshape is None or not hasattr(xshape.values[-1], "value"):
                continue
            transposed = False
            if not fp32_weight(w):
                prod = bindings.get(w) if isinstance(w, relax.Var) else None
                if not (isinstance(prod, relax.Call) and prod.op.same_as(_PERMUTE) and fp32_weight(prod.args[0])):
                    continue
                axes = prod.attrs.axes
                if axes is not None and [int(a) for a in axes] != [1, 0]:
                    continue
                w, transposed = prod.args[0], True
            wshape = static_shape(w)
            if wshape is None or len(wshape) != 2:
                continue
            n, k = wshape if transposed else wshape[::-1]
            if int(xshape.values[-1].value) != k:
                continue
            site = Site("matmul", param_names[weights[w]], weights[w], transposed, k, n, x=x, out_var=var)
            src = x
            while isinstance(src, relax.Var) and isinstance(bindings.get(src), relax.Call) \
                    and bindings[src].op.same_as(_RESHAPE):
                nxt = bindings[src].args[0]
                nshape = getattr(sinfo(nxt), "shape", None)
                if dtype_of(nxt) != "float32" or nshape is None or not hasattr(nshape, "values") \
                        or not nshape.values or getattr(nshape.values[-1], "value", None) != k:
                    break
                src = nxt
            site.x_src = src if src is not x else None
            sites.append(site)
            by_matmul[var] = site
        elif embeddings and value.op.same_as(_TAKE) and fp32_weight(value.args[0]):
            axis = value.attrs.axis
            shape = static_shape(value.args[0])
            if shape is None or len(shape) != 2 or (axis is not None and int(axis) != 0):
                continue
            if "int" not in dtype_of(value.args[1]):
                continue
            w = value.args[0]
            sites.append(Site("embedding", param_names[weights[w]], weights[w], False, shape[1], shape[0],
                              x=value.args[1], out_var=var))
    # Fuse a bias add that is the matmul's only consumer.
    for var, value in bindings.items():
        if not (isinstance(value, relax.Call) and value.op.same_as(_ADD)):
            continue
        a, b = value.args
        mm, bias = (a, b) if a in by_matmul else (b, a)
        site = by_matmul.get(mm)
        if site is None or uses.get(mm, 0) != 1 or not fp32_weight(bias) or static_shape(bias) != (site.n,):
            continue
        if site.bias_index is not None:
            continue
        site.bias_index = weights[bias]
        site.skip_vars.append(site.out_var)
        site.out_var = var
    if activations:  # y = gelu(matmul (+ bias)): the FFN's first layer; GELU then costs no pass over y
        by_out = {s.out_var: s for s in sites if s.kind == "matmul"}
        for var, value in bindings.items():
            if not (isinstance(value, relax.Call) and value.op.same_as(_GELU) and len(value.args) == 1):
                continue
            arg, through = value.args[0], None
            prod = bindings.get(arg) if isinstance(arg, relax.Var) else None
            if arg not in by_out and isinstance(prod, relax.Call) and prod.op.same_as(_RESHAPE) \
                    and uses.get(arg, 0) == 1:
                arg, through = prod.args[0], arg  # gelu(reshape(y)): the torch frontend's [M, N] -> [B, S, N]
            site = by_out.get(arg)
            if site is None or uses.get(site.out_var, 0) != 1:
                continue
            site.activation = "gelu"
            site.skip_vars += [site.out_var] + ([through] if through is not None else [])
            site.out_var = var
            site.out_shape = list(sinfo(var).shape.values)
    if convs:
        from .conv import find_conv_sites

        sites += find_conv_sites(bindings, uses, weights, param_names)
        order = {v: i for i, v in enumerate(bindings)}
        sites.sort(key=lambda s: min(order.get(v, 0) for v in [s.out_var] + s.skip_vars))  # graph order
    return sites


@dataclass
class NormSite:
    """``y = layer_norm(a (+ r))`` over the last axis whose output every consumer quantizes the same way: the
    kernel :func:`~.kernels.layernorm_quantize` writes y and its codes, so no separate quantize pass reads y."""

    var: relax.Var  # the layer_norm binding
    a: relax.Expr
    r: relax.Expr | None  # the residual added just before (that add is fused: skip_var)
    gamma: relax.Expr
    beta: relax.Expr
    eps: float
    k: int
    qmax: int
    skip_var: relax.Var | None = None


def find_norms(func: relax.Function, sites: list[Site], plans: dict, lanes: int) -> dict:
    """layer_norm bindings to fuse with the quantizer of the int8 sites that read them (dynamic, per token, no
    smoothing: the only scheme whose scale depends on the row alone). Returns {layer_norm var: NormSite}."""
    bindings, uses = {}, {}
    for block in func.body.blocks:
        for b in block.bindings:
            if isinstance(b, relax.VarBinding):
                bindings[b.var] = b.value
            value = b.value
            for v in relax.analysis.free_vars(value) if not isinstance(value, relax.Var) else [value]:
                uses[v] = uses.get(v, 0) + 1
    consumers = {}
    for s in sites:
        if s.kind == "matmul":
            consumers.setdefault(s.x_src if s.x_src is not None else s.x, []).append(s)
    out = {}
    for var, readers in consumers.items():
        value = bindings.get(var) if isinstance(var, relax.Var) else None
        if not (isinstance(value, relax.Call) and value.op.same_as(_LAYER_NORM)) or dtype_of(var) != "float32":
            continue
        qp = [plans[s.name] for s in readers]
        if any(p["scheme"] != "int8" or not p["per_token"] or p["static"] or p.get("smooth") is not None
               for p in qp) or len({p["act_bits"] for p in qp}) != 1:
            continue
        attrs = value.attrs
        shape = static_shape(var)
        if shape is None or not attrs.center or not attrs.scale or shape[-1] % lanes:
            continue
        axes = [int(a) for a in attrs.axes]
        if axes not in ([-1], [len(shape) - 1]):
            continue
        x, gamma, beta = value.args
        ns = NormSite(var, x, None, gamma, beta, float(attrs.epsilon), shape[-1],
                      (1 << (qp[0]["act_bits"] - 1)) - 1)
        prod = bindings.get(x) if isinstance(x, relax.Var) else None
        if isinstance(prod, relax.Call) and prod.op.same_as(_ADD) and uses.get(x, 0) == 1 \
                and all(static_shape(t) == shape and dtype_of(t) == "float32" for t in prod.args):
            ns.a, ns.r, ns.skip_var = prod.args[0], prod.args[1], x
        out[var] = ns
    return out


@relax.expr_functor.mutator
class Rewriter(relax.PyExprMutator):
    """Replace each site's binding by what ``emit(builder, site, x)`` returns (see module docstring)."""

    def __init__(self, mod, sites, emit, norms=None):
        super().__init__(mod)
        self.by_out = {s.out_var: s for s in sites}
        self.skip = {v for s in sites for v in s.skip_vars}
        self.norms = norms or {}
        self.skip |= {n.skip_var for n in self.norms.values() if n.skip_var is not None}
        self.emit = emit

    def visit_var_binding_(self, binding):
        norm = self.norms.get(binding.var)
        if norm is not None:
            ins = [None if e is None else self.visit_expr(e) for e in (norm.a, norm.r, norm.gamma, norm.beta)]
            self.set_var_remap(binding.var, self.emit.norm(self.builder_, norm, *ins))
            return
        site = self.by_out.get(binding.var)
        if site is not None:
            x = self.visit_expr(site.x)
            src = self.visit_expr(site.x_src) if site.x_src is not None else x
            new = self.emit(self.builder_, site, x, src)
            self.set_var_remap(binding.var, new)
            return
        if binding.var in self.skip:
            return  # the fused matmul: its only consumer (the bias add) is rewritten
        super().visit_var_binding_(binding)


def leading_rows(x):
    """The product of x's leading dims (the row count M of the flattened [M, K] matmul), and those dims."""
    dims = list(sinfo(x).shape.values[:-1])
    m = dims[0]
    for d in dims[1:]:
        m = m * d
    return m, dims


def rebuild_main(func: relax.Function, new_body_func: relax.Function, new_params: list) -> tuple:
    """``main`` with the rewritten body, keeping only the weight parameters still used, then the new ones.

    Returns (function, kept old weight indices)."""
    n_in = int(func.attrs["num_input"])
    cleaned = relax.analysis.remove_all_unused(new_body_func)
    used = set(relax.analysis.free_vars(cleaned.body))
    kept = [i for i, p in enumerate(cleaned.params[n_in:]) if p in used]
    params = list(cleaned.params[:n_in]) + [cleaned.params[n_in + i] for i in kept] + list(new_params)
    ret = getattr(cleaned, "ret_struct_info", None) or getattr(cleaned, "ret_ty", None)
    out = relax.Function(params, cleaned.body, ret, cleaned.is_pure, cleaned.attrs)
    return out, kept

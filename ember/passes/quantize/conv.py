"""INT8 convolutions: which conv2d layers are quantized, their weights, and the numpy reference of the math.

Matched (the graph as the frontends import it; ``compress`` runs before ``prepare``, so before BatchNorm folding
and before the layout pass turns convs into NHWC)::

    y  = R.nn.conv2d(x, w, strides, padding, dilation, groups=1)   # NCHW / OIHW, w a float32 weight [O, C, KH, KW]
    y  = R.add(y, R.reshape(bias, [1, O, 1, 1]))                   # optional (torch bias=True, ONNX Conv B)
    z  = R.nn.batch_norm(y, gamma, beta, mean, var, axis=1)[0]     # optional, inference mode: folded in numpy
    z  = R.nn.relu(z)                                               # optional: in the kernel's epilogue

x must have static C, H, W (the batch may be symbolic). Skipped, left fp32: grouped / depthwise convs
(groups > 1), other layouts, conv1d/conv3d, weights that are not float32 parameters. The rewrite
(:meth:`.emit.Emitter._conv`) turns a site into::

    (codes, xs) = R.call_tir(ember_conv_quantize, (x[, clip]), ...)        # padded NHWC uint8 codes, scale [1]
    y2 = R.call_tir(ember_int8_conv2d, (codes, wpacked, wsum, xs, wscale[, bias]), [B, O, OH*OW])
    z  = R.reshape(y2, [B, O, OH, OW])

Weights: symmetric int8 per output channel (BatchNorm scale folded in first), packed for the VNNI dot product
with K ordered (ky, kx, c) and C padded to a multiple of 4. Activations: one scale per tensor (dynamic: max |x|
at run time; static: the calibrated clip) — a per-row (per-token) scale has no meaning for an input pixel that
belongs to KH*KW patches, so ``granularity="token"`` quantizes convs per tensor too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from . import qmath
from .graph import Site, dtype_of, sinfo, static_shape

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_ADD = tvm.ir.Op.get("relax.add")
_RESHAPE = tvm.ir.Op.get("relax.reshape")
_BATCH_NORM = tvm.ir.Op.get("relax.nn.batch_norm")
_RELU = tvm.ir.Op.get("relax.nn.relu")
_CONST_TYPE = type(relax.const(0.0))


@dataclass(frozen=True)
class ConvSpec:
    c: int
    h: int
    w: int
    o: int
    kernel: tuple  # (KH, KW)
    strides: tuple
    dilation: tuple
    pads: tuple  # (top, left, bottom, right)

    @property
    def out_hw(self) -> tuple:
        pt, pl, pb, pr = self.pads
        oh = (self.h + pt + pb - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.strides[0] + 1
        ow = (self.w + pl + pr - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.strides[1] + 1
        return oh, ow


def _ints(arr, n):
    vals = [int(v) for v in arr]
    return tuple(vals * n if len(vals) == 1 else vals)


def _pads(padding) -> tuple:
    p = [int(v) for v in padding]
    if len(p) == 1:
        return (p[0],) * 4
    if len(p) == 2:
        return (p[0], p[1], p[0], p[1])
    return tuple(p)


def _too_deep(wshape) -> bool:
    """The uint8 x int8 products of one output summed in int32 could overflow beyond ~66k terms (255*127 each)."""
    return -(-wshape[1] // 4) * 4 * wshape[2] * wshape[3] > (2**31 - 1) // (255 * 127)


def _fp32_out(attrs) -> bool:
    """out_dtype float32 or unset (the ONNX importer leaves it None: the input's dtype)."""
    return attrs.out_dtype is None or str(attrs.out_dtype) in ("", "float32", "void")


def find_conv_sites(bindings: dict, uses: dict, weights: dict, param_names: list) -> list:
    """Conv sites of one Relax function (``bindings`` var → value, ``uses`` var → count, ``weights`` the weight
    parameters → index). Returns :class:`~.graph.Site` objects with ``kind="conv2d"``."""

    def fp32_weight(v):
        return isinstance(v, relax.Var) and v in weights and dtype_of(v) == "float32"

    def value_of(e):
        """A weight-only value: ("param", index), ("const", array), or ("reshape", inner) through reshapes."""
        if isinstance(e, _CONST_TYPE):
            return ("const", e.value.numpy())  # TVM 0.27: a constant's tensor is .value
        if fp32_weight(e):
            return ("param", weights[e])
        prod = bindings.get(e) if isinstance(e, relax.Var) else None
        if isinstance(prod, relax.Call) and prod.op.same_as(_RESHAPE):
            return value_of(prod.args[0])
        return None

    consumers = {}
    for var, value in bindings.items():
        if isinstance(value, relax.Call):
            for a in value.args:
                if isinstance(a, relax.Var):
                    consumers.setdefault(a, []).append(var)
        elif isinstance(value, relax.TupleGetItem) and isinstance(value.tuple_value, relax.Var):
            consumers.setdefault(value.tuple_value, []).append(var)

    sites = []
    for var, value in bindings.items():
        if not (isinstance(value, relax.Call) and value.op.same_as(_CONV2D)):
            continue
        x, w = value.args
        a = value.attrs
        if not fp32_weight(w) or dtype_of(x) != "float32" or int(a.groups) != 1:
            continue
        if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW" or str(a.out_layout) not in ("", "NCHW"):
            continue
        if not _fp32_out(a):
            continue
        wshape = static_shape(w)
        xs = getattr(sinfo(x), "shape", None)
        if wshape is None or len(wshape) != 4 or xs is None or not hasattr(xs, "values") or len(xs.values) != 4:
            continue
        if not all(hasattr(d, "value") for d in xs.values[1:]):
            continue
        c, h, wd = (int(d.value) for d in xs.values[1:])
        o = wshape[0]
        if wshape[1] != c or _too_deep(wshape):
            continue
        spec = ConvSpec(c, h, wd, o, tuple(wshape[2:]), _ints(a.strides, 2), _ints(a.dilation, 2), _pads(a.padding))
        site = Site("conv2d", param_names[weights[w]], weights[w], False, c * wshape[2] * wshape[3], o, x=x,
                    out_var=var)
        site.conv = spec
        # conv + bias: add(y, reshape(bias, [1, O, 1, 1])) with y used only there
        nxt = consumers.get(var, [])
        if uses.get(var, 0) == 1 and len(nxt) == 1:
            add = bindings[nxt[0]]
            if isinstance(add, relax.Call) and add.op.same_as(_ADD):
                other = add.args[1] if add.args[0].same_as(var) else add.args[0]
                bval = value_of(other)
                if bval is not None and int(np.prod(_shape_of(other, bval))) == o \
                        and static_shape(other) in ((o,), (1, o, 1, 1)):
                    site.conv_bias = bval
                    site.skip_vars.append(site.out_var)
                    site.out_var = nxt[0]
        _absorb_batch_norm(site, bindings, uses, consumers, value_of)
        _absorb_relu(site, bindings, uses, consumers)
        sites.append(site)
    return sites


def _shape_of(expr, val):
    return np.shape(val[1]) if val[0] == "const" else static_shape(expr)


def _absorb_batch_norm(site, bindings, uses, consumers, value_of):
    """z = batch_norm(y)[0] with y used only there, inference mode, per-channel axis 1: fold into the site."""
    y = site.out_var
    nxt = consumers.get(y, [])
    if uses.get(y, 0) != 1 or len(nxt) != 1:
        return
    bn_var = nxt[0]
    bn = bindings[bn_var]
    if not (isinstance(bn, relax.Call) and bn.op.same_as(_BATCH_NORM)) or int(bn.attrs.axis) != 1:
        return
    if bool(getattr(bn.attrs, "training", False)):
        return
    vals = [value_of(e) for e in bn.args[1:]]
    if any(v is None for v in vals):
        return
    getters = consumers.get(bn_var, [])
    items = [(g, bindings[g]) for g in getters]
    if not all(isinstance(v, relax.TupleGetItem) for _, v in items):
        return
    main = [g for g, v in items if v.index == 0]
    # the running-statistics outputs may be bound by the importer but must not be used
    if len(main) != 1 or any(uses.get(g, 0) for g, v in items if v.index != 0):
        return
    site.bn = {"gamma": vals[0], "beta": vals[1], "mean": vals[2], "var": vals[3],
               "eps": float(bn.attrs.epsilon), "scale": bool(bn.attrs.scale), "center": bool(bn.attrs.center)}
    site.skip_vars += [y, bn_var] + [g for g, v in items if v.index != 0]
    site.out_var = main[0]


def _absorb_relu(site, bindings, uses, consumers):
    """z = relu(y) with y used only there: applied in the GEMM's epilogue (one pass over z fewer)."""
    y = site.out_var
    nxt = consumers.get(y, [])
    if uses.get(y, 0) != 1 or len(nxt) != 1:
        return
    act = bindings[nxt[0]]
    if isinstance(act, relax.Call) and act.op.same_as(_RELU) and len(act.args) == 1:
        site.activation = "relu"
        site.skip_vars.append(y)
        site.out_var = nxt[0]


def _value(params, v):
    return np.asarray(v[1] if v[0] == "const" else params[v[1]], np.float32)


def folded_weight_bias(site, params) -> tuple:
    """The site's fp32 weight [O, C, KH, KW] and bias [O] (or None) with the BatchNorm folded in (float64 math)."""
    w = np.asarray(params[site.weight_index], np.float64)
    bias = None if site.conv_bias is None else _value(params, site.conv_bias).reshape(-1).astype(np.float64)
    bn = site.bn
    if bn is None:
        return w.astype(np.float32), None if bias is None else bias.astype(np.float32)
    o = w.shape[0]

    def get(key):
        return _value(params, bn[key]).reshape(o).astype(np.float64)

    s = 1.0 / np.sqrt(get("var") + bn["eps"])
    if bn["scale"]:
        s = s * get("gamma")
    shift = ((bias if bias is not None else 0.0) - get("mean")) * s
    if bn["center"]:
        shift = shift + get("beta")
    return (w * s[:, None, None, None]).astype(np.float32), shift.astype(np.float32)


def pack_weight(w_oihw: np.ndarray, spec: ConvSpec, lanes: int) -> dict:
    """Per-output-channel int8 weight → the kernel's arrays: wpacked [O/L, KH*KW*Cp/4, L, 4] with K ordered
    (ky, kx, c), wsum [O/L*L] int32, wscale [O]; plus ``deq``, the fp32 weight the kernel effectively uses."""
    o, c, kh, kw = w_oihw.shape
    q, ws = qmath.int8_weight(w_oihw.reshape(o, -1).T)  # [C*KH*KW, O]: the per-channel max is order-free
    q4 = q.T.reshape(o, c, kh, kw)
    cp = -(-c // 4) * 4
    qk = np.zeros((kh, kw, cp, o), np.int8)
    qk[:, :, :c, :] = q4.transpose(2, 3, 1, 0)
    wsum = np.zeros(-(-o // lanes) * lanes, np.int32)
    wsum[:o] = q.astype(np.int32).sum(axis=0)
    deq = (q4.astype(np.float32) * ws[:, None, None, None]).astype(np.float32)
    return {"wpacked": qmath.vnni_pack(qk.reshape(-1, o), lanes), "wsum": wsum, "wscale": ws, "q": q4, "deq": deq}


# -- numpy reference -------------------------------------------------------------------------------------------
def im2col(x: np.ndarray, spec: ConvSpec) -> np.ndarray:
    """x [B, C, H, W] → patches [B*OH*OW, C*KH*KW] (K ordered (c, ky, kx), as OIHW weights flatten)."""
    b = x.shape[0]
    pt, pl, pb, pr = spec.pads
    kh, kw = spec.kernel
    oh, ow = spec.out_hw
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    cols = np.empty((b, spec.c, kh, kw, oh, ow), x.dtype)
    for ky in range(kh):
        for kx in range(kw):
            y0, x0 = ky * spec.dilation[0], kx * spec.dilation[1]
            cols[:, :, ky, kx] = xp[:, :, y0:y0 + spec.strides[0] * (oh - 1) + 1:spec.strides[0],
                                    x0:x0 + spec.strides[1] * (ow - 1) + 1:spec.strides[1]]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(b * oh * ow, -1)


def conv2d(x: np.ndarray, w_oihw: np.ndarray, spec: ConvSpec, bias=None) -> np.ndarray:
    """Reference conv, NCHW output (float64 accumulation for float inputs, exact int64 for integer ones)."""
    acc_t = np.int64 if np.issubdtype(np.asarray(x).dtype, np.integer) else np.float64
    cols = im2col(np.asarray(x).astype(acc_t), spec)
    y = cols @ np.asarray(w_oihw).reshape(spec.o, -1).T.astype(acc_t)
    if bias is not None:
        y = y + bias
    oh, ow = spec.out_hw
    return y.reshape(x.shape[0], oh, ow, spec.o).transpose(0, 3, 1, 2)


def quantize_tensor(x: np.ndarray, qmax: int = 127, clip=None):
    """Per-tensor activation quantizer as the kernel runs it: (integer codes, scale)."""
    amax = np.float32(max(float(np.abs(x).max()) if clip is None else float(clip), 1e-12))
    inv = np.float32(qmax) / amax
    q = np.clip(np.round(np.asarray(x, np.float32) * inv), -qmax, qmax).astype(np.int32)
    return q, np.float32(amax / np.float32(qmax))


def skipped_convs(func: relax.Function, sites: list, param_names: list, all_why: str | None = None) -> list:
    """The convolutions left in fp32, each with why (for the report): grouped/depthwise, conv1d/3d, layouts other
    than NCHW/OIHW, weights that are not float32 parameters, dynamic C/H/W; ``all_why``: none was matched, for
    that reason (the scheme's ``convs`` setting, the target)."""
    n_in = int(func.attrs["num_input"])
    names = {p: param_names[i] for i, p in enumerate(func.params[n_in:])}
    done = {v for s in sites if s.kind == "conv2d" for v in [s.out_var] + s.skip_vars}
    out = []
    for block in func.body.blocks:
        for b in block.bindings:
            v = b.value
            if not isinstance(v, relax.Call) or not isinstance(v.op, tvm.ir.Op) \
                    or v.op.name not in ("relax.nn.conv1d", "relax.nn.conv2d", "relax.nn.conv3d") or b.var in done:
                continue
            w = v.args[1]
            layer = names.get(w, w.name if isinstance(w, relax.Var) else "a computed weight")
            a = v.attrs
            if all_why is not None:
                why = all_why
            elif v.op.name != "relax.nn.conv2d":
                why = f"{v.op.name.split('.')[-1]}: only conv2d has an INT8 kernel"
            elif int(a.groups) != 1:
                why = f"groups={int(a.groups)} (grouped/depthwise): no INT8 kernel, stays fp32"
            elif str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW":
                why = f"layout {a.data_layout}/{a.kernel_layout}: only NCHW/OIHW is matched"
            elif w not in names or dtype_of(w) != "float32":
                why = "weight is not a float32 parameter"
            elif not _fp32_out(a) or dtype_of(v.args[0]) != "float32":
                why = f"not a float32 conv (input {dtype_of(v.args[0])}, out_dtype {a.out_dtype})"
            elif static_shape(w) is not None and len(static_shape(w)) == 4 and _too_deep(static_shape(w)):
                why = "C*KH*KW too large for an int32 accumulator"
            else:
                why = "input channels/height/width not static"
            out.append({"layer": layer, "reason": why})
    return out

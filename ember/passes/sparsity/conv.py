"""N:M sparse 2-D convolutions on x86 CPUs: ``conv2d(x, W)`` with W pruned along ``in·kh·kw`` runs a kernel that
reads only the kept weights.

Before (what the torch and ONNX importers emit, NCHW / OIHW, groups 1)::

    y = R.nn.conv2d(x, p_conv_weight, strides, padding, dilation)            # x [B, C, H, W]

After::

    xp = R.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right])                 # only when padding != 0
    yt = R.call_tir(ember_sparse_conv2d_..., (xp, p_conv_weight_nm_values, p_conv_weight_nm_offsets),
                    out_sinfo=R.Tensor((B, OH, OW, O), "float32"))
    y  = R.permute_dims(yt, [0, 3, 1, 2])                                     # back to NCHW

(with horizontal stride 1 the kernel writes NCHW itself and there is no permute).

The weight ``[O, C·kh·kw]`` is packed like a linear weight (:func:`.pack.pack`: 16 output channels per vector),
but each kept weight's index is stored as its *element offset in the padded input* relative to the receptive
field's corner (``c·Hp·Wp + r·dil·Wp + q·dil``, int32), worked out at compile time, so the kernels do no index
arithmetic. Two direct convolutions, no im2col buffer:

* horizontal stride 1 (:func:`conv_kernel_rows`, most convolutions): vectors run along an output row — per kept
  weight one broadcast, one contiguous load of 16 inputs, one FMA;
* other strides (:func:`conv_kernel`): vectors run across 16 output channels, x gathered by offset
  (``vgatherdps``).

Offsets take 4 bytes where a linear's indices take half a byte, which matters little: conv weights are small next
to their activations. An inference BatchNorm right after a sparse conv (with or without a conv bias) is folded
into it here — its scale into the packed weights, its shift into one add — since ember's FoldBatchNorm runs later
in the pipeline and cannot see into the kernel. A conv weight that is not N:M sparse is kept dense (unlike a
Linear, which ember prunes by magnitude with a warning: a CNN's first conv is often left dense on purpose).
Other CPUs and GPUs keep sparse convolutions dense (the report says why).
"""

from __future__ import annotations

import numpy as np
from tvm import tirx

from .pack import BLOCK, num_blocks, num_groups, pack, unpack_indices

KERNEL_NAME = "ember_sparse_conv2d"


def conv_offsets(packed, c_in: int, kh: int, kw: int, hp: int, wp: int, dilation=(1, 1)) -> np.ndarray:
    """int32 ``[NB, G, n, 16]``: for each kept weight, its x offset from the receptive field's corner."""
    g = packed.values.shape[1]
    pos = unpack_indices(packed.indices, g, packed.m).astype(np.int64)  # [NB, G, n, 16]
    k = np.arange(g)[None, :, None, None] * packed.m + pos              # column of [O, C*kh*kw]
    c, rest = k // (kh * kw), k % (kh * kw)
    r, q = rest // kw, rest % kw
    off = c * hp * wp + r * dilation[0] * wp + q * dilation[1]
    assert off.max() < c_in * hp * wp
    return np.ascontiguousarray(off.astype(np.int32))


def conv_kernel(c_in: int, hp: int, wp: int, o: int, kh: int, kw: int, oh: int, ow: int, stride, n: int, m: int,
                isa: str, parallel: bool) -> tirx.PrimFunc:
    """The AVX-512 / AVX2 kernel: ``yt[b, oh, ow, o] = Σ values[o, g, s] * xp[b, corner(oh, ow) + offset[o, g, s]]``;
    the batch is symbolic. Loops: (batch, output row) in parallel, then 16-channel blocks (their packed weights,
    ``G·n·16`` floats each, stay in L1 across the row), then output columns."""
    from tvm.script import tirx as T

    lanes = 16 if isa == "avx512" else 8
    halves = BLOCK // lanes
    vt = f"float32x{lanes}"
    k = c_in * kh * kw
    g_all = num_groups(k, m)
    nb = num_blocks(o)
    full = o // BLOCK
    rem = o - full * BLOCK
    sh, sw = stride

    def gather(base, off):
        if isa == "avx512":
            return T.call_llvm_intrin(vt, "llvm.x86.avx512.mask.gather.dps.512", T.Broadcast(T.float32(0), lanes),
                                      base, off, T.Broadcast(T.bool(True), lanes), T.int32(4))
        return T.call_llvm_intrin(vt, "llvm.x86.avx2.gather.d.ps.256", T.Broadcast(T.float32(0), lanes), base, off,
                                  T.reinterpret(vt, T.Broadcast(T.int32(-1), lanes)), T.int8(4))

    def lane(h):
        return T.Ramp(h * lanes, 1, lanes)

    @T.prim_func(private=True)
    def kernel(x_h: T.handle, v_h: T.handle, o_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch = T.int64()
        xp = T.match_buffer(x_h, (batch, c_in, hp, wp), "float32")
        values = T.match_buffer(v_h, (nb, g_all, n, BLOCK), "float32")
        offsets = T.match_buffer(o_h, (nb, g_all, n, BLOCK), "int32")
        y = T.match_buffer(y_h, (batch, oh, ow, o), "float32")
        for bo in T.parallel(batch * oh) if parallel else T.serial(batch * oh):
            for jb in range(nb):
                for c in range(ow):
                    acc = T.decl_buffer((halves,), vt, scope="local")
                    for h in T.unroll(halves):
                        acc[h] = T.Broadcast(T.float32(0), lanes)
                    for g in range(g_all):
                        for s in range(n):
                            for h in T.unroll(halves):
                                xv = gather(T.address_of(xp[bo // oh, 0, bo % oh * sh, c * sw]),
                                            offsets[jb, g, s, lane(h)])
                                acc[h] = acc[h] + values[jb, g, s, lane(h)] * xv
                    if rem == 0:
                        for h in T.unroll(halves):
                            y[bo // oh, bo % oh, c, T.Ramp(jb * BLOCK + h * lanes, 1, lanes)] = acc[h]
                    else:
                        if jb < full:
                            for h in T.unroll(halves):
                                y[bo // oh, bo % oh, c, T.Ramp(jb * BLOCK + h * lanes, 1, lanes)] = acc[h]
                        else:
                            tmp = T.decl_buffer((BLOCK,), "float32", scope="local")
                            for h in T.unroll(halves):
                                tmp[lane(h)] = acc[h]
                            for r in range(rem):
                                y[bo // oh, bo % oh, c, jb * BLOCK + r] = tmp[r]

    return kernel


def conv_kernel_rows(c_in: int, hp: int, wp: int, o: int, kh: int, kw: int, oh: int, ow: int, stride_h: int, n: int,
                     m: int, isa: str, parallel: bool) -> tirx.PrimFunc:
    """The kernel for convolutions with horizontal stride 1 — no gather: a vector runs along the output row.

    For a kept weight (channel o, input offset off), the 16 (AVX2: 8) adjacent output pixels of a row tile read 16
    adjacent inputs, ``xp[corner + off : + 16]``: one broadcast of the weight, one contiguous load, one FMA into
    channel o's accumulator — about 2 cycles per 16 multiply-adds where a gather takes ~10. 16 (8) channels are
    accumulated at once (one register each), and the result is stored straight into NCHW rows.
    """
    from tvm.script import tirx as T

    width = 16 if isa == "avx512" else 8  # output pixels per vector
    cp = 16 if isa == "avx512" else 8     # channels per pass: one accumulator register each
    passes = BLOCK // cp
    k = c_in * kh * kw
    g_all = num_groups(k, m)
    nb = num_blocks(o)
    tiles, tail = ow // width, ow % width
    guard_row = nb * BLOCK != o

    def row_ok(r):
        return r < o if guard_row else T.bool(True)

    def make_tile(lanes):
        vt = f"float32x{lanes}" if lanes > 1 else "float32"  # a 1-wide tail is scalar code

        def bcast(v):
            return T.Broadcast(v, lanes) if lanes > 1 else v

        def ramp(base):
            return T.Ramp(base, 1, lanes) if lanes > 1 else base

        @T.macro
        def tile(xf, values, offsets, y, b, r, jb, hpass, ow0):
            acc = T.decl_buffer((cp,), vt, scope="local")
            for ci in T.unroll(cp):
                acc[ci] = bcast(T.float32(0))
            for g in range(g_all):
                for s in range(n):
                    for ci in T.unroll(cp):
                        acc[ci] = acc[ci] + bcast(values[jb, g, s, hpass * cp + ci]) * xf[ramp(
                            b * (c_in * hp * wp) + r * stride_h * wp + ow0
                            + T.Cast("int64", offsets[jb, g, s, hpass * cp + ci]))]
            for ci in T.unroll(cp):
                if row_ok(jb * BLOCK + hpass * cp + ci):
                    y[b, jb * BLOCK + hpass * cp + ci, r, ramp(ow0)] = acc[ci]

        return tile

    tile_main = make_tile(width)
    tile_tail = make_tile(tail) if tail else None

    @T.prim_func(private=True)
    def kernel(x_h: T.handle, v_h: T.handle, o_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch = T.int64()
        xp = T.match_buffer(x_h, (batch, c_in, hp, wp), "float32")
        values = T.match_buffer(v_h, (nb, g_all, n, BLOCK), "float32")
        offsets = T.match_buffer(o_h, (nb, g_all, n, BLOCK), "int32")
        y = T.match_buffer(y_h, (batch, o, oh, ow), "float32")
        xf = T.decl_buffer((batch * c_in * hp * wp,), "float32", data=xp.data)  # flat view: rows by offset
        for bo in T.parallel(batch * oh) if parallel else T.serial(batch * oh):
            for jb in range(nb):
                for hpass in range(passes):
                    for t in range(tiles):
                        tile_main(xf, values, offsets, y, bo // oh, bo % oh, jb, hpass, t * width)
                    if tail > 0:
                        tile_tail(xf, values, offsets, y, bo // oh, bo % oh, jb, hpass, tiles * width)

    return kernel


def _numpy_of(e, weights_np):
    """A weight parameter's or a Relax constant's value (float64), else None (a runtime value)."""
    if e in weights_np:
        return np.asarray(weights_np[e], np.float64)
    # TVM 0.27 spells Relax constants ir.GenericConst, their tensor is ``.value`` (``.data`` in older TVMs)
    data = getattr(e, "value", None) if type(e).__name__ == "GenericConst" else getattr(e, "data", None)
    return np.asarray(data.numpy(), np.float64) if data is not None and hasattr(data, "numpy") else None


def _batch_norm_folds(func, plan: dict, weights_np: dict) -> dict:
    """Inference BatchNorms right after a planned sparse conv, folded into it (as ember's FoldBatchNorm would,
    which runs later in the pipeline and cannot see into the sparse kernel): per output channel
    ``s = gamma / sqrt(var + eps)``, weight ``W * s`` (same zeros: still N:M), then ``+ (beta - mean * s)``.
    Only when the conv output feeds nothing but the BN and every BN operand is a weight or constant."""
    import tvm
    from tvm import relax

    bn_op = tvm.ir.Op.get("relax.nn.batch_norm")
    add_op, reshape_op = tvm.ir.Op.get("relax.add"), tvm.ir.Op.get("relax.reshape")
    bound, uses = {}, {}
    for blk in func.body.blocks:
        for b in blk.bindings:
            bound[b.var] = b.value
            for v in relax.analysis.free_vars(b.value) if isinstance(b.value, relax.Expr) else []:
                uses[v] = uses.get(v, 0) + 1
    for v in relax.analysis.free_vars(func.body.body):
        uses[v] = uses.get(v, 0) + 1
    out = {}
    for item in bound.values():
        if not isinstance(item, relax.TupleGetItem) or item.index != 0:
            continue
        bn = bound.get(item.tuple_value)
        if not (isinstance(bn, relax.Call) and bn.op.same_as(bn_op)) or uses.get(item.tuple_value, 0) != 1:
            continue
        a = bn.attrs
        if bool(a.training) or int(a.axis) != 1:
            continue
        conv_var, bias = bn.args[0], 0.0
        add = bound.get(conv_var)
        if isinstance(add, relax.Call) and add.op.same_as(add_op) and uses.get(conv_var, 0) == 1:
            # a conv with a bias: conv -> add(reshape(bias, [1, C, 1, 1])) -> BN; the bias joins the shift
            b_expr = bound.get(add.args[1], add.args[1])
            if isinstance(b_expr, relax.Call) and b_expr.op.same_as(reshape_op):
                b_expr = b_expr.args[0]
            bias = _numpy_of(b_expr, weights_np)
            if bias is None:
                continue
            conv_var, bias = add.args[0], bias.reshape(-1)
        conv = bound.get(conv_var)
        if conv not in plan or uses.get(conv_var, 0) != 1:
            continue
        gamma, beta, mean, var = (_numpy_of(e, weights_np) for e in bn.args[1:5])
        if any(t is None for t in (gamma, beta, mean, var)):
            continue
        c = weights_np[plan[conv]].shape[0]
        if np.size(bias) not in (1, c):
            continue
        gamma = gamma if bool(a.scale) else np.ones(c)
        beta = beta if bool(a.center) else np.zeros(c)
        scale = gamma / np.sqrt(var + float(a.epsilon))
        w = (np.asarray(weights_np[plan[conv]], np.float64) * scale[:, None, None, None]).astype(np.float32)
        shift = (beta + (bias - mean) * scale).astype(np.float32)
        out[conv] = (w, shift)
        out[item] = (conv_var, shift)
    return out


def _attr_ints(v, n=2):
    vals = [int(a) for a in v]
    return vals if len(vals) == n else vals * n


def _usable_conv(call, w, x_shape) -> str | None:
    a = call.attrs
    if int(a.groups) != 1:
        return f"grouped convolution (groups={int(a.groups)})"
    if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW" or str(a.out_layout or "NCHW") != "NCHW":
        return f"layout {a.data_layout}/{a.kernel_layout} (the sparse conv takes NCHW/OIHW)"
    if str(w.dtype) != "float32" or str(a.out_dtype or "float32") not in ("float32", "", "void"):
        return f"dtype {w.dtype} (the sparse conv computes in float32)"
    if x_shape is None or len(x_shape) != 4 or not all(isinstance(d, int) for d in x_shape[1:]):
        return "input shape is not static (C, H, W)"
    return None


def rewrite_convs(imported, n: int, m: int, target, report: dict, isa: str | None):
    """Replace each conv2d on a 4-D weight parameter by the sparse conv kernel; returns the new ImportedModel and
    fills ``report`` (its "layers", "skipped", "warnings" lists and byte totals) like the linear rewrite."""
    import tvm
    from tvm import relax

    from ...frontends.spec import ImportedModel
    from ...schedules.cpu.common import num_cores
    from .pack import nm_violations
    from .rewrite import _static_shape

    conv_op = tvm.ir.Op.get("relax.nn.conv2d")
    func = imported.mod["main"]
    n_in = int(func.attrs["num_input"])
    wparams = list(func.params[n_in:])
    weights_np = {v: np.asarray(a) for v, a in zip(wparams, imported.params)}
    names = {v: nm for v, nm in zip(wparams, imported.param_names)}
    calls = [b.value for blk in func.body.blocks for b in blk.bindings
             if isinstance(b.value, relax.Call) and b.value.op.same_as(conv_op) and b.value.args[1] in weights_np
             and weights_np[b.value.args[1]].ndim == 4]
    if not calls:
        return imported
    plan = {}
    for call in calls:
        w_var = call.args[1]
        name, w = names[w_var], weights_np[w_var]
        why = (f"sparse convolutions run on x86 CPUs with AVX2 or AVX-512 only ({target.kind.name} target"
               f"{'' if target.kind.name != 'llvm' else ' without them'}): kept dense, on the pruned weights") \
            if isa is None else _usable_conv(call, w, _static_shape(call.args[0].ty))
        if why is None and nm_violations(w.reshape(w.shape[0], -1), n, m):
            # Unlike a Linear, a conv that is not N:M is taken as one the user kept dense on purpose (the first
            # conv of a CNN has few weights per filter: pruning it to 1:16 dropped the digits CNN to 27% top-1).
            why = (f"not {n}:{m} sparse along in*kh*kw: kept dense (prune it with ember.sparsity.prune_nm to run "
                   f"it sparse)")
        if why is not None:
            report["skipped"].append({"name": name, "reason": why})
            continue
        plan[call] = w_var
    # conv call -> (folded weight, shift); the BN's TupleGetItem -> (conv output var, shift)
    folds = _batch_norm_folds(func, plan, weights_np)

    packed = {}  # (weight var, padded shape, folded conv or None) -> (values var, offsets var, arrays, entry)

    @relax.expr_functor.mutator
    class _Mutator(relax.PyExprMutator):
        def visit_call_(self, call):  # pylint: disable=arguments-renamed
            if call not in plan:
                return super().visit_call_(call)
            w_var = plan[call]
            name, w = names[w_var], weights_np[w_var]
            if call in folds:
                w = folds[call][0]
            x = self.visit_expr(call.args[0])
            b_dim, c_in, h, wd = _static_shape(x.ty)
            o, _, kh, kw = w.shape
            a = call.attrs
            stride, dil = _attr_ints(a.strides), _attr_ints(a.dilation)
            pad = _attr_ints(a.padding, 4) if len(a.padding) != 2 else _attr_ints(a.padding) * 2  # top left bottom right
            top, left, bottom, right = pad
            hp, wp = h + top + bottom, wd + left + right
            oh = (hp - dil[0] * (kh - 1) - 1) // stride[0] + 1
            ow = (wp - dil[1] * (kw - 1) - 1) // stride[1] + 1
            key = (w_var, hp, wp, call if call in folds else None)
            if key not in packed:
                w2 = w.reshape(o, -1)
                p = pack(w2, n, m)
                offs = conv_offsets(p, c_in, kh, kw, hp, wp, dil)
                vv = relax.Var(f"{name}_nm_values", relax.TensorType(list(p.values.shape), "float32"))
                ov = relax.Var(f"{name}_nm_offsets", relax.TensorType(list(offs.shape), "int32"))
                entry = {"name": name, "shape": [int(s) for s in w.shape], "op": "conv2d", "was_nm_sparse": True,
                         "pruned_groups": 0,
                         "sparsity": round(float(1.0 - np.count_nonzero(w2) / w2.size), 6),
                         "dense_bytes": int(w.nbytes), "packed_bytes": int(p.values.nbytes + offs.nbytes)}
                entry["bytes_saved"] = entry["dense_bytes"] - entry["packed_bytes"]
                if call in folds:
                    entry["folded_batch_norm"] = True
                packed[key] = (vv, ov, [p.values, offs], entry)
            vv, ov, _, _ = packed[key]
            if any(pad):
                x = self.builder_.emit(relax.op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right]), "nm_pad")
            par = num_cores(target) > 1
            name_k = f"{KERNEL_NAME}_{c_in}x{hp}x{wp}_{o}x{kh}x{kw}_s{stride[0]}x{stride[1]}_{n}_{m}"
            if stride[1] == 1:  # rows of output pixels are rows of input: contiguous loads, NCHW out
                prim = conv_kernel_rows(c_in, hp, wp, o, kh, kw, oh, ow, stride[0], n, m, isa, par)
                prim = prim.with_attr("op_pattern", 8)  # opaque: FuseOps leaves the scheduled kernel alone
                gv = self.builder_.add_func(prim, name_k)
                return relax.call_tir(gv, [x, vv, ov], relax.TensorType([b_dim, o, oh, ow], "float32"))
            prim = conv_kernel(c_in, hp, wp, o, kh, kw, oh, ow, stride, n, m, isa, parallel=par)
            prim = prim.with_attr("op_pattern", 8)
            gv = self.builder_.add_func(prim, name_k)
            yt = self.builder_.emit(relax.call_tir(gv, [x, vv, ov], relax.TensorType([b_dim, oh, ow, o], "float32")),
                                    "nm_conv")
            return relax.op.permute_dims(yt, [0, 3, 1, 2])

        def visit_tuple_getitem_(self, op):  # pylint: disable=arguments-renamed
            if op not in folds:
                return super().visit_tuple_getitem_(op)
            # BN(conv(x, W)) = conv(x, W * s) + shift: the scale went into the packed weights above
            conv_var, shift = folds[op]
            return relax.op.add(self.visit_expr(conv_var), relax.const(shift.reshape(1, -1, 1, 1)))

    mutator = _Mutator(imported.mod)
    new_body = mutator.visit_expr(func.body)
    extra = [(vv, ov, arrs, entry) for vv, ov, arrs, entry in packed.values()]
    tmp = relax.Function(list(func.params) + [v for vv, ov, _, _ in extra for v in (vv, ov)], new_body,
                         func.ret_ty, func.is_pure, func.attrs)
    tmp = relax.analysis.remove_all_unused(tmp)
    used = set(relax.analysis.free_vars(tmp.body))
    new_params, new_arrays, new_names = list(func.params[:n_in]), [], []
    for v, arr, nm in zip(wparams, imported.params, imported.param_names):
        if v in used:  # dense weights still read somewhere (a skipped conv, or another use) are kept
            new_params.append(v)
            new_arrays.append(arr)
            new_names.append(nm)
    for vv, ov, arrs, entry in extra:
        new_params += [vv, ov]
        new_arrays += arrs
        new_names += [vv.name, ov.name]
        report["layers"].append(entry)
    out_mod = mutator.builder_.get()
    out_mod["main"] = relax.Function(new_params, tmp.body, func.ret_ty, func.is_pure, func.attrs)
    return ImportedModel(out_mod, new_arrays, new_names, imported.inputs, imported.outputs, source=imported.source)

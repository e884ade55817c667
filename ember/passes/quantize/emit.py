"""Emit the Relax replacement of one site and produce the arrays its kernels read (see graph.py's docstring)."""

from __future__ import annotations

import numpy as np
from tvm import relax

from . import kernels, qmath
from .graph import leading_rows, sinfo


class Emitter:
    """Callable given to :class:`~.graph.Rewriter`; ``plans[site]`` says how to quantize each site.

    A plan is a dict: {"scheme": "weight_only", "bits", "group", "symmetric"} or {"scheme": "int8",
    "per_token", "static", "clip", "act_bits"}. New weight parameters are collected in ``self.new_params``
    (relax Vars) and ``self.new_arrays`` (numpy), in order.
    """

    def __init__(self, imported, plans: dict, target):
        self.imported = imported
        self.plans = plans
        self.target = target
        self.new_params, self.new_arrays = [], []
        self._funcs = {}
        self._memo = []
        self.dequantized = {}  # site name -> the fp32 weight the kernel effectively uses (for the report)
        self.conv_fp32 = {}  # conv site name -> (fp32 weight with BatchNorm folded in, bias or None)
        self._prequantized = []  # (fp32 tensor, (codes, scale)) made by a fused producer (layernorm_quantize)

    # -- helpers ---------------------------------------------------------------------------------------------
    def _param(self, name, arr):
        arr = np.ascontiguousarray(arr)
        v = relax.Var(name, relax.TensorType(arr.shape, str(arr.dtype)))
        self.new_params.append(v)
        self.new_arrays.append(arr)
        return v

    def _func(self, bb, key, make):
        gv = self._funcs.get(key)
        if gv is None:
            gv = bb.add_func(make(), key[0] + "_" + "_".join(str(k) for k in key[1:]).replace("-", "m"))
            self._funcs[key] = gv
        return gv

    def _shared(self, key, x, make):
        """One value per (key, input): q, k and v projections read the same x, so they share its reshape and
        its run-time quantization instead of computing them three times."""
        for k, v, val in self._memo:
            if k == key and v.same_as(x):
                return val
        val = make()
        self._memo.append((key, x, val))
        return val

    def _weight_kn(self, site):
        w = self.imported.params[site.weight_index]
        return np.ascontiguousarray(w.T if site.transposed else w, dtype=np.float32)

    # -- emission ----------------------------------------------------------------------------------------------
    def __call__(self, bb, site, x, src=None):
        """src: the tensor x is a reshape of (same elements, last dim K); the flat [M, K] view is made from it so
        that sites reading reshapes of one tensor share the view and what is computed from it."""
        plan = self.plans[site.name]
        if site.kind == "embedding":
            return self._embedding(bb, site, x, plan)
        if site.kind == "conv2d":
            return self._conv(bb, site, x, plan)
        m, dims = leading_rows(x)
        src = x if src is None else src
        x2 = self._shared(("reshape", site.k), src, lambda: bb.emit(relax.op.reshape(src, [m, site.k])))
        bias = None
        if site.bias_index is not None:
            bias = self._param(self.imported.param_names[site.bias_index] + ".fused",
                               self.imported.params[site.bias_index].astype(np.float32))
        if plan["scheme"] == "weight_only":
            y2 = self._weight_only(bb, site, x2, m, plan, bias)
        else:
            pre = next((q for t, q in self._prequantized if t.same_as(src)), None)
            y2 = self._int8(bb, site, x2, m, plan, bias, pre)
        return bb.emit(relax.op.reshape(y2, site.out_shape or (list(dims) + [site.n])))

    def _weight_only(self, bb, site, x2, m, plan, bias):
        bits, group, sym = plan["bits"], plan["group"], plan["symmetric"]
        arrays, deq = qmath.weight_only_pack(self._weight_kn(site), bits, group, sym, plan.get("gptq_x"))
        self.dequantized[site.name] = deq
        rt = kernels.wo_row_tile(site.n, self.target)
        pgv = self._func(bb, ("ember_pad_rows", site.k, rt), lambda: kernels.pad_rows(site.k, rt, self.target))
        tiles = self._shared(("pad", rt), x2, lambda: bb.emit(relax.call_tir(
            pgv, [x2], relax.TensorType([(m + rt - 1) // rt, rt, site.k], "float32"))))
        args = [tiles] + [self._param(f"{site.name}.{k}", a) for k, a in arrays.items()]
        if bias is not None:
            args.append(bias)
        key = ("ember_wo_matmul", bits, site.k, site.n, group, int(sym), int(bias is not None))
        gv = self._func(bb, key, lambda: kernels.weight_only_matmul(site.k, site.n, bits, group, sym,
                                                                    bias is not None, self.target))
        return bb.emit(relax.call_tir(gv, args, relax.TensorType([m, site.n], "float32")))

    def norm(self, bb, ns, a, r, gamma, beta):
        """Emit ``layer_norm(a (+ r))`` fused with the per-token quantizer of its int8 consumers (see
        :class:`~.graph.NormSite`); returns the fp32 output in the layer norm's shape."""
        m, dims = leading_rows(a)
        k = ns.k
        rt = kernels.int8_row_tile(kernels.int8_lanes(self.target))
        flat = [bb.emit(relax.op.reshape(t, [m, k])) for t in (a, r) if t is not None]
        key = ("ember_layernorm_quant", k, int(r is not None), ns.qmax, rt, repr(ns.eps))
        gv = self._func(bb, key, lambda: kernels.layernorm_quantize(k, ns.eps, r is not None, ns.qmax, rt,
                                                                     self.target))
        kp = -(-k // 4) * 4
        out = bb.emit(relax.call_tir(gv, flat + [gamma, beta], [
            relax.TensorType([m, k], "float32"), relax.TensorType([(m + rt - 1) // rt, rt, kp], "uint8"),
            relax.TensorType([m], "float32")]))
        y = bb.emit(relax.op.reshape(bb.emit(relax.TupleGetItem(out, 0)), list(dims) + [k]))
        self._prequantized.append((y, (bb.emit(relax.TupleGetItem(out, 1)), bb.emit(relax.TupleGetItem(out, 2)))))
        return y

    def _int8(self, bb, site, x2, m, plan, bias, pre=None):
        lanes = kernels.int8_lanes(self.target)
        rt = kernels.int8_row_tile(lanes)
        smooth = plan.get("smooth")
        w = self._weight_kn(site)
        q, ws = qmath.int8_weight(w if smooth is None else w * smooth[:, None])
        self.dequantized[site.name] = q.astype(np.float32) * ws[None, :] / (1 if smooth is None else smooth[:, None])
        wsum = np.zeros(-(-site.n // lanes) * lanes, np.int32)
        wsum[: site.n] = q.astype(np.int32).sum(axis=0)
        qmax = (1 << (plan["act_bits"] - 1)) - 1
        qkey = ("ember_quant_act", site.k, qmax, int(plan["per_token"]), int(plan["static"]), rt)
        qkey += (int(smooth is not None),)
        qgv = self._func(bb, qkey, lambda: kernels.quantize_activations(site.k, qmax, plan["per_token"],
                                                                        plan["static"], rt, self.target,
                                                                        smooth=smooth is not None))
        kp = -(-site.k // 4) * 4
        codes_sinfo = relax.TensorType([(m + rt - 1) // rt, rt, kp], "uint8")

        def quantize():
            qargs = [x2]
            if smooth is not None:
                qargs.append(self._param(f"{site.name}.inv_smooth", (1.0 / smooth).astype(np.float32)))
            if plan["static"]:
                qargs.append(self._param(f"{site.name}.act_clip", np.array([plan["clip"]], np.float32)))
            qx = bb.emit(relax.call_tir(qgv, qargs, [codes_sinfo, relax.TensorType([m], "float32")]))
            return bb.emit(relax.TupleGetItem(qx, 0)), bb.emit(relax.TupleGetItem(qx, 1))

        share = qkey + (plan["clip"], None if smooth is None else smooth.tobytes())
        codes, xs = pre if pre is not None else self._shared(share, x2, quantize)
        args = [codes, self._param(f"{site.name}.int8", qmath.vnni_pack(q, lanes)),
                self._param(f"{site.name}.wsum", wsum), xs, self._param(f"{site.name}.wscale", ws)]
        if bias is not None:
            args.append(bias)
        key = ("ember_int8_matmul", site.k, site.n, lanes, int(bias is not None)) + \
            ((site.activation,) if site.activation else ())
        gv = self._func(bb, key, lambda: kernels.int8_matmul(site.k, site.n, lanes, bias is not None,
                                                             self.target, activation=site.activation))
        return bb.emit(relax.call_tir(gv, args, relax.TensorType([m, site.n], "float32")))

    def _conv(self, bb, site, x, plan):
        """INT8 conv2d (see :mod:`.conv`): quantize x once into padded NHWC codes (shared by every conv reading
        x with the same padding and scale), implicit-im2col int8 GEMM writing NCHW."""
        from . import conv as cv
        from . import conv_kernels as ck

        spec = site.conv
        lanes = kernels.int8_lanes(self.target)
        w, bias = cv.folded_weight_bias(site, self.imported.params)
        packed = cv.pack_weight(w, spec, lanes)
        self.dequantized[site.name] = packed["deq"]
        self.conv_fp32[site.name] = (w, bias)
        qmax = (1 << (plan["act_bits"] - 1)) - 1
        static = bool(plan["static"])
        qkey = ("ember_conv_quantize", spec.c, spec.h, spec.w) + spec.pads + (qmax, int(static))
        qgv = self._func(bb, qkey, lambda: ck.quantize_pad_nhwc(spec.c, spec.h, spec.w, spec.pads, qmax, static,
                                                                  self.target))
        batch = sinfo(x).shape.values[0]
        pt, pl, pb, pr = spec.pads
        cp = ck.padded_channels(spec.c)

        def quantize():
            qargs = [x] + ([self._param(f"{site.name}.act_clip", np.array([plan["clip"]], np.float32))]
                           if static else [])
            qx = bb.emit(relax.call_tir(qgv, qargs, [
                relax.TensorType([batch, spec.h + pt + pb, spec.w + pl + pr, cp], "uint8"),
                relax.TensorType([1], "float32")]))
            return bb.emit(relax.TupleGetItem(qx, 0)), bb.emit(relax.TupleGetItem(qx, 1))

        codes, xs = self._shared(qkey + (plan["clip"],), x, quantize)
        args = [codes, self._param(f"{site.name}.int8", packed["wpacked"]),
                self._param(f"{site.name}.wsum", packed["wsum"]), xs,
                self._param(f"{site.name}.wscale", packed["wscale"])]
        if bias is not None:
            args.append(self._param(f"{site.name}.bias", bias))
        key = ("ember_int8_conv2d", spec.c, spec.h, spec.w, spec.o) + spec.kernel + spec.strides + spec.dilation \
            + spec.pads + (lanes, int(bias is not None)) + ((site.activation,) if site.activation else ())
        gv = self._func(bb, key, lambda: ck.int8_conv2d(spec.c, spec.h, spec.w, spec.o, spec.kernel, spec.strides,
                                                         spec.dilation, spec.pads, lanes, bias is not None,
                                                         self.target, activation=site.activation))
        oh, ow = spec.out_hw
        y = bb.emit(relax.call_tir(gv, args, relax.TensorType([batch, spec.o, oh * ow], "float32")))
        return bb.emit(relax.op.reshape(y, [batch, spec.o, oh, ow]))

    def _embedding(self, bb, site, ids, plan):
        bits, group, sym = plan["bits"], plan["group"], plan["symmetric"]
        table = np.asarray(self.imported.params[site.weight_index], np.float32)
        arrays, deq = qmath.embedding_pack(table, bits, group, sym)
        self.dequantized[site.name] = deq
        ids_shape = list(sinfo(ids).shape.values)
        t = ids_shape[0]
        for d in ids_shape[1:]:
            t = t * d
        flat = bb.emit(relax.op.reshape(ids, [t]))
        idx_dtype = str(sinfo(ids).dtype)
        args = [flat] + [self._param(f"{site.name}.{k}", a) for k, a in arrays.items()]
        gv = self._gather_func(bb, site, bits, group, sym, idx_dtype)
        y = bb.emit(relax.call_tir(gv, args, relax.TensorType([t, site.k], "float32")))
        return bb.emit(relax.op.reshape(y, ids_shape + [site.k]))

    def _gather_func(self, bb, site, bits, group, sym, idx_dtype):
        """The decode-and-gather kernel of a quantized embedding table (GPU targets have their own)."""
        key = ("ember_wo_gather", bits, site.n, site.k, group, int(sym), idx_dtype)
        return self._func(bb, key, lambda: kernels.embedding_gather(site.n, site.k, bits, group, sym, idx_dtype,
                                                                    self.target))

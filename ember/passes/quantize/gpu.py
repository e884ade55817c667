"""Quantized layers for GPU targets (CUDA, ROCm, Metal): the GPU weight layouts and the kernels a site becomes.

The quantization itself — codes, scales, zero points, GPTQ — is the CPU path's (:mod:`.qmath`, via
:meth:`Emitter` helpers); only the layout the kernels read and the kernels differ:

* weight-only matmuls: ``W[N, K]`` (K contiguous, so a warp reads 512 contiguous bytes of one output column),
  codes packed into uint32 words along K (:func:`ember.schedules.gpu.quant_gemv.pack_words`), fp16 group scales
  ``[N, K/g]`` (+ uint8 zero points), decoded inside the GEMV kernel
  (:func:`ember.schedules.gpu.quant_gemv.weight_only_gemv_tiled` on words reordered by
  :func:`~ember.schedules.gpu.quant_gemv.interleave_words` for static row counts and whole 32-word stripes, else
  :func:`ember.schedules.gpu.quant_gemv.weight_only_gemv`; with ``quant_gemv.STAGED`` switched on, CUDA layers the
  staged kernel covers get :func:`~ember.schedules.gpu.quant_gemv.weight_only_gemv_staged` on interleaved words and
  :func:`~ember.schedules.gpu.quant_gemv.interleave_scales` scales — off: slower from DRAM on the H100): no
  full-precision weight buffer exists at run time. With ``precision="fp16"`` on sm_90+ CUDA (:func:`pdl_gemv_applies`)
  INT4 layers get the staged kernel as a programmatic dependent launch
  (:data:`~ember.schedules.gpu.quant_gemv.STAGED_FP16_PDL`, fp16 x, fp32 y), whose weight copies overlap the kernel
  before it, which :mod:`ember.passes.pdl` makes trigger early (H100 decode step: 27.5 vs 38.1 us, BENCHMARKS.md
  run 12);
* INT8 (dynamic or static activations): :func:`quantize_rows` turns each activation row into signed int8 codes
  four per int32 word plus a fp32 scale, then :func:`ember.schedules.gpu.quant_gemv.int8_gemv` accumulates
  int8 x int8 products in int32 (``__dp4a`` on CUDA) and applies ``xs[i] * ws[n] (+ bias)``;
* embedding tables: the CPU layout (``[V, D]`` codes, groups along D) and :func:`embedding_gather`, one thread per
  output element, decoding only the gathered rows.

Every kernel comes with its thread bindings (``tirx.is_scheduled``, ``op_pattern`` opaque), so neither FuseOps nor
dlight touch it. Before/after in Relax, for a linear layer on CUDA::

    y = R.matmul(x, R.permute_dims(w))                      # w: f32[N, K]
    →
    y2 = R.call_tir(ember_gpu_wo4_gemv, (x2, qweight, scales, bias), R.Tensor((m, N), "float32"))
                                                            # qweight: u32[N, K/8], scales: f16[N, K/g]
"""

from __future__ import annotations

import contextlib
import contextvars

import numpy as np
from tvm import relax, s_tir, te, tirx

from ...errors import ConfigError
from ...schedules.gpu import quant_gemv as qg
from . import kernels, qmath
from .emit import Emitter
from .graph import sinfo

OPAQUE = 8
THREADS = 128  # threads per row of the activation quantizer / per block of the gather

# Set (by ember.compile, around the quantization pass) when the model is compiled with precision="fp16": the
# activations reaching a quantized linear will be fp16 once the precision pass has run, so an INT4 layer may take
# fp16 x and give fp16 y (the PDL GEMV, :data:`~ember.schedules.gpu.quant_gemv.STAGED_FP16_PDL`) — with fp32
# activations that kernel would round x to fp16, a loss the caller did not ask for.
HALF_ACTIVATIONS: contextvars.ContextVar[bool] = contextvars.ContextVar("ember_half_activations", default=False)


@contextlib.contextmanager
def half_activations(on: bool):
    token = HALF_ACTIVATIONS.set(bool(on))
    try:
        yield
    finally:
        HALF_ACTIVATIONS.reset(token)


def pdl_gemv_applies(k: int, n: int, bits: int, group: int, rows, target) -> bool:
    """Whether a weight-only layer gets the PDL GEMV: fp16 activations (:data:`HALF_ACTIVATIONS`), INT4, an sm_90+
    CUDA target with PDL on (:mod:`ember.passes.pdl`), and a shape the staged kernel covers with its 2 warps."""
    from .. import pdl

    return (HALF_ACTIVATIONS.get() and bits == 4 and pdl.enabled() and pdl.target_supports(target)
            and qg.staged_applies(k, n, bits, group, rows, qg.STAGED_FP16_PDL["warps"], target=target))


def is_gpu_target(target) -> bool:
    return target is not None and target.kind.name in ("cuda", "rocm", "metal")


def _finish(func: tirx.PrimFunc) -> tirx.PrimFunc:
    return func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", OPAQUE)


# -- activation quantizer ----------------------------------------------------------------------------------
def tensor_absmax(k: int) -> tirx.PrimFunc:
    """max |x| over a whole [m, K] tensor → [1] (per-tensor dynamic INT8): one block of ``THREADS`` threads."""
    from tvm.script import tirx as T

    @T.prim_func(private=True, s_tir=True)
    def kernel(x_h: T.handle, out: T.Buffer((1,), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")
        for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
            mx = T.decl_buffer((1,), "float32", scope="local")
            red = T.decl_buffer((1,), "float32", scope="local")
            mx[0] = T.float32(0)
            for it in range((m * k + THREADS - 1) // THREADS):
                if it * THREADS + tx < m * k:
                    mx[0] = T.max(mx[0], T.abs(x[(it * THREADS + tx) // k, (it * THREADS + tx) % k]))
            if True:  # (a scope for the reduction attribute)
                T.attr(T.comm_reducer(lambda a, b: T.max(a, b), [T.float32(0)]), "reduce_scope",
                       T.reinterpret("handle", T.uint64(0)))
                T.tvm_thread_allreduce(T.uint32(1), mx[0], True, red[0], tx, dtype="handle")
            if tx == 0:
                out[0] = red[0]

    return _finish(qg.with_root_block(kernel))


def quantize_rows(k: int, qmax: int, per_token: bool, clip: bool, smooth: bool) -> tirx.PrimFunc:
    """x [m, K] fp32 → (codes int32 [m, ceil(K/4)]: four int8 codes per word, zero padded; scale fp32 [m]).

    One block per row. Range: per token, the row's max |x| (capped by ``clip[0]`` when given: static INT8);
    per tensor, ``clip[0]`` (the calibrated range, or :func:`tensor_absmax` for dynamic). Codes are
    ``round(x * qmax / range)`` clamped to ±qmax, exactly :func:`.qmath.quantize_activation_rows`.
    Arguments: x, [inv_smooth [K]], [clip [1]], codes, scale.
    """
    from tvm.script import tirx as T

    kw = -(-k // 4)
    qm = float(qmax)

    def xval(x, inv, i, c):
        return x[i, c] * inv[c] if smooth else x[i, c]

    @T.prim_func(private=True, s_tir=True)
    def kernel(x_h: T.handle, inv: T.Buffer((k,), "float32"), cl: T.Buffer((1,), "float32"), c_h: T.handle,
               s_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")
        codes = T.match_buffer(c_h, (m, kw), "int32")
        scale = T.match_buffer(s_h, (m,), "float32")
        for bx in T.thread_binding(m, thread="blockIdx.x"):
            for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                mx = T.decl_buffer((1,), "float32", scope="local")
                red = T.decl_buffer((1,), "float32", scope="local")
                rng = T.decl_buffer((1,), "float32", scope="local")
                word = T.decl_buffer((1,), "uint32", scope="local")
                if per_token:
                    mx[0] = T.float32(0)
                    for it in range((k + THREADS - 1) // THREADS):
                        if it * THREADS + tx < k:
                            mx[0] = T.max(mx[0], T.abs(xval(x, inv, bx, it * THREADS + tx)))
                    if True:  # (a scope for the reduction attribute)
                        T.attr(T.comm_reducer(lambda a, b: T.max(a, b), [T.float32(0)]), "reduce_scope",
                               T.reinterpret("handle", T.uint64(0)))
                        T.tvm_thread_allreduce(T.uint32(1), mx[0], True, red[0], tx, dtype="handle")
                    if clip:
                        rng[0] = T.max(T.min(red[0], cl[0]), T.float32(1e-12))
                    else:
                        rng[0] = T.max(red[0], T.float32(1e-12))
                else:
                    rng[0] = T.max(cl[0], T.float32(1e-12))
                for it in range((kw + THREADS - 1) // THREADS):
                    if it * THREADS + tx < kw:
                        word[0] = T.uint32(0)
                        for j in T.unroll(4):
                            if (it * THREADS + tx) * 4 + j < k:
                                word[0] = T.bitwise_or(word[0], T.shift_left(T.Cast("uint32", T.bitwise_and(
                                    T.Cast("int32", T.max(T.min(T.nearbyint(
                                        xval(x, inv, bx, (it * THREADS + tx) * 4 + j) * (T.float32(qm) / rng[0])),
                                        T.float32(qm)), T.float32(-qm))), T.int32(255))), T.Cast("uint32", j * 8)))
                        codes[bx, it * THREADS + tx] = T.reinterpret("int32", word[0])
                if tx == 0:
                    scale[bx] = rng[0] / T.float32(qm)

    params = list(kernel.params)
    keep = [0] + ([1] if smooth else []) + ([2] if (clip or not per_token) else []) + [3, 4]
    return _finish(qg.with_root_block(kernel, [params[i] for i in keep]))


# -- embedding ---------------------------------------------------------------------------------------------
def embedding_gather(v: int, d: int, bits: int, group: int, symmetric: bool, index_dtype: str) -> tirx.PrimFunc:
    """``take(deq(table), ids, axis=0)`` → [t, D], the CPU layout (:func:`.kernels.embedding_gather`'s), one
    thread per output element. Arguments: ids, qweight, scales, [zeros]."""
    g = d if group == -1 else group
    t = tirx.Var("t", "int64")
    i64 = kernels._i64  # pylint: disable=protected-access
    ids = te.placeholder((t,), index_dtype, name="ids")
    qw = te.placeholder((i64(v), i64((d + 1) // 2 if bits == 4 else d)), "uint8", name="qweight")
    sc = te.placeholder((i64(v), i64(d // g)), "float16", name="scales")
    zp = None if symmetric else te.placeholder((i64(v), i64(d // g)), "uint8", name="zeros")
    deq = kernels._decode(qw, sc, zp, bits, g, False)  # pylint: disable=protected-access

    def row(i):  # out-of-range ids read the first / last row rather than memory outside the table
        return tirx.max(tirx.min(ids[i].astype("int64"), i64(v - 1)), i64(0))

    out = te.compute((t, i64(d)), lambda i, j: deq(row(i), j), name="gather")
    sch = s_tir.Schedule(te.create_prim_func([ids, qw, sc] + ([zp] if zp is not None else []) + [out]))
    i, j = sch.get_loops(sch.get_sblock("gather"))
    bx, tx = sch.split(sch.fuse(i, j), factors=[None, THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    return _finish(sch.mod["main"].without_attr("global_symbol"))


# -- the emitter -------------------------------------------------------------------------------------------
def _static_rows(m):
    v = getattr(m, "value", m)
    return int(v) if isinstance(v, (int, np.integer)) else None


def _input_dependent(func) -> set:
    """The vars of ``func`` whose values depend on a model input (not only on weights and constants)."""
    n_in = int(func.attrs["num_input"])
    dep = set(func.params[:n_in])
    for block in func.body.blocks:
        for b in block.bindings:
            if any(v in dep for v in relax.analysis.free_vars(b.value)) or \
                    (isinstance(b.value, relax.Var) and b.value in dep):
                dep.add(b.var)
    return dep


class GpuEmitter(Emitter):
    """:class:`.emit.Emitter` with the GPU layouts and kernels (see module doc); same plans, report, params."""

    def __init__(self, imported, plans: dict, target, sites=()):
        super().__init__(imported, plans, target)
        self._from_inputs = _input_dependent(imported.mod["main"])
        for site in sites:  # refuse before rewriting (an error raised inside the Relax mutator loses its type)
            plan = plans.get(site.name, {})
            if site.kind == "matmul" and plan.get("scheme") == "weight_only":
                bits, group = plan["bits"], plan["group"]
                epw = 32 // bits
                if site.k % epw or (group != -1 and group % epw):
                    raise ConfigError(
                        f"WeightOnly(bits={bits}, group_size={group}) on a GPU target: layer '{site.name}' (K={site.k}) "
                        f"needs K and the group size to be multiples of {epw} (codes are packed {epw} per 32-bit "
                        f"word); use a group size that is a multiple of {epw} and a model whose K is, or a CPU target")

    def _rows(self, m):
        rows = _static_rows(m)
        return rows if rows is not None and rows <= qg.MAX_STATIC_ROWS else None

    def _weight_only(self, bb, site, x2, m, plan, bias):
        bits, group, sym = plan["bits"], plan["group"], plan["symmetric"]
        arrays, deq = qmath.weight_only_pack(self._weight_kn(site), bits, group, sym, plan.get("gptq_x"))
        self.dequantized[site.name] = deq
        codes = qmath.unpack_int4(arrays["qweight"], site.n) if bits == 4 else arrays["qweight"]  # [K, N]
        rows = self._rows(m)
        # the tiled kernel (16-byte weight loads) where the shape allows, else the one-word-per-lane kernel (symbolic
        # rows, K not a multiple of 32 words, odd N); the staged kernel (cp.async: a warp's whole row in flight at
        # once) only when switched on (qg.STAGED: slower than the tiled one from DRAM, faster from L2)
        pdl = pdl_gemv_applies(site.k, site.n, bits, group, rows, self.target)
        staged = pdl or (qg.STAGED and qg.staged_applies(site.k, site.n, bits, group, rows, target=self.target))
        tiled = not staged and qg.TILED and qg.tiled_applies(site.k, site.n, bits, group, rows, qg.TILE_COLS,
                                                             qg.TILE_WARPS)
        words = qg.pack_words(np.ascontiguousarray(codes.T), bits)
        scales = np.ascontiguousarray(arrays["scales"].T)
        gpu = {"qweight": qg.interleave_words(words) if tiled or staged else words,
               "scales": qg.interleave_scales(scales, site.k, bits, group) if staged else scales}
        if not sym:
            gpu["zeros"] = np.ascontiguousarray(arrays["zeros"].T)
        # the PDL GEMV reads fp16 x (a cast here, which ember's fusion puts into the producer's kernel: the norm or
        # the activation) and writes fp32 y (its sums are fp32; no cast kernel between it and its consumers)
        args = [bb.emit(relax.op.astype(x2, "float16")) if pdl else x2]
        args += [self._param(f"{site.name}.{k}", a) for k, a in gpu.items()]
        if bias is not None:
            args.append(bias)
        key = ("ember_gpu_wo_gemv", bits, site.k, site.n, group, int(sym), int(bias is not None), rows or "m",
               "staged_pdl" if pdl else "staged" if staged else "tiled" if tiled else "word")

        def make():
            if pdl:
                return _finish(qg.weight_only_gemv_staged(site.k, site.n, bits, group, sym, bias is not None,
                                                          "float16", rows, self.target, out_dtype="float32",
                                                          **qg.STAGED_FP16_PDL))
            if staged:
                return _finish(qg.weight_only_gemv_staged(site.k, site.n, bits, group, sym, bias is not None,
                                                          "float32", rows, self.target,
                                                          pipeline=qg.STAGED_PIPELINE))
            if tiled:
                return _finish(qg.weight_only_gemv_tiled(site.k, site.n, bits, group, sym, bias is not None,
                                                         "float32", rows, self.target, cols=qg.TILE_COLS,
                                                         warps=qg.TILE_WARPS, stream=qg.TILE_STREAM))
            return _finish(qg.weight_only_gemv(site.k, site.n, bits, group, sym, bias is not None, "float32",
                                               rows, self.target))
        gv = self._func(bb, key, make)
        return bb.emit(relax.call_tir(gv, args, relax.TensorType([m, site.n], "float32")))

    def norm(self, bb, ns, a, r, gamma, beta):
        """The CPU path fuses a layer norm with the per-token quantizer of its INT8 consumers; on GPUs the layer
        norm stays a Relax op (scheduled by the GPU rules) and each consumer quantizes its input itself."""
        x = a if r is None else bb.emit(relax.op.add(a, r))
        return bb.emit(relax.op.nn.layer_norm(x, gamma, beta, axes=[-1], epsilon=float(ns.eps)))

    def _int8(self, bb, site, x2, m, plan, bias, pre=None):
        assert pre is None, "GPU INT8 layers quantize their own inputs (no fused layer-norm quantizer)"
        smooth = plan.get("smooth")
        w = self._weight_kn(site)
        q, ws = qmath.int8_weight(w if smooth is None else w * smooth[:, None])
        self.dequantized[site.name] = q.astype(np.float32) * ws[None, :] / (1 if smooth is None else smooth[:, None])
        qmax = (1 << (plan["act_bits"] - 1)) - 1
        per_token, static = plan["per_token"], plan["static"]
        kw = -(-site.k // 4)
        qkey = ("ember_gpu_quant_rows", site.k, qmax, int(per_token), int(static), int(smooth is not None))
        qgv = self._func(bb, qkey, lambda: quantize_rows(site.k, qmax, per_token, static, smooth is not None))

        def quantize():
            qargs = [x2]
            if smooth is not None:
                qargs.append(self._param(f"{site.name}.inv_smooth", (1.0 / smooth).astype(np.float32)))
            if static:
                qargs.append(self._param(f"{site.name}.act_clip", np.array([plan["clip"]], np.float32)))
            elif not per_token:  # dynamic per tensor: the range is this tensor's max |x|, found first
                if smooth is not None:
                    raise ConfigError("per-tensor dynamic INT8 with smoothing is not supported on GPU targets")
                agv = self._func(bb, ("ember_gpu_absmax", site.k), lambda: tensor_absmax(site.k))
                qargs.append(bb.emit(relax.call_tir(agv, [x2], relax.TensorType([1], "float32"))))
            qx = bb.emit(relax.call_tir(qgv, qargs, [relax.TensorType([m, kw], "int32"),
                                                     relax.TensorType([m], "float32")]))
            return bb.emit(relax.TupleGetItem(qx, 0)), bb.emit(relax.TupleGetItem(qx, 1))

        share = qkey + (plan["clip"], None if smooth is None else smooth.tobytes())
        codes, xs = self._shared(share, x2, quantize)
        args = [codes, self._param(f"{site.name}.int8", qg.pack_int8_words(np.ascontiguousarray(q.T))), xs,
                self._param(f"{site.name}.wscale", ws)]
        if bias is not None:
            args.append(bias)
        rows = self._rows(m)
        key = ("ember_gpu_int8_gemv", site.k, site.n, int(bias is not None), rows or "m")
        gv = self._func(bb, key, lambda: _finish(qg.int8_gemv(site.k, site.n, bias is not None, rows,
                                                              self.target)))
        y = bb.emit(relax.call_tir(gv, args, relax.TensorType([m, site.n], "float32")))
        if getattr(site, "activation", None) == "gelu":  # the CPU kernel fuses it; here it stays its own op
            y = bb.emit(relax.op.nn.gelu(y))
        elif getattr(site, "activation", None):
            raise ConfigError(f"layer '{site.name}': activation {site.activation!r} after an INT8 matmul is not "
                              "supported on GPU targets")
        return y

    def _embedding(self, bb, site, ids, plan):
        if not (isinstance(site.x, relax.Var) and site.x in self._from_inputs):
            # ids known at compile time (position / token-type ids): ember lifts weight-only computations into the
            # weight transform that runs once on the build machine's CPU, where a GPU kernel cannot run; the
            # lookup stays a plain take of the fp32 table (computed once there), and the report shows no error.
            self.dequantized[site.name] = np.asarray(self.imported.params[site.weight_index], np.float32)
            func = self.imported.mod["main"]
            weight = func.params[int(func.attrs["num_input"]) + site.weight_index]
            return bb.emit(relax.op.take(weight, ids, axis=0))
        return super()._embedding(bb, site, ids, plan)

    def _gather_func(self, bb, site, bits, group, sym, idx_dtype):
        key = ("ember_gpu_wo_gather", bits, site.n, site.k, group, int(sym), idx_dtype)
        return self._func(bb, key, lambda: embedding_gather(site.n, site.k, bits, group, sym, idx_dtype))

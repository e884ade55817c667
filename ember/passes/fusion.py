"""ember's kernel fusion: what it fuses beyond TVM's ``FuseOps``, and how.

TVM's default ``FuseOps`` fuses a matmul/conv with the *elementwise* ops right after it, and injective chains
with each other. On a transformer imported from PyTorch that leaves, per encoder layer of all-MiniLM-L6-v2
(batch 1, seq 128), 18 kernel launches: the importer puts a ``reshape`` between every linear layer and its
GELU / residual add (a reshape is injective, not elementwise, so FuseOps stops there), and attention is five
launches plus three head transposes. This module adds three rewrites, all before ``LegalizeOps``:

1. **Attention** (:class:`FuseAttention`): the subgraph ::

       s = matmul(q, permute_dims(k)) * scale (+ mask);  p = softmax(s, axis=-1);  o = matmul(p, v)

   (through any reshapes / no-op broadcasts / head transposes the importer put around it) becomes one
   ``call_tir`` of a kernel from :mod:`ember.passes.attention_kernels` for the target: on CPU blocks of query
   rows with online softmax, on GPUs a flash-attention-style kernel with thread bindings. Neither allocates the
   ``seq x seq`` score matrix. The kernel reads q/k/v straight from the linear layers' outputs in
   ``(batch, seq, heads, head_dim)`` order and writes its output in the same order, so the head transposes
   before and after attention disappear as well (:class:`CancelPermutes` removes the pairs this leaves).
   The match sees through float casts: ``precision="fp16"`` (scores from an fp32-output matmul cast to fp16 and
   back, softmax in fp32, P cast to fp16) and ember's torch import of fp16 models (V cast up for an fp32 P @ V).
   The kernel keeps scores in fp32, writes the dtype the graph casts its output to (the cast pair then cancels),
   and on CUDA keeps an fp32 P exact (two fp16 parts); fp16 sites on sm_80+ get the tensor-core kernel.
2. **Matmul / conv epilogues** (:func:`epilogue_patterns`): ``matmul|conv`` + bias + activation (ReLU, GELU,
   GELU-tanh, SiLU, sigmoid, tanh, and ONNX's decomposed ``x * 0.5 * (1 + erf(x / sqrt 2))``) + residual add,
   across the reshapes in between, become one kernel. The CPU matmul rule computes the epilogue on each register
   tile right after its K loop, so the output is written once.
3. **Residual add + normalization**: ``layer_norm(a + b)`` / ``rms_norm(a + b)`` become one kernel when the sum
   is used by nothing else (a residual add with a matmul producer is already taken by 2).

2 and 3 group ops with ``FuseOpsByPattern`` into primitive functions that ``FuseTIR`` turns into one PrimFunc
each, after ``LegalizeOps``; every rewrite checks that the intermediate values it swallows have no other user.

On GPU targets 2 and 3 also see through the float casts ``precision="fp16"`` leaves (``matmul -> astype(f16) ->
bias -> gelu``; ``astype -> add -> layer_norm -> astype``), after :mod:`ember.passes.half_norm` has put each fp16
cast of a layer norm output right after the norm: no cast kernels remain around the norms, and an add + layer
norm whose fp32 output also feeds the residual becomes one kernel with two outputs (``EXACT_RESIDUAL``).
Dequantize/unpack fusion of compressed weights lives in the quantization and sparsity kernels themselves.
"""

from __future__ import annotations

import itertools
import os
import traceback

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import GlobalVarPattern, is_op, wildcard
from tvm.relax.expr_functor import PyExprMutator, mutator

from .attention_kernels import (AttentionSpec, cpu_attention, cuda_attention, cuda_attention_tensor_cores,
                                tensor_core_eligible)
from .attention_mask import narrow_rows
from .relax_util import usage_counts

_GPU_KINDS = {"cuda", "rocm", "metal", "vulkan", "opencl", "webgpu"}
# Target kinds whose attention sites read a mask with equal rows as one row (ember.passes.attention_mask). GPUs:
# MiniLM's [B, 1, S, S] padding mask cost 12 reads of 2 MiB per layer at batch 32. Empty: the mask as the graph
# has it (the before/after switch of the benchmarks).
NARROW_MASKS = frozenset(_GPU_KINDS)
_CONST_TYPE = type(relax.const(0.0))
_VIEWS = ("relax.reshape", "relax.broadcast_to")
BSHD, BHSD = (0, 2, 1, 3), (0, 1, 2, 3)


# ---------------------------------------------------------------------------------------------------------------
# small helpers over Relax expressions
def _op_name(expr) -> str | None:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def _shape(expr):
    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    return list(ty.shape.values)


def _dtype(expr) -> str | None:
    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def _static(dims) -> list | None:
    out = []
    for d in dims:
        if not isinstance(d, tvm.tirx.IntImm):
            return None
        out.append(int(d.value))
    return out


def _same_dims(a, b) -> bool:
    if a is None or b is None or len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, tvm.tirx.IntImm) and isinstance(y, tvm.tirx.IntImm):
            if x.value != y.value:
                return False
        elif not x.same_as(y) and not _prove_equal(x, y):
            return False
    return True


def _prove_equal(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from tvm.sym import Analyzer  # TVM 0.27: the arithmetic analyzer lives in tvm.sym

    return bool(Analyzer().can_prove_equal(a, b))


def _numel(dims):
    n = 1
    for d in dims:
        n = n * d
    return n


def _is_float(expr) -> bool:
    return "float" in (_dtype(expr) or "")


def _float_bits(dtype: str | None) -> int:
    return int(dtype[len("float"):]) if dtype and dtype.startswith("float") and dtype[5:].isdigit() else 0


def _scalar_const(expr) -> float | None:
    if isinstance(expr, _CONST_TYPE):
        arr = expr.value.numpy()
        if arr.size == 1:
            return float(arr.reshape(()))
    return None


def _compose(outer_axes, inner_axes):
    """permute_dims(permute_dims(x, inner), outer) == permute_dims(x, result)."""
    return tuple(inner_axes[a] for a in outer_axes)


# ---------------------------------------------------------------------------------------------------------------
# 1. attention
class _Resolver:
    """Walk back from a value through views (reshape, no-op broadcast_to) and permute_dims."""

    def __init__(self, lookup):
        self.lookup = lookup

    def view_source(self, expr):
        """The earliest value reachable through views that has the same shape as ``expr``."""
        want = _shape(expr)
        best = expr
        cur = expr
        while isinstance(cur, relax.Var):
            val = self.lookup(cur)
            if isinstance(val, relax.Var):  # an alias (what a cancelled cast pair leaves)
                cur = val
                continue
            if _op_name(val) not in _VIEWS:
                break
            src = val.args[0]
            src_shape, cur_shape = _shape(src), _shape(cur)
            if src_shape is None or cur_shape is None:
                break
            if _op_name(val) == "relax.broadcast_to" and not _same_dims(src_shape, cur_shape):
                break  # a real broadcast, not a view
            cur = src
            if _same_dims(_shape(cur), want):
                best = cur
        return best

    def as_permuted(self, expr, rank: int = 4):
        """(base, axes) with ``expr == permute_dims(base, axes)`` up to views, ``base`` of rank ``rank``."""
        base = self.view_source(expr)
        axes = tuple(range(rank))
        while isinstance(base, relax.Var):
            val = self.lookup(base)
            if _op_name(val) != "relax.permute_dims" or val.attrs.axes is None:
                break
            inner = tuple(int(a) for a in val.attrs.axes)
            if len(inner) != rank:
                break
            axes = _compose(axes, inner)
            base = self.view_source(val.args[0])
        return base, axes


@mutator
class _AttentionRewriter(PyExprMutator):
    def __init__(self, mod, kind: str, lanes: int, uses: dict, narrowed: dict | None = None,
                 tensor_cores: bool = False):
        super().__init__(mod)
        self.kind, self.lanes, self.uses = kind, lanes, uses
        # matmul call -> the dtype its only user casts it to (precision="fp16": matmul(out_dtype=f32) + astype)
        self.narrowed = narrowed or {}
        self.tensor_cores = tensor_cores
        self.res = _Resolver(self._lookup)
        self.sites: list = []
        self._kernels: dict = {}
        self._masks: dict = {}

    def _lookup(self, var):
        try:
            return self.lookup_binding(var)
        except Exception:  # pylint: disable=broad-except
            return None

    def _single_use(self, var) -> bool:
        return not isinstance(var, relax.Var) or self.uses.get(var, 0) <= 1

    def visit_call_(self, op: relax.Call):
        orig = op
        op = super().visit_call_(op)
        if _op_name(op) != "relax.matmul":
            return op
        try:
            fused = self._match(op, self.narrowed.get(orig))
        except Exception:  # pylint: disable=broad-except
            # An IR shape the matcher did not foresee: leave the graph as it was (still correct, just unfused).
            # EMBER_DEBUG_FUSION=1 shows why.
            if os.environ.get("EMBER_DEBUG_FUSION"):
                traceback.print_exc()
            fused = None
        return op if fused is None else fused

    # -- matching -----------------------------------------------------------------------------------------
    def _match(self, pv: relax.Call, narrowed_to: str | None = None):  # pylint: disable=too-many-return-statements,too-many-locals,too-many-branches,too-many-statements
        p_arg, v_arg = pv.args
        out_shape = _shape(pv)
        if out_shape is None:
            return self._skip(1)
        # p: softmax(x, axis=-1) through views and float casts (precision="fp16" / the torch importer put
        # ``astype`` between softmax (kept in fp32) and the fp16 value product)
        p4 = self._through_views(p_arg, "relax.nn.softmax")
        p_val = self._lookup(p4) if isinstance(p4, relax.Var) else None
        if _op_name(p_val) != "relax.nn.softmax" or not self._single_use(p4):
            return self._skip(2)
        x = p_val.args[0]
        xs = _shape(x)
        if xs is None or len(xs) != 4 or int(p_val.attrs.axis) not in (-1, 3):
            return self._skip(3)
        batch, heads, q_len, kv_len = xs
        # x = scores * scale (+ mask), in either operand order
        mask = None
        cur = x
        val = self._lookup(cur) if isinstance(cur, relax.Var) else None
        if _op_name(val) == "relax.add" and self._single_use(cur):
            a, b = val.args
            a_is_scores = self._scores_of(self._strip_scale(self._skip_casts(a))[1]) is not None
            cur, mask = (a, b) if a_is_scores else (b, a)
        scale, cur = self._strip_scale(self._skip_casts(cur))
        qk = self._scores_of(cur)
        if qk is None or not self._single_use(cur):
            return self._skip(4)
        q_arg, kt_arg = qk.args
        # Inputs widened by a cast (the torch importer's ``astype(v, "float32")`` before an fp32 value product):
        # the kernel reads the narrow tensor (it computes in fp32 anyway), and the graph's exact fp32 P is kept
        # (``exact_p`` below).
        q_arg, kt_arg, v_arg = (self._unwiden(x) for x in (q_arg, kt_arg, v_arg))
        # static dims except a symbolic batch
        dims = _static([heads, q_len, kv_len])
        if dims is None:
            return self._skip(5)
        heads_i, q_len_i, kv_len_i = dims
        batch_i = int(batch.value) if isinstance(batch, tvm.tirx.IntImm) else None
        q_base, q_axes = self.res.as_permuted(self._reshape_to_4d(q_arg, [batch, heads, q_len, None]))
        k_base, kt_axes = self.res.as_permuted(self._reshape_to_4d(kt_arg, [batch, heads, None, kv_len]))
        v_base, v_axes = self.res.as_permuted(self._reshape_to_4d(v_arg, [batch, heads, kv_len, None]))
        k_axes = _compose((0, 1, 3, 2), kt_axes)
        head_dim = _shape(q_base)[q_axes[3]] if _shape(q_base) is not None else None
        if head_dim is None or not isinstance(head_dim, tvm.tirx.IntImm):
            return self._skip(6)
        head_dim = int(head_dim.value)
        layouts = []
        for axes in (q_axes, k_axes, v_axes):
            if axes == BHSD:
                layouts.append("bhsd")
            elif axes == BSHD:
                layouts.append("bshd")
            else:
                return self._skip(7)
        dtype = _dtype(q_base)
        if dtype is None or "float" not in dtype or _dtype(k_base) != dtype or _dtype(v_base) != dtype:
            return self._skip(8)
        # The dtype the graph's P has when it meets V: an fp32 P on fp16 inputs is kept exact on tensor cores
        # by splitting it into two fp16 parts (hi + lo).
        p_dtype = _dtype(p_arg)
        exact_p = dtype == "float16" and p_dtype in ("float32", "float64")
        # What the kernel writes: the matmul's dtype, or the narrower one its only user casts it to.
        pv_dtype = _dtype(pv)
        out_dtype = narrowed_to if narrowed_to is not None else pv_dtype
        # check the resolved tensors have the shapes the kernel will declare
        for base, layout, seq in ((q_base, layouts[0], q_len), (k_base, layouts[1], kv_len),
                                  (v_base, layouts[2], kv_len)):
            want = ([batch, heads, seq, head_dim] if layout == "bhsd" else [batch, seq, heads, head_dim])
            if not _same_dims(_shape(base), [tvm.tirx.IntImm("int64", w) if isinstance(w, int) else w
                                             for w in want]):
                return self._skip(9)
        mask_shape, mask_dtype, mask_sym, mask4 = None, "float32", False, None
        if mask is not None:
            mask = self._unwiden(mask)  # the kernel widens the mask itself
            if self.kind in NARROW_MASKS:  # a [B, 1, S, S] padding mask read as [B, 1, 1, S]
                mask = self._narrow_mask(mask)
            ms = _shape(mask)
            if ms is None or len(ms) > 4 or "float" not in (_dtype(mask) or ""):
                return self._skip(10)
            ms = [tvm.tirx.IntImm("int64", 1)] * (4 - len(ms)) + list(ms)
            full = [batch, heads, q_len, kv_len]
            mask_shape = []
            for i, (m, f) in enumerate(zip(ms, full)):
                if isinstance(m, tvm.tirx.IntImm) and m.value == 1:
                    mask_shape.append(1)
                elif _same_dims([m], [f]):
                    if i == 0 and batch_i is None:
                        mask_sym = True
                        mask_shape.append(1)  # placeholder, symbolic
                    else:
                        mask_shape.append(int(f.value))
                else:
                    return self._skip(11)
            mask_dtype = _dtype(mask)
            mask4 = mask if len(_shape(mask)) == 4 else relax.op.reshape(mask, ms)
        gpu = self.kind != "llvm"
        if not gpu and out_dtype != dtype:
            # The CPU kernel writes its input dtype: an fp16 kernel output where the graph keeps fp32 would be
            # less accurate than the unfused graph.
            return self._skip(12)
        if out_dtype is None or "float" not in out_dtype:
            out_dtype = dtype
        tc = gpu and self.tensor_cores
        spec = AttentionSpec(batch=batch_i, heads=heads_i, q_len=q_len_i, kv_len=kv_len_i, head_dim=head_dim,
                             dtype=dtype, q_layout=layouts[0], k_layout=layouts[1], v_layout=layouts[2],
                             out_layout="bshd", scale=float(np.float32(scale)),
                             mask_shape=tuple(mask_shape) if mask_shape else None, mask_dtype=mask_dtype,
                             mask_batch_symbolic=mask_sym,
                             out_dtype=out_dtype if out_dtype != dtype else None,
                             exact_p=bool(exact_p and tc))
        gv = self._kernel(spec)
        args = [q_base, k_base, v_base] + ([mask4] if mask4 is not None else [])
        out_ty = relax.TensorType([batch, q_len, heads, head_dim], out_dtype)
        attn = self.builder_.emit(relax.call_tir(gv, args, out_ty), name_hint="attention")
        self.sites.append(spec)
        res = relax.op.permute_dims(attn, [0, 2, 1, 3])
        if not _same_dims(out_shape, [batch, heads, q_len, head_dim]):
            res = relax.op.reshape(self.builder_.emit(res), out_shape)
        if out_dtype != pv_dtype:
            # the matmul's own dtype; the narrowing cast after it then cancels (_PermuteCanceller)
            res = relax.op.astype(self.builder_.emit(res), pv_dtype)
        return res

    def _narrow_mask(self, mask):
        """``mask`` with one query row when its rows are all equal (the same narrow mask for every layer)."""
        if mask in self._masks:
            return self._masks[mask]
        narrow = narrow_rows(mask, self._lookup, self.builder_.emit)
        narrow = mask if narrow is None else narrow
        if isinstance(mask, relax.DataflowVar):  # its users are in its block, where the narrow mask is bound
            self._masks[mask] = narrow
        return narrow

    def _const_value(self, expr) -> float | None:
        """A scalar constant, also behind a cast (precision="fp16" binds ``astype(const, "float16")`` to a
        var): the value the graph computes with, i.e. rounded to the cast's dtype."""
        c = _scalar_const(expr)
        if c is not None or not isinstance(expr, relax.Var):
            return c
        val = self._lookup(expr)
        if _op_name(val) == "relax.astype":
            inner = self._const_value(val.args[0])
            if inner is not None:
                return float(np.asarray(inner).astype(str(val.attrs.dtype)))
        return None

    def _skip_casts(self, expr):
        """``expr`` with single-use float-to-float casts and views in front of it stripped (the scores path of
        an fp16 graph: ``astype(multiply(reshape(astype(matmul(..., out_dtype=f32), f16)), s), f32)``). The
        kernel computes scores in fp32, so dropping a cast to fp16 only removes a rounding."""
        cur = expr
        while isinstance(cur, relax.Var) and self._single_use(cur):
            val = self._lookup(cur)
            if _op_name(val) == "relax.astype" and _is_float(val.args[0]) and _is_float(val):
                cur = val.args[0]
            else:
                break
        return cur

    def _unwiden(self, expr):
        """The narrower float tensor ``expr`` is a widening cast of (through views), else ``expr``."""
        cur = expr
        while isinstance(cur, relax.Var):
            val = self._lookup(cur)
            if _op_name(val) == "relax.astype" and _is_float(val.args[0]) and _is_float(val) and \
                    _float_bits(_dtype(val.args[0])) < _float_bits(_dtype(val)) and self._single_use(cur):
                return val.args[0]
            if _op_name(val) not in _VIEWS or not self._single_use(cur):
                return expr
            if _op_name(val) == "relax.broadcast_to" and not _same_dims(_shape(val.args[0]), _shape(cur)):
                return expr
            cur = val.args[0]
        return expr

    def _strip_scale(self, expr):
        """(scale, scores) for ``scores * c``, ``c * scores``, ``scores / c`` with a scalar constant c."""
        val = self._lookup(expr) if isinstance(expr, relax.Var) else None
        if _op_name(val) in ("relax.multiply", "relax.divide") and self._single_use(expr):
            a, b = val.args
            ca, cb = self._const_value(a), self._const_value(b)
            if _op_name(val) == "relax.multiply" and (ca is not None or cb is not None):
                return (ca, b) if ca is not None else (cb, a)
            if _op_name(val) == "relax.divide" and cb is not None and cb != 0:
                return 1.0 / cb, a
        return 1.0, expr

    @staticmethod
    def _skip(where: int):
        """Not an attention site (or one this kernel cannot take); EMBER_DEBUG_FUSION=1 says which check."""
        if os.environ.get("EMBER_DEBUG_FUSION"):
            print(f"ember.FuseAttention: no match (check {where})")
        return None

    def _through_views(self, expr, op_name: str):
        """The var bound to an ``op_name`` call that ``expr`` is a view of (reshapes, no-op broadcasts), or None."""
        cur = expr
        while isinstance(cur, relax.Var):
            val = self._lookup(cur)
            if _op_name(val) == op_name:
                return cur
            if _op_name(val) == "relax.astype" and _is_float(val.args[0]) and _is_float(val):
                cur = val.args[0]  # P rounded to fp16 for the value product: the kernel does the same
                continue
            if _op_name(val) not in _VIEWS:
                return None
            src_shape, cur_shape = _shape(val.args[0]), _shape(cur)
            if src_shape is None or cur_shape is None or not _prove_equal(_numel(src_shape), _numel(cur_shape)):
                return None  # a real broadcast (or unknown shapes): not the same data
            cur = val.args[0]
        return None

    def _scores_of(self, expr):
        """The ``matmul(q, k^T)`` that ``expr`` is, through views, or None."""
        if not isinstance(expr, relax.Var):
            return None
        src = expr
        while isinstance(src, relax.Var):
            val = self._lookup(src)
            if _op_name(val) == "relax.matmul":
                return val
            if _op_name(val) == "relax.astype" and _is_float(val.args[0]) and _is_float(val):
                src = val.args[0]  # fp32 scores rounded to fp16 (precision="fp16"): the kernel keeps fp32
                continue
            if _op_name(val) not in _VIEWS:
                return None
            if _op_name(val) == "relax.broadcast_to" and not _same_dims(_shape(val.args[0]), _shape(src)):
                return None
            src = val.args[0]
        return None

    def _reshape_to_4d(self, expr, want):
        """``expr`` as the 4-D tensor the kernel reads: the 4-D view of the same data when the importer flattened
        batch and heads (``[B*H, S, D]``)."""
        shape = _shape(expr)
        if shape is not None and len(shape) == 4:
            return expr
        src = self.res.view_source(expr)
        cur = expr
        # walk back to the nearest 4-D view whose leading dims are (batch, heads)
        while isinstance(cur, relax.Var):
            s = _shape(cur)
            if s is not None and len(s) == 4 and _same_dims(s[:2], want[:2]):
                return cur
            val = self._lookup(cur)
            if _op_name(val) not in _VIEWS:
                break
            cur = val.args[0]
        return src

    def _kernel(self, spec: AttentionSpec):
        if spec in self._kernels:
            return self._kernels[spec]
        if self.kind == "llvm":
            func = cpu_attention(spec, self.lanes)
        elif self.tensor_cores and tensor_core_eligible(spec):
            func = cuda_attention_tensor_cores(spec)
        else:
            func = cuda_attention(spec)
        func = func.with_attr("ember.fused_ops", spec.ops())
        gv = self.builder_.add_func(func, "fused_attention")
        self._kernels[spec] = gv
        return gv


@mutator
class _PermuteCanceller(PyExprMutator):
    """``permute_dims(view(permute_dims(x, p1)), p2)`` with ``p1 o p2 = identity`` -> a view of ``x``."""

    def __init__(self, mod):
        super().__init__(mod)
        self.res = _Resolver(self._lookup)
        self.cancelled = 0

    def _lookup(self, var):
        try:
            return self.lookup_binding(var)
        except Exception:  # pylint: disable=broad-except
            return None

    def visit_call_(self, op: relax.Call):
        op = super().visit_call_(op)
        if _op_name(op) == "relax.astype":
            return self._cancel_cast(op)
        if _op_name(op) != "relax.permute_dims" or op.attrs.axes is None:
            return op
        outer = tuple(int(a) for a in op.attrs.axes)
        src = self.res.view_source(op.args[0])
        val = self._lookup(src) if isinstance(src, relax.Var) else None
        if _op_name(val) != "relax.permute_dims" or val.attrs.axes is None:
            return op
        inner = tuple(int(a) for a in val.attrs.axes)
        if len(inner) != len(outer) or _compose(outer, inner) != tuple(range(len(outer))):
            return op
        base = val.args[0]
        out_shape = _shape(op)
        if out_shape is None:
            return op
        self.cancelled += 1
        if _same_dims(_shape(base), out_shape):
            return base
        return relax.op.reshape(base, out_shape)

    def _cancel_cast(self, op):
        """``astype(astype(y, wider), dtype(y))`` -> ``y``: exact (a float widened and narrowed back is itself).
        Left by the attention rewrite when the kernel writes the fp16 that the graph's fp32 matmul was cast to."""
        src = op.args[0]
        val = self._lookup(src) if isinstance(src, relax.Var) else None
        if _op_name(val) != "relax.astype":
            return op
        y = val.args[0]
        narrow, wide = _dtype(y), _dtype(src)
        if narrow == str(op.attrs.dtype) and _float_bits(narrow) and _float_bits(wide) > _float_bits(narrow):
            self.cancelled += 1
            return y
        return op


def _lanes_f32(target) -> int:
    try:
        from ..schedules.cpu.common import vector_lanes  # pylint: disable=import-outside-toplevel

        return vector_lanes(target, "float32")
    except Exception:  # pylint: disable=broad-except
        return 8


def _narrowed_matmuls(func) -> dict:
    """matmul call -> dtype, for ``y = matmul(..., out_dtype=f32); z = astype(y, f16)`` with ``y`` used only there
    (what precision="fp16" makes of every matmul): the fused kernel can write the narrow dtype directly."""
    uses = usage_counts(func)
    bound = {}
    out = {}
    for block in getattr(func.body, "blocks", []):
        for b in block.bindings:
            if not isinstance(b, relax.VarBinding):
                continue
            bound[b.var] = b.value
            val = b.value
            if _op_name(val) == "relax.astype" and isinstance(val.args[0], relax.Var):
                src = bound.get(val.args[0])
                if _op_name(src) == "relax.matmul" and uses.get(val.args[0], 0) == 1 and _is_float(val):
                    out[src] = str(val.attrs.dtype)
    return out


def _tensor_cores(target) -> bool:
    """mma.sync m16n8k16 (fp16 in, fp32 accumulate) needs NVIDIA sm_80 or newer."""
    if target.kind.name != "cuda":
        return False
    try:
        from ..schedules.gpu.common import sm_version  # pylint: disable=import-outside-toplevel

        return sm_version(target) >= 80
    except Exception:  # pylint: disable=broad-except
        return False


def FuseAttention(target: tvm.target.Target, tensor_cores: bool | None = None) -> tvm.transform.Pass:  # pylint: disable=invalid-name
    """Module pass: replace attention subgraphs by one fused kernel for ``target`` (see module doc).

    ``tensor_cores``: None (default) uses the fp16 tensor-core kernel wherever the target has mma.sync (NVIDIA
    sm_80+); False forces the CUDA-core kernel (for comparisons)."""
    kind = target.kind.name
    lanes = _lanes_f32(target) if kind == "llvm" else 1
    tensor_cores = _tensor_cores(target) if tensor_cores is None else bool(tensor_cores and _tensor_cores(target))

    @tvm.transform.module_pass(opt_level=0, name="ember.FuseAttention")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if kind != "llvm" and kind not in _GPU_KINDS:
            return mod
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, relax.Function) or (func.attrs and "Primitive" in func.attrs):
                continue
            rw = _AttentionRewriter(mod, kind, lanes, usage_counts(func), _narrowed_matmuls(func), tensor_cores)
            new = rw.visit_expr(func)
            if rw.sites:
                mod = rw.builder_.get()
                mod.update_func(gv, new)
                canceller = _PermuteCanceller(mod)
                mod.update_func(gv, canceller.visit_expr(mod[gv]))
        return relax.transform.DeadCodeElimination()(mod)

    return _pass


# ---------------------------------------------------------------------------------------------------------------
# 2./3. epilogue and residual+norm patterns (FuseOpsByPattern)
def _add(a, b):
    return is_op("relax.add")(a, b) | is_op("relax.add")(b, a)


def _mul(a, b):
    return is_op("relax.multiply")(a, b) | is_op("relax.multiply")(b, a)


def _activation(x):
    named = None
    for op in ("relax.nn.relu", "relax.nn.gelu", "relax.nn.gelu_tanh", "relax.nn.silu", "relax.sigmoid",
               "relax.tanh"):
        p = is_op(op)(x)
        named = p if named is None else named | p
    clip = is_op("relax.clip")(x, wildcard(), wildcard())  # ReLU6
    # ONNX (opset < 20) GELU: x * 0.5 * (1 + erf(x / sqrt(2)))  (or x * (1 / sqrt 2))
    inner = is_op("relax.divide")(x, wildcard()) | is_op("relax.multiply")(x, wildcard())
    one_plus = _add(is_op("relax.erf")(inner), wildcard())
    erf_gelu = _mul(_mul(x, one_plus), wildcard()) | _mul(x, _mul(one_plus, wildcard()))
    return named | clip | erf_gelu


def _view(x):
    return is_op("relax.reshape")(x, wildcard())


def epilogue_patterns(casts: bool = False) -> list:
    """(name, pattern, annotations, check) tuples for FuseOpsByPattern, longest chains first.

    ``casts`` (GPU targets): also match through float casts, as ``precision="fp16"`` leaves them: a matmul
    accumulating in fp32 then cast to fp16 (``astype(matmul(...), "float16") + bias -> gelu``: the GELU joins
    the GEMM's epilogue), and add + layer norm whose operands are cast up to fp32 and whose output is cast to
    fp16 (ember.passes.half_norm): one kernel reading and writing fp16, computing in fp32. Off for CPU targets,
    whose rules were not written for those kernels."""
    # ember.passes.layout (CPU) has already turned weight matmuls/convs into call_tir of packed-weight kernels
    # (``packed_dense``, ``packed_conv2d_nhwc``): those are matmul/conv cores too.
    packed = is_op("relax.call_tir")(GlobalVarPattern(), wildcard())
    cores = {
        "matmul": is_op("relax.matmul")(wildcard(), wildcard()) | packed,
        "conv2d": is_op("relax.nn.conv2d")(wildcard(), wildcard()),
        "conv1d": is_op("relax.nn.conv1d")(wildcard(), wildcard()),
    }
    stages = [("bias", lambda x: _add(x, wildcard())), ("view", _view), ("act", _activation), ("view", _view),
              ("residual", lambda x: _add(x, wildcard())), ("view", _view)]
    cores = {name: (core, core) for name, core in cores.items()}  # name -> (pattern, the contraction inside it)
    if casts:
        for core_name, (core, _) in list(cores.items()):
            # annotate the contraction, not the cast: _epilogue_check must see which kernel it is (an opaque
            # call_tir such as a GPU sparse/quantized GEMV must not be swallowed through its output cast)
            cores[f"{core_name}_cast"] = (is_op("relax.astype")(core), core)
    out = []
    for core_name, (core, inner) in cores.items():
        combos = []
        for mask in itertools.product((0, 1), repeat=len(stages)):
            names = [n for (n, _), on in zip(stages, mask) if on]
            if not {"bias", "act", "residual"} & set(names):
                continue  # views alone add nothing
            if names and names[-1] == "view":
                continue  # a trailing reshape is a free view anyway
            combos.append((sum(mask), names, mask))
        combos.sort(key=lambda c: -c[0])
        for _, names, mask in combos:
            p = core
            for (_, make), on in zip(stages, mask):
                if on:
                    p = make(p)
            label = "_".join([core_name] + [n for n in names if n != "view"])
            out.append((f"ember.{label}", p, {"core": inner}, _epilogue_check))
    if casts:
        def operand():  # one pattern object per operand: DPL binds a pattern object reused twice to one value
            return is_op("relax.astype")(wildcard()) | wildcard()

        norm_x = is_op("relax.add")(operand(), operand())
        layer_norm = is_op("relax.nn.layer_norm")(norm_x, wildcard(), wildcard())
        rms_norm = is_op("relax.nn.rms_norm")(norm_x, wildcard())
        # The norm's fp32 output may have users outside (the residual add, ember.passes.half_norm with
        # widen=False): the kernel then has two outputs, the fp32 norm and its fp16 copy.
        out.append(("ember.add_layer_norm_cast", is_op("relax.astype")(layer_norm), {}, _norm_cast_check))
        out.append(("ember.add_rms_norm_cast", is_op("relax.astype")(rms_norm), {}, _norm_cast_check))
        out.append(("ember.add_layer_norm", layer_norm, {}, _float_casts_inside))
        out.append(("ember.add_rms_norm", rms_norm, {}, _float_casts_inside))
        return out
    norm_x = is_op("relax.add")(wildcard(), wildcard())
    out.append(("ember.add_layer_norm", is_op("relax.nn.layer_norm")(norm_x, wildcard(), wildcard()), {},
                _only_used_inside))
    out.append(("ember.add_rms_norm", is_op("relax.nn.rms_norm")(norm_x, wildcard()), {}, _only_used_inside))
    return out


_PACKED_CORES = ("packed_dense", "packed_conv")


def _symbolic_view(expr) -> bool:
    """A reshape to a shape with symbolic dims (a dynamic batch); such chains stay TVM-fused. Why: in a
    pattern-fused function the symbolic target shape becomes a parameter, and LegalizeOps only legalizes a
    literal shape (``reshape_call_te``: AssertionError). (The CPU matmul rule's wrong values on such epilogues,
    the first reason for this check, are fixed in the rule: ember.schedules.cpu.matmul._align_consumer,
    tests/schedules/test_cpu_rules.py::test_epilogue_across_reshape*.)"""
    if _op_name(expr) != "relax.reshape":
        return False
    shape = expr.args[1]
    values = getattr(shape, "values", None)
    if values is None:
        return True  # a shape variable: unknown, treat as symbolic
    return any(not isinstance(v, tvm.tirx.IntImm) for v in values)


def _float_cast(expr) -> bool:
    """A cast between float types (the ones precision="fp16" adds), not an int <-> float conversion."""
    return _op_name(expr) != "relax.astype" or (_is_float(expr) and _is_float(expr.args[0]))


def _float_casts_inside(ctx) -> bool:
    return all(_float_cast(e) for e in ctx.matched_bindings.values()) and _only_used_inside(ctx)


def _norm_cast_check(ctx) -> bool:
    """add + norm + cast: float casts only; every swallowed value but the norm's own output used only inside."""
    if not all(_float_cast(e) for e in ctx.matched_bindings.values()):
        return False
    matched = set(ctx.matched_bindings.keys())
    root = ctx.value_to_bound_var.get(ctx.matched_expr) if hasattr(ctx.value_to_bound_var, "get") else None
    for var, val in ctx.matched_bindings.items():
        if (root is not None and var.same_as(root)) or _op_name(val) in ("relax.nn.layer_norm", "relax.nn.rms_norm"):
            continue
        users = ctx.var_usages.get(var, []) if hasattr(ctx.var_usages, "get") else []
        if any(u not in matched for u in users):
            return False
    return True


def _epilogue_check(ctx) -> bool:
    if any(_symbolic_view(e) or not _float_cast(e) for e in ctx.matched_bindings.values()):
        return False
    core = ctx.annotated_expr.get("core") if hasattr(ctx.annotated_expr, "get") else None
    if core is not None and _op_name(core) == "relax.call_tir":
        if not core.args[0].name_hint.startswith(_PACKED_CORES):
            return False  # some other TIR kernel: not known to be a contraction with a tileable epilogue
        if len(core.args) > 2:
            return False  # it takes symbolic shape values (tir_vars), which FuseTIR cannot fuse through
    return _only_used_inside(ctx)


def _only_used_inside(ctx) -> bool:
    """A match may only swallow values that nothing outside it reads (else they'd be computed twice)."""
    matched = set(ctx.matched_bindings.keys())
    root = ctx.value_to_bound_var.get(ctx.matched_expr) if hasattr(ctx.value_to_bound_var, "get") else None
    for var in matched:
        if root is not None and var.same_as(root):
            continue
        users = ctx.var_usages.get(var, []) if hasattr(ctx.var_usages, "get") else []
        for u in users:
            if u not in matched:
                return False
    return True


def FuseEpilogues(casts: bool = False) -> tvm.transform.Pass:  # pylint: disable=invalid-name
    """Group matmul/conv epilogues and residual+norm into primitive functions (see module doc);
    ``casts``: through float casts too (GPU targets, see ``epilogue_patterns``)."""
    return relax.transform.FuseOpsByPattern(epilogue_patterns(casts), bind_constants=False,
                                            annotate_codegen=False)


# GPU, precision="fp16": True keeps the residual stream in fp32 (each add + layer norm kernel writes its output
# in fp32 for the next residual add and in fp16 for the next matmuls); False stores it in fp16 only (less memory
# traffic, the rounding torch's fp16 models have). See ember.passes.half_norm and BENCHMARKS.md for both.
EXACT_RESIDUAL = True


def fusion_passes(target: tvm.target.Target) -> list:
    """ember's fusion, in order, for ``lower(target)``: to run right before ``LegalizeOps``. GPU targets first
    store fp16-rounded layer norm outputs in fp16 (ember.passes.half_norm) so that no cast kernels remain around
    the norms, and fuse through float casts."""
    if target.kind.name in _GPU_KINDS:
        from .half_norm import HalfNormOutputs  # pylint: disable=import-outside-toplevel

        return [HalfNormOutputs(widen=not EXACT_RESIDUAL), FuseAttention(target), FuseEpilogues(casts=True)]
    return [FuseAttention(target), FuseEpilogues()]

"""The Relax rewrite: every linear/matmul on a weight parameter becomes a call to ember's sparse matmul kernel.

Before (what the torch and ONNX importers emit for ``nn.Linear`` / ``Gemm``/``MatMul`` on an initializer)::

    lv  = R.permute_dims(p_fc1_weight, axes=[1, 0])        # or p_w directly when it is stored [K, N]
    lv1 = R.matmul(x, lv, out_dtype="float32")             # x: [..., K]

After::

    lv_x = R.reshape(x, R.shape([rows, K]))                 # only when x is not already 2-D
    lv1  = R.call_tir(ember_sparse_matmul_K_N_n_m, (lv_x, p_fc1_weight_nm_values, p_fc1_weight_nm_indices),
                      out_sinfo=R.Tensor((rows, N), "float32"))
    lv2  = R.reshape(lv1, R.shape([..., N]))

``main`` then takes ``p_fc1_weight_nm_values`` / ``_nm_indices`` (packed at compile time, :mod:`.pack`) instead of
the dense weight, so the artifact stores only the packed form. A weight that is not n:m sparse is pruned
magnitude-wise (the n largest |w| of each group) and the report says so. A weight also used elsewhere (tied
embeddings) keeps its dense copy for those uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .pack import PackedNM, dequantized, nm_mask, nm_violations, pack_int8
from .rows_kernel import MIN_ROWS, rows_kernel
from .sparse_matmul import KERNEL_NAME, gather_isa, is_gpu, pack_for, sparse_matmul_func

_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
_OPAQUE = 8  # relax OpPatternKind.kOpaque: FuseOps must not fuse the scheduled kernel into something else


@dataclass
class _Site:
    call: object           # the relax matmul Call
    weight: object         # the weight parameter (relax.Var)
    transposed: bool       # True: weight stored [N, K] and transposed in the graph (torch Linear)


@dataclass
class _Packed:
    name: str
    packed: PackedNM
    values_var: object
    indices_var: object
    report: dict = field(default_factory=dict)
    scales_var: object = None  # int8 values: the fp32 row scales

    @property
    def vars(self):
        return [self.values_var, self.indices_var] + ([self.scales_var] if self.scales_var is not None else [])

    @property
    def arrays(self):
        p = self.packed
        return [p.values, p.indices] + ([p.scales] if p.scales is not None else [])


def _static_shape(sinfo):
    shape = getattr(sinfo, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    out = []
    for d in shape.values:
        out.append(int(d.value) if hasattr(d, "value") else d)
    return out


def _find_sites(func, weight_vars: set):
    """Every matmul whose right operand is a 2-D weight parameter, possibly through permute_dims([1, 0])."""
    import tvm
    from tvm import relax

    bound = {}
    for block in func.body.blocks:
        for b in block.bindings:
            if isinstance(b, relax.VarBinding):
                bound[b.var] = b.value
    matmul, permute = tvm.ir.Op.get("relax.matmul"), tvm.ir.Op.get("relax.permute_dims")
    sites = []
    for value in bound.values():
        if not (isinstance(value, relax.Call) and value.op.same_as(matmul)):
            continue
        rhs = value.args[1]
        if rhs in weight_vars:
            sites.append(_Site(value, rhs, transposed=False))
            continue
        src = bound.get(rhs)
        if isinstance(src, relax.Call) and src.op.same_as(permute) and src.args[0] in weight_vars:
            axes = src.attrs.axes
            if axes is None or [int(a) for a in axes] == [1, 0]:
                sites.append(_Site(value, src.args[0], transposed=True))
    return sites


def _usable(site, weights_np: dict, int8: bool = False, gpu: bool = False) -> str | None:
    """Why this site cannot use the sparse kernel (None: it can)."""
    w = weights_np[site.weight]
    if int8 and str(w.dtype) != "float32":
        return f"weight dtype {w.dtype}: int8 sparse values are made from float32 weights"
    x_sinfo = site.call.args[0].ty
    out_dtype = str(site.call.attrs.out_dtype or "")
    if w.ndim != 2:
        return f"weight is {w.ndim}-D"
    if str(w.dtype) not in _FLOAT_DTYPES:
        return f"weight dtype {w.dtype} (the sparse kernel computes in floating point)"
    # GPU kernels also take fp16 x fp16 -> fp32 (what precision="fp16" makes of a matmul)
    out_ok = ("", "void", str(w.dtype)) + (("float32",) if gpu and str(w.dtype) == "float16" else ())
    if str(x_sinfo.dtype) != str(w.dtype) or out_dtype not in out_ok:
        return f"mixed dtypes (x {x_sinfo.dtype}, weight {w.dtype}, out {out_dtype or 'same'})"
    shape = _static_shape(x_sinfo)
    if shape is None or len(shape) < 2:
        return "input rank is unknown or 1-D"
    k = w.shape[1] if site.transposed else w.shape[0]
    if not isinstance(shape[-1], int) or shape[-1] != k:
        return f"reduction dimension {shape[-1]} does not match the weight's {k}"
    return None


def rewrite_to_sparse(imported, n: int, m: int, target, *, min_k: int = 1, int8: bool = False):
    """Rewrite ``imported`` (an ImportedModel) in place of a copy; returns ``(imported, report)``.

    Each matmul on a 2-D weight parameter becomes the packed sparse kernel (see the module doc). ``int8``: the
    kept values are stored as int8 codes with an fp32 scale per output row (:func:`.pack.pack_int8`; CPU only),
    and the kernel dequantizes in registers — 1.5 bytes per kept weight instead of 4.5."""
    from tvm import relax, tirx

    from ...frontends.spec import ImportedModel

    mod = imported.mod
    func = mod["main"]
    n_in = int(func.attrs["num_input"])
    wparams = list(func.params[n_in:])
    weights_np = {v: np.asarray(a) for v, a in zip(wparams, imported.params)}
    names = {v: nm for v, nm in zip(wparams, imported.param_names)}
    sites = _find_sites(func, set(wparams))

    report = {"scheme": f"{n}:{m}", "values": "int8 (per-row scales)" if int8 else "float", "kernel": None,
              "layers": [], "skipped": [], "warnings": []}
    packed: dict = {}   # weight Var -> _Packed
    plan = {}           # matmul Call -> (_Site, _Packed)
    for site in sites:
        why = _usable(site, weights_np, int8, is_gpu(target))
        name = names[site.weight]
        if why is None and (site.weight.ty.shape is None):
            why = "weight shape unknown"
        k_dim = weights_np[site.weight].shape[1 if site.transposed else 0]
        if why is None and k_dim < min_k:
            why = f"reduction dimension {k_dim} < {min_k}"
        if why is not None:
            report["skipped"].append({"name": name, "reason": why})
            continue
        if site.weight not in packed:
            w = weights_np[site.weight]
            w_nk = w if site.transposed else w.T
            bad = nm_violations(w_nk, n, m)
            entry = {"name": name, "shape": [int(s) for s in w_nk.shape], "op": "linear" if site.transposed else "matmul",
                     "was_nm_sparse": bad == 0, "pruned_groups": int(bad)}
            if bad:
                groups_total = w_nk.shape[0] * (-(-w_nk.shape[1] // m))
                report["warnings"].append(
                    f"{name}: not {n}:{m} sparse ({bad} of {groups_total} groups held more than {n} non-zeros); "
                    f"ember pruned it by magnitude. For accuracy, prune and fine-tune first "
                    f"(ember.sparsity.prune_nm + ember.sparsity.finetune).")
                w_nk = w_nk * nm_mask(w_nk, n, m)
            p = pack_int8(w_nk, n, m) if int8 else pack_for(target, w_nk, n, m)
            dense_bytes = int(w.nbytes)
            entry.update({"sparsity": round(float(1.0 - np.count_nonzero(w_nk) / w_nk.size), 6),
                          "dense_bytes": dense_bytes, "packed_bytes": p.nbytes,
                          "bytes_saved": dense_bytes - p.nbytes})
            vals_var = relax.Var(f"{name}_nm_values", relax.TensorType(list(p.values.shape), str(p.values.dtype)))
            idx_var = relax.Var(f"{name}_nm_indices", relax.TensorType(list(p.indices.shape), "uint8"))
            sc_var = (relax.Var(f"{name}_nm_scales", relax.TensorType(list(p.scales.shape), "float32"))
                      if p.scales is not None else None)
            if int8:
                entry["int8_max_abs_error"] = float(np.abs(dequantized(p) - w_nk).max())
            packed[site.weight] = _Packed(name, p, vals_var, idx_var, entry, sc_var)
        plan[site.call] = (site, packed[site.weight])

    if not plan:
        report.update({"dense_bytes": 0, "packed_bytes": 0, "bytes_saved": 0})
        return imported, report

    @relax.expr_functor.mutator
    class _Mutator(relax.PyExprMutator):
        def visit_call_(self, call):  # pylint: disable=arguments-renamed
            if call not in plan:
                return super().visit_call_(call)
            site, pk = plan[call]
            x = self.visit_expr(call.args[0])
            shape = list(x.ty.shape.values)
            n_out, k = pk.packed.shape
            rows = shape[0]
            for d in shape[1:-1]:
                rows = rows * d
            x2 = x if len(shape) == 2 else self.builder_.emit(relax.op.reshape(x, [rows, k]), "nm_x")
            # The kernel's batch is one symbolic var however x's leading dims are spelled (s, s*128, ...).
            batch = int(rows.value) if isinstance(rows, tirx.IntImm) else (
                rows if isinstance(rows, int) else tirx.Var("batch", "int64"))
            dtype = str(x.ty.dtype)
            out_dtype = str(call.attrs.out_dtype or "")
            out_dtype = dtype if out_dtype in ("", "void") else out_dtype
            isa = gather_isa(target, dtype) if target is not None and target.kind.name == "llvm" else None
            if isa is not None and isinstance(batch, int) and batch >= MIN_ROWS:
                # many rows (prefill): vectors along the rows of x^T, no gather (rows_kernel.py)
                from ...schedules.cpu.common import num_cores

                prim = rows_kernel(k, n_out, n, m, batch, isa, num_cores(target) > 1, int8=int8)
                prim = prim.with_attr("op_pattern", _OPAQUE)
                gv = self.builder_.add_func(prim, f"{KERNEL_NAME}_rows_{k}x{n_out}_{n}_{m}_b{batch}"
                                            + ("_int8" if int8 else ""))
                xt = self.builder_.emit(relax.op.permute_dims(x2, [1, 0]), "nm_xt")
                yt = self.builder_.emit(relax.call_tir(gv, [xt] + pk.vars, relax.TensorType([n_out, rows], dtype)),
                                        "nm_yt")
                out = relax.op.permute_dims(yt, [1, 0])
                if len(shape) == 2:
                    return out
                y = self.builder_.emit(out, "nm_y")
                return relax.op.reshape(y, shape[:-1] + [n_out])
            prim = sparse_matmul_func(batch, k, n_out, n, m, dtype, target, int8=int8, out_dtype=out_dtype)
            prim = prim.with_attr("op_pattern", _OPAQUE)
            gv = self.builder_.add_func(prim, f"{KERNEL_NAME}_{k}x{n_out}_{n}_{m}" + ("_int8" if int8 else "")
                                        + ("" if out_dtype == dtype else f"_{out_dtype}"))
            out = relax.call_tir(gv, [x2] + pk.vars, relax.TensorType([rows, n_out], out_dtype))
            if len(shape) == 2:
                return out
            y = self.builder_.emit(out, "nm_y")
            return relax.op.reshape(y, shape[:-1] + [n_out])

    mutator = _Mutator(mod)
    new_body = mutator.visit_expr(func.body)
    # The dense weights' transposes are dead now; a weight still used elsewhere (tied) keeps its dense copy.
    tmp = relax.Function(list(func.params) + [v for p in packed.values() for v in p.vars], new_body, func.ret_ty,
                         func.is_pure, func.attrs)
    tmp = relax.analysis.remove_all_unused(tmp)
    used = set(relax.analysis.free_vars(tmp.body))
    new_params, new_arrays, new_names = list(func.params[:n_in]), [], []
    for v, arr, nm in zip(wparams, imported.params, imported.param_names):
        if v not in packed or v in used:
            new_params.append(v)
            new_arrays.append(arr)
            new_names.append(nm)
        if v in packed:
            pk = packed[v]
            new_params += pk.vars
            new_arrays += pk.arrays
            new_names += [v.name for v in pk.vars]
            if v in used:
                pk.report["dense_copy_kept"] = True
                pk.report["bytes_saved"] = -pk.packed.nbytes
    new_func = relax.Function(new_params, tmp.body, func.ret_ty, func.is_pure, func.attrs)
    out_mod = mutator.builder_.get()
    out_mod["main"] = new_func

    layers = [p.report for p in packed.values()]
    isa = gather_isa(target, "float32") if target is not None else None
    report.update({
        "kernel": (f"cpu gather ({isa}; ≥ {MIN_ROWS} static rows: row vectors)" if isa
                   else (f"gpu ({target.kind.name})" if is_gpu(target)
                                                       else "cpu (TVM vectorized, scalar gather)"))
                  + (", int8 values" if int8 else ""),
        "layers": layers,
        "dense_bytes": int(sum(p["dense_bytes"] for p in layers)),
        "packed_bytes": int(sum(p["packed_bytes"] for p in layers)),
        "bytes_saved": int(sum(p["bytes_saved"] for p in layers)),
    })
    new_imported = ImportedModel(out_mod, new_arrays, new_names, imported.inputs, imported.outputs,
                                 source=imported.source)
    return new_imported, report

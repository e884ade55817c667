"""The kernel report: which kernels a compiled model launches, which graph ops each one fused, and how many bytes
each moves — for ember's pipeline and for TVM's default one, so users see what fusion bought.

It is computed at compile time (the artifact's library no longer knows which ops a kernel came from) and stored
in the manifest under ``"kernels"``; ``ember inspect OUT --kernels`` prints it::

    {"ember":       {"launches": 52, "distinct": 20, "bytes": ..., "kernels": [{"name", "ops", "calls",
                     "bytes_per_call"}, ...]},
     "tvm_default": {...same, for TVM's default FuseOps pipeline on the same prepared graph...},
     "fusion": true}

Counting rules:

* A *launch* is one ``call_tir`` the VM executes per inference, i.e. one call of a compiled kernel from
  ``main``; reshapes that ``RewriteDataflowReshape`` turns into free views are not launches.
* *Bytes per call* is the size of every buffer the kernel reads or writes (its arguments and outputs), from
  their shapes and dtypes: the traffic a kernel cannot avoid, not what caches actually see. Symbolic dimensions
  (a dynamic batch) count as 1.
* *Ops* are the Relax operators the kernel was built from (legalized op names, ``matmul``, ``add``,
  ``layer_norm``, ...); the attention kernel lists the ops it replaces.
"""

from __future__ import annotations

import re

import tvm
from tvm import relax

_DIGITS = re.compile(r"\d+$")


def _op_of(name: str) -> str:
    return _DIGITS.sub("", name)


def _callees(func: relax.Function) -> list:
    found = []

    def _visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir":
            gv = e.args[0]
            found.append(gv.name_hint)

    relax.analysis.post_order_visit(func.body, _visit)
    return found


def record_groups_pass(groups: dict) -> tvm.transform.Pass:
    """Identity pass run between FuseOps and FuseTIR: ``groups[fused function name] = [op, ...]``."""

    @tvm.transform.module_pass(opt_level=0, name="ember.RecordKernelGroups")
    def _record(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gv, func in mod.functions.items():
            if isinstance(func, relax.Function) and func.attrs is not None and "Primitive" in func.attrs:
                groups[gv.name_hint] = [_op_of(c) for c in _callees(func)]
        return mod

    return _record


def _nbytes(ty) -> tuple[int, bool]:
    """Bytes of a tensor type; (bytes, has_symbolic_dims)."""
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not isinstance(ty.shape, relax.ShapeExpr):
        return 0, False
    n, sym = 1, False
    for d in ty.shape.values:
        if isinstance(d, tvm.tirx.IntImm):
            n *= int(d.value)
        else:
            sym = True
    return n * max(tvm.DataType(str(ty.dtype)).bits // 8, 1), sym


def _call_bytes(call: relax.Call) -> tuple[int, bool]:
    total, sym = 0, False
    args = call.args[1]
    fields = args.fields if isinstance(args, relax.Tuple) else [args]
    for a in fields:
        b, s = _nbytes(getattr(a, "ty", None))
        total, sym = total + b, sym or s
    outs = call.ty_args if call.ty_args else [call.ty]
    for o in outs:
        tys = o.fields if isinstance(o, relax.TupleType) else [o]
        for t in tys:
            b, s = _nbytes(t)
            total, sym = total + b, sym or s
    return total, sym


def analyze(mod: tvm.IRModule, groups: dict | None = None, entry: str = "main") -> dict:
    """The kernel report of ``mod`` after fusion (FuseTIR done, before VM lowering); see module doc."""
    groups = groups or {}
    mod = relax.transform.RewriteDataflowReshape()(mod)
    kernels: dict = {}
    order = []
    symbolic = False
    funcs = [(gv, f) for gv, f in mod.functions.items() if isinstance(f, relax.Function)
             and gv.name_hint == entry]

    def _visit(e):
        nonlocal symbolic
        if not (isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir"):
            return
        name = e.args[0].name_hint
        nbytes, sym = _call_bytes(e)
        symbolic = symbolic or sym
        if name not in kernels:
            prim = mod[name] if name in [g.name_hint for g in mod.get_global_vars()] else None
            ops = None
            if prim is not None and prim.attrs is not None and "ember.fused_ops" in prim.attrs:
                ops = [str(o) for o in prim.attrs["ember.fused_ops"]]
            if ops is None:
                ops = list(groups.get(name, [_op_of(name)]))
            kernels[name] = {"name": name, "ops": ops, "calls": 0, "bytes_per_call": nbytes}
            order.append(name)
        kernels[name]["calls"] += 1

    for _, func in funcs:
        relax.analysis.post_order_visit(func.body, _visit)
    rows = [kernels[n] for n in order]
    return {
        "launches": sum(r["calls"] for r in rows),
        "distinct": len(rows),
        "bytes": sum(r["calls"] * r["bytes_per_call"] for r in rows),
        "symbolic_dims_counted_as_1": symbolic,
        "kernels": rows,
    }


def report_pass(groups: dict, out: dict) -> tvm.transform.Pass:
    """Identity pass for ``lower``: fills ``out`` with :func:`analyze` of the module it sees."""

    @tvm.transform.module_pass(opt_level=0, name="ember.KernelReport")
    def _report(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out.clear()
        out.update(analyze(mod, groups))
        return mod

    return _report


def default_pipeline_report(prepared: tvm.IRModule) -> dict:
    """The report for TVM's default legalize + FuseOps + FuseTIR on the same prepared module (no codegen)."""
    from .pipeline import _legalize_and_fuse

    groups: dict = {}
    mod = tvm.transform.Sequential(_legalize_and_fuse(None, False, groups))(prepared)
    return analyze(mod, groups)


def summary(report: dict) -> dict:
    """Totals only (for the manifest's short form and the benchmark)."""
    return {k: report[k] for k in ("launches", "distinct", "bytes")}


def format_report(kernels: dict, top: int | None = None) -> str:
    """Human-readable text of a manifest's ``"kernels"`` entry (ember inspect --kernels)."""
    lines = []
    ember_r, base = kernels.get("ember"), kernels.get("tvm_default")
    if ember_r is None:
        return "this artifact has no kernel report (compiled by an older ember)"

    def _mib(b):
        return f"{b / 2**20:.2f} MiB"

    lines.append(f"kernels launched per inference: {ember_r['launches']} ({ember_r['distinct']} distinct), "
                 f"{_mib(ember_r['bytes'])} moved" + ("" if kernels.get("fusion", True) else
                                                        "   [compiled with ember's fusion off]"))
    if base is not None:
        fewer = 100.0 * (1 - ember_r["launches"] / base["launches"]) if base["launches"] else 0.0
        less = 100.0 * (1 - ember_r["bytes"] / base["bytes"]) if base["bytes"] else 0.0
        lines.append(f"TVM default pipeline:           {base['launches']} ({base['distinct']} distinct), "
                     f"{_mib(base['bytes'])} moved")
        lines.append(f"ember's fusion:                 {fewer:.0f}% fewer launches, {less:.0f}% fewer bytes")
    if ember_r.get("symbolic_dims_counted_as_1"):
        lines.append("(symbolic dimensions counted as 1)")
    lines.append("")
    lines.append(f"{'calls':>5}  {'bytes/call':>12}  kernel: fused ops")
    rows = ember_r["kernels"] if top is None else ember_r["kernels"][:top]
    for r in rows:
        lines.append(f"{r['calls']:>5}  {r['bytes_per_call']:>12,}  {r['name']}: {' + '.join(r['ops'])}")
    return "\n".join(lines)

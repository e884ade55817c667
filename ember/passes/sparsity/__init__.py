"""N:M sparsity in the compiler: ``apply_sparsity`` packs every linear/matmul weight and swaps in the sparse kernel.

* :mod:`.prune` — masks: magnitude (unstructured), N:M along the reduction axis, channel pruning (torch side).
* :mod:`.pack` — the packed N:M format (values + 4/8-bit indices) and its inverse.
* :mod:`.sparse_matmul` — the TIR kernels (x86 gather, generic CPU, CUDA) that read only the packed weights.
* :mod:`.rewrite` — the Relax rewrite of ``matmul(x, permute_dims(W))`` into ``call_tir(sparse kernel)``.
* :mod:`.rows_kernel` — the x86 kernel for many input rows (vectors along x's rows, no gather).
* :mod:`.gpu_kernel` — the GPU kernel (CUDA, ROCm, Metal) on the GPU layout of :func:`.pack.pack_gpu`.
* :mod:`.conv` — sparse 2-D convolutions on x86 (a direct gather kernel with precomputed input offsets).
"""

from __future__ import annotations


def int8_values_for(quantization, target) -> bool:
    """Whether the sparse layers store int8 values, given the quantization asked for alongside the sparsity.

    The sparse layers are ember's to quantize (the quantization pass only matches dense matmuls, and runs after
    this one): int8 schemes (``Int8Dynamic``, ``Int8Static``, ``WeightOnly(bits=8)``) get int8 values with one
    scale per output row on CPU targets; the activations of sparse layers stay fp32 (the kernel gathers them, and
    a gather of int8 activations buys nothing). 4-bit and mixed schemes keep float values in sparse layers.
    """
    from ...config import Int8Dynamic, Int8Static, WeightOnly

    if quantization is None or target is None or target.kind.name != "llvm":
        return False
    if isinstance(quantization, (Int8Dynamic, Int8Static)):
        return True
    return isinstance(quantization, WeightOnly) and int(quantization.bits) == 8


def apply_sparsity(imported, cfg, target, quantization=None):
    """The hook ``ember.compile`` calls (via :func:`ember.passes.compress.compress`) before quantization.

    imported: an :class:`~ember.frontends.spec.ImportedModel`; cfg: :class:`ember.NM`; target: the tvm Target;
    quantization: the quantization config of the same compile, if any (see :func:`int8_values_for`).
    Returns ``(imported, report)``: the rewritten model whose weights include the packed arrays instead of the
    dense ones, and a JSON-able report (per layer: shape, sparsity, bytes dense/packed, whether ember had to
    prune it; totals; warnings; layers left dense and why).
    """
    from .rewrite import rewrite_to_sparse

    from .conv import rewrite_convs
    from .sparse_matmul import gather_isa

    int8 = int8_values_for(quantization, target)
    imported, report = rewrite_to_sparse(imported, int(cfg.n), int(cfg.m), target, int8=int8)
    isa = gather_isa(target, "float32") if target is not None else None
    n_linear = len(report["layers"])
    imported = rewrite_convs(imported, int(cfg.n), int(cfg.m), target, report, isa)
    if len(report["layers"]) > n_linear:
        conv = f"conv: {isa} row vectors (horizontal stride 1) or gathers, fp32 values"
        report["kernel"] = f"{report['kernel']}; {conv}" if report["kernel"] else conv
        for key in ("dense_bytes", "packed_bytes", "bytes_saved"):
            report[key] = int(sum(layer[key] for layer in report["layers"]))
    if quantization is not None and not int8:
        report["note"] = (f"sparse layers keep float values with {type(quantization).__name__}"
                          + ("" if target is None or target.kind.name == "llvm" else f" on {target.kind.name}")
                          + ": int8 sparse values are made for int8 schemes on CPU targets")
    elif int8:
        report["note"] = "sparse layers: int8 values (per-row scales), fp32 activations; the quantization pass " \
                         "handles the remaining dense layers"
    return imported, report


__all__ = ["apply_sparsity", "int8_values_for"]

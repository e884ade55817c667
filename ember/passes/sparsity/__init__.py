"""N:M sparsity in the compiler: ``apply_sparsity`` packs every linear/matmul weight and swaps in the sparse kernel.

* :mod:`.prune` — masks: magnitude (unstructured), N:M along the reduction axis, channel pruning (torch side).
* :mod:`.pack` — the packed N:M format (values + 4/8-bit indices) and its inverse.
* :mod:`.sparse_matmul` — the TIR kernels (x86 gather, generic CPU, CUDA) that read only the packed weights.
* :mod:`.rewrite` — the Relax rewrite of ``matmul(x, permute_dims(W))`` into ``call_tir(sparse kernel)``.
"""

from __future__ import annotations


def apply_sparsity(imported, cfg, target):
    """The hook ``ember.compile`` calls (via :func:`ember.passes.compress.compress`) before quantization.

    imported: an :class:`~ember.frontends.spec.ImportedModel`; cfg: :class:`ember.NM`; target: the tvm Target.
    Returns ``(imported, report)``: the rewritten model whose weights include the packed arrays instead of the
    dense ones, and a JSON-able report (per layer: shape, sparsity, bytes dense/packed, whether ember had to
    prune it; totals; warnings; layers left dense and why).
    """
    from .rewrite import rewrite_to_sparse

    return rewrite_to_sparse(imported, int(cfg.n), int(cfg.m), target)


__all__ = ["apply_sparsity"]

"""The matmul rule's K-blocked schedule (ember.schedules.cpu.matmul._k_block): small-image convs with a deep
reduction are tiled panel by panel with the reduction in L1-sized chunks; results match the unscheduled kernel
(odd image sizes, a tail of row tiles, bias + ReLU epilogue), and it is taken only where it applies."""

from __future__ import annotations

import pytest
import tvm
import tvm_ffi
from tvm import te, tirx

from ember.passes.layout import _packed_conv2d_nhwc_te
from ember.schedules.cpu import Matmul
from ember.schedules.cpu.matmul import _k_block, _L1_CHUNK_BYTES, panel_width
from helpers import assert_same_result, host_target

TARGET = host_target()


def packed_conv(h, c, f, stride=1, nr=None):
    """relu(conv3x3(x) + b) on NHWC with the weight packed in NR-wide panels, as ember.passes.layout emits it."""
    nr = nr or panel_width(h // stride, f, TARGET)
    x = te.placeholder((1, h, h, c), name="x")
    wp = te.placeholder((f // nr, 3, 3, c, nr), name="wp")
    b = te.placeholder((f,), name="b")
    y = _packed_conv2d_nhwc_te(x, wp, f, nr, (stride, stride), (1, 1), (1, 1, 1, 1), "float32")
    z = te.compute(y.shape, lambda n, i, j, o: te.max(y[n, i, j, o] + b[o], tirx.const(0, "float32")), name="relu")
    return te.create_prim_func([x, wp, b, z]), nr


def _parallel_extents(func) -> list:
    found = []

    def _visit(node):
        if node.kind == tirx.ForKind.PARALLEL:
            found.append(int(node.extent))

    tvm_ffi.structural_walk(func.body, (tirx.For, _visit), order="post")
    return found


def _schedule(func):
    with TARGET:
        sch = Matmul().apply(func, TARGET, False)
    assert sch is not None
    return sch.mod["main"]


@pytest.mark.parametrize("h,c,f,stride", [
    (7, 256, 256, 1),   # ResNet layer-4-like: 7x7 image, K = 2304
    (5, 96, 256, 1),    # odd image, a chunk that is not a power of two
    (13, 160, 256, 2),  # stride 2, 7x7 output
])
def test_k_blocked_conv_matches(h, c, f, stride):
    func, nr = packed_conv(h, c, f, stride)
    sched = _schedule(func)
    panels = f // nr
    if panels >= 2 * int(TARGET.attrs["num-cores"]) and 9 * c * nr * 4 > 2 * _L1_CHUNK_BYTES:
        # one task per weight panel: the parallel loop of the product is the panel loop
        assert panels in _parallel_extents(sched), _parallel_extents(sched)
    assert_same_result(func, sched, rtol=1e-5, atol=1e-5)


def test_k_block_declines_where_it_does_not_pay():
    from ember.schedules.cpu.matmul import _analyze
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm import s_tir

    def decision(h, c, f, nr):
        func, nr = packed_conv(h, c, f, nr=nr)
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        main = [b for b in infos if not b.is_injective()][0].block_rv
        blk = sch.get(main)
        info = _analyze(blk)
        ext = {iv.var: int(iv.dom.extent) for iv in blk.iter_vars}
        k_total = 1
        for r in info.reductions:
            k_total *= ext[r]
        return _k_block(info, ext, nr, k_total, 4, TARGET)

    cores = int(TARGET.attrs["num-cores"])
    assert decision(7, 512, 16 * 2 * cores, 16) is not None  # deep K, small image, enough panels
    assert decision(7, 512, 16 * (2 * cores - 1), 16) is None  # too few panels to keep the cores busy
    assert decision(56, 512, 16 * 2 * cores, 16) is None  # 3136 rows: the per-panel accumulator is too big
    assert decision(7, 8, 16 * 2 * cores, 16) is None  # a K x NR panel that fits L1 anyway

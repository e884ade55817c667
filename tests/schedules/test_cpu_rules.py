"""Each CPU rule: its schedule computes exactly what the unscheduled kernel does (random inputs, outputs pre-filled
with NaN so a skipped element fails), it really tiles/vectorizes/parallelizes, and it declines kernels of
other kinds."""

from __future__ import annotations

import pytest
import tvm
from tvm import relax, tirx
from tvm.script import from_source

from ember.schedules.cpu import Elementwise, Fallback, Matmul, RowReduction
from helpers import (
    assert_same_result,
    host_target,
    loop_kinds,
    relax_graph,
    the_kernel,
)

op = relax.op
TARGET = host_target()


def _apply(rule, func):
    with TARGET:
        sch = rule.apply(func, TARGET, False)
    return None if sch is None else sch.mod["main"]


def _check(rule, func, shape_vars=None, expect_parallel=True, n_outputs=1, **tol):
    sched = _apply(rule, func)
    assert sched is not None, f"{type(rule).__name__} declined a kernel of its kind"
    kinds = loop_kinds(sched)
    if expect_parallel:
        assert tirx.ForKind.PARALLEL in kinds, "expected the outer loops to run in parallel"
    assert_same_result(func, sched, shape_vars=shape_vars, n_outputs=n_outputs, **tol)
    return sched


# ---------------------------------------------------------------------------------------------------- kernels
def matmul_kernel(m, k, n, epilogue=None):
    def body(x, w, b):
        y = op.matmul(x, w)
        if epilogue in ("bias", "bias_gelu"):
            y = op.add(y, b)
        if epilogue == "bias_gelu":
            y = op.nn.gelu(y)
        return y

    mod = relax_graph([("x", (m, k)), ("w", (k, n)), ("b", (n,))], body)
    return the_kernel(mod, "matmul")


def matmul_residual_kernel(m, k, n):
    mod = relax_graph([("x", (m, k)), ("w", (k, n)), ("b", (n,)), ("r", (m, n))],
                      lambda x, w, b, r: op.add(op.add(op.matmul(x, w), b), r))
    return the_kernel(mod, "matmul")


def bmm_kernel(b, m, k, n):
    mod = relax_graph([("q", (b, m, k)), ("kt", (b, k, n))], lambda q, kt: op.matmul(q, kt))
    return the_kernel(mod, "matmul")


def dyn_dense_kernel(seq, k, n):
    """A dense layer over a symbolic batch: x[n_batch, seq, k] @ w[k, n] + b, then GELU."""
    mod = relax_graph([("x", ("batch", seq, k)), ("w", (k, n)), ("b", (n,))],
                      lambda x, w, b: op.nn.gelu(op.add(op.matmul(x, w), b)))
    return the_kernel(mod, "matmul")


def conv_kernel(n, c, hw, f, ksize, stride, pad, epilogue=True):
    def body(x, w, bias, res):
        y = op.nn.conv2d(x, w, strides=stride, padding=pad)
        if epilogue:
            # conv + BatchNorm (folded to a per-channel scale/shift) + residual + ReLU, as a ResNet block fuses
            y = op.add(op.multiply(y, bias), bias)
            y = op.nn.relu(op.add(y, res))
        return y

    out_hw = (hw + 2 * pad - ksize) // stride + 1
    mod = relax_graph([("x", (n, c, hw, hw)), ("w", (f, c, ksize, ksize)), ("bias", (1, f, 1, 1)),
                       ("res", (n, f, out_hw, out_hw))], body)
    return the_kernel(mod, "conv2d")


def softmax_kernel(shape, masked=False):
    if masked:
        mod = relax_graph([("s", shape), ("mask", shape[-2:])],
                          lambda s, mk: op.nn.softmax(op.add(s, mk), axis=-1))
    else:
        mod = relax_graph([("s", shape)], lambda s: op.nn.softmax(s, axis=-1))
    return the_kernel(mod, "softmax")


def layernorm_kernel(shape, residual=False):
    d = shape[-1]
    if residual:
        mod = relax_graph([("x", shape), ("r", shape), ("g", (d,)), ("b", (d,))],
                          lambda x, r, g, b: op.nn.layer_norm(op.add(x, r), g, b, axes=[-1]))
    else:
        mod = relax_graph([("x", shape), ("g", (d,)), ("b", (d,))],
                          lambda x, g, b: op.nn.layer_norm(x, g, b, axes=[-1]))
    return the_kernel(mod, "layer_norm")


def sum_middle_kernel(shape):
    mod = relax_graph([("x", shape)], lambda x: op.sum(x, axis=[1]))
    return the_kernel(mod, "sum")


def elementwise_kernel(shape):
    mod = relax_graph([("x", shape), ("y", shape[-1:])], lambda x, y: op.nn.gelu(op.add(x, y)))
    return the_kernel(mod, "gelu")


def transpose_kernel(s, h, d):
    """Attention's head split: [s, h*d] -> [h, s, d] (reshape + transpose), as MiniLM's Q/K/V."""
    mod = relax_graph([("x", (s, h * d))],
                      lambda x: op.permute_dims(op.reshape(x, (s, h, d)), [1, 0, 2]))
    funcs = [f for f in __import__("helpers").fused_prim_funcs(mod).values()]
    assert len(funcs) == 1
    return funcs[0]


# ---------------------------------------------------------------------------------------------------- matmul
@pytest.mark.parametrize("m,k,n", [(1, 7, 13), (17, 31, 97), (128, 384, 1536), (128, 384, 384), (5, 64, 8)])
def test_matmul_sizes(m, k, n):
    _check(Matmul(), matmul_kernel(m, k, n), expect_parallel=m * n >= 64)


@pytest.mark.parametrize("epilogue", ["bias", "bias_gelu"])
def test_matmul_fused_epilogue(epilogue):
    func = matmul_kernel(37, 53, 71, epilogue)
    _check(Matmul(), func)


def test_matmul_residual_epilogue():
    _check(Matmul(), matmul_residual_kernel(64, 96, 48))


@pytest.mark.parametrize("b,m,k,n", [(12, 128, 64, 128), (3, 7, 5, 11)])
def test_batch_matmul(b, m, k, n):
    _check(Matmul(), bmm_kernel(b, m, k, n))


@pytest.mark.parametrize("batch", [1, 3])
def test_matmul_symbolic_batch(batch):
    func = dyn_dense_kernel(9, 40, 24)
    sched = _check(Matmul(), func, shape_vars={"batch": batch})
    # the symbolic extent must still be a loop of the scheduled kernel, not specialised away
    assert any(not isinstance(p.shape[0], tirx.IntImm) for p in sched.params)


def reshape_epilogue_kernel(batch, seq, k, n, gelu=False):
    """``y = view(x @ w + b, [batch, seq, n]) + r`` (then GELU): what ember's epilogue fusion gives FuseTIR for a
    linear layer over a flattened ``[batch * seq, k]`` input. The reshape's read ``C[(b * seq + s) % (batch *
    seq), j]`` is a computed row index; ``batch`` may be symbolic. Built with topi's reshape, as LegalizeOps
    does."""
    from tvm import te, topi

    bdim = tirx.Var("batch", "int64") if batch is None else tirx.IntImm("int64", batch)
    x = te.placeholder((bdim * seq, k), "float32", name="x")
    w = te.placeholder((k, n), "float32", name="w")
    b = te.placeholder((n,), "float32", name="b")
    r = te.placeholder((bdim, seq, n), "float32", name="r")
    rk = te.reduce_axis((0, k), name="k")
    c = te.compute((bdim * seq, n), lambda i, j: te.sum(x[i, rk] * w[rk, j], axis=rk), name="matmul")
    y = topi.add(topi.reshape(topi.add(c, b), (bdim, seq, n)), r)
    if gelu:
        y = topi.multiply(y, topi.sigmoid(topi.multiply(y, 1.702)))
    return te.create_prim_func([x, w, b, r, y], index_dtype_override="int64")


@pytest.mark.parametrize("batch,seq,k,n", [
    (2, 13, 24, 40),  # 8-row register tiles straddle the batch boundary (13 rows per batch)
    (5, 7, 17, 33),  # odd everything
    (3, 128, 32, 48),  # tiles inside one batch row block (the MiniLM batch-8 case, smaller)
])
def test_epilogue_across_reshape(batch, seq, k, n):
    """Regression: computed per register tile, this epilogue read rows no tile had written (NaN) or wrote some
    twice, whenever a row tile straddled a ``b`` boundary (TVM's reverse_compute_at picks a wrong box for the
    computed row index). Fixed by re-indexing the epilogue by the product's rows (matmul._align_consumer)."""
    _check(Matmul(), reshape_epilogue_kernel(batch, seq, k, n, gelu=True))


@pytest.mark.parametrize("seq", [7, 13])
def test_epilogue_across_reshape_symbolic_batch(seq):
    """The same with a symbolic batch (``% (batch * seq)`` in the read): what ember.passes.fusion's
    ``_symbolic_view`` used to keep out of matmul kernels because this rule computed wrong values."""
    func = reshape_epilogue_kernel(None, seq, 24, 40)
    sched = _apply(Matmul(), func)
    assert sched is not None
    for batch in (1, 3, 5):
        assert_same_result(func, sched, shape_vars={"batch": batch})


def test_epilogue_that_cannot_be_aligned_runs_after_the_product(monkeypatch):
    """The rule's fallback when an epilogue cannot be re-indexed by the product's rows: it runs as its own
    parallel loop after the product (forced here for kernels that normally align)."""
    import ember.schedules.cpu.matmul as matmul_rule

    monkeypatch.setattr(matmul_rule, "_align_consumer", lambda *args: False)
    _check(Matmul(), reshape_epilogue_kernel(2, 13, 24, 40, gelu=True))
    _check(Matmul(), matmul_residual_kernel(37, 53, 71))


# ---------------------------------------------------------------------------------------------------- conv2d
@pytest.mark.parametrize("n,c,hw,f,ks,stride,pad", [
    (2, 3, 17, 8, 3, 1, 1),
    (1, 16, 14, 32, 3, 2, 1),
    (1, 24, 7, 40, 1, 1, 0),
])
def test_conv2d(n, c, hw, f, ks, stride, pad):
    _check(Matmul(), conv_kernel(n, c, hw, f, ks, stride, pad))


def conv_nhwc_kernel(n, hw, c, f, ksize, stride, pad):
    """What ember's layout pass makes of a conv whose channels fit one panel: NHWC data, HWIO weights."""
    out_hw = (hw + 2 * pad - ksize) // stride + 1
    mod = relax_graph([("x", (n, hw, hw, c)), ("w", (ksize, ksize, c, f)), ("b", (f,)), ("r", (n, out_hw, out_hw, f))],
                      lambda x, w, b, r: op.nn.relu(op.add(op.add(op.nn.conv2d(
                          x, w, strides=stride, padding=pad, data_layout="NHWC", kernel_layout="HWIO"), b), r)))
    return the_kernel(mod, "conv2d")


@pytest.mark.parametrize("n,hw,c,f,ks,stride,pad", [
    (2, 17, 3, 16, 3, 1, 1),
    (1, 13, 7, 48, 3, 2, 1),  # prime sizes, stride 2
    (1, 7, 64, 64, 3, 1, 1),  # a deep-layer shape: 7x7 output, N = channels
    (1, 9, 24, 40, 1, 1, 0),  # 1x1, N not a multiple of the vector
])
def test_conv2d_nhwc(n, hw, c, f, ks, stride, pad):
    _check(Matmul(), conv_nhwc_kernel(n, hw, c, f, ks, stride, pad))


def test_batched_dense_prime_sizes():
    """A-only outer axes (a batch flattened into A) around a prime-sized dense: M 13, K 29, N 37."""
    mod = relax_graph([("x", (3, 13, 29)), ("w", (29, 37)), ("b", (37,))],
                      lambda x, w, b: op.add(op.matmul(x, w), b))
    _check(Matmul(), the_kernel(mod, "matmul"))


def test_conv2d_plain():
    _check(Matmul(), conv_kernel(1, 8, 15, 16, 3, 1, 1, epilogue=False))


# ---------------------------------------------------------------------------------------------------- reductions
# Row reductions are vectorized (terms summed in another order): these compare to fp32 rounding, not bit for bit;
# tests/schedules/test_cpu_reduction_vector.py checks that path in detail.
@pytest.mark.parametrize("shape,masked", [((12, 128, 128), True), ((3, 7, 13), False), ((1, 12, 16, 16), True)])
def test_softmax(shape, masked):
    _check(RowReduction(), softmax_kernel(shape, masked), expect_parallel=False)


@pytest.mark.parametrize("shape,residual", [((1, 128, 384), True), ((5, 33), False)])
def test_layernorm(shape, residual):
    _check(RowReduction(), layernorm_kernel(shape, residual), expect_parallel=False)


def test_sum_over_middle_axis():
    _check(RowReduction(), sum_middle_kernel((4, 17, 9)), expect_parallel=False)


@pytest.mark.parametrize("hw,c,pool,stride,pad", [
    (112, 64, 3, 2, 1),  # ResNet's stem max-pool
    (13, 16, 3, 2, 1),  # odd image, one vector of channels
    (9, 8, 2, 2, 0),  # an AVX2-wide channel axis, no padding
])
def test_max_pool_nhwc_vectorized_over_channels(hw, c, pool, stride, pad):
    """NHWC max-pool: the window loops run outside the channel axis, which is vectorized (results identical)."""
    mod = relax_graph([("x", (1, hw, hw, c))], lambda x: op.nn.max_pool2d(
        x, pool_size=pool, strides=stride, padding=pad, layout="NHWC"))
    sched = _check(RowReduction(), the_kernel(mod, "pool"), rtol=0, atol=0)
    assert tirx.ForKind.VECTORIZED in loop_kinds(sched)


@pytest.mark.parametrize("shape", [(1, 7, 7, 512), (1, 5, 5, 16), (3, 5, 5, 16), (2, 3, 3, 7)])
def test_global_mean_nhwc(shape):
    """A global average pool in NHWC (mean over H, W). At batch 1 (a ResNet's head) the channel axis is
    vectorized; batched, the row-wise schedule takes it (rows = images; its reduction stays scalar)."""
    mod = relax_graph([("x", shape)], lambda x: op.mean(x, axis=[1, 2]))
    sched = _check(RowReduction(), the_kernel(mod, "mean"), expect_parallel=False)
    if shape[0] == 1:
        assert tirx.ForKind.VECTORIZED in loop_kinds(sched)


def test_big_softmax_is_parallel():
    sched = _apply(RowReduction(), softmax_kernel((12, 128, 128), masked=True))
    assert tirx.ForKind.PARALLEL in loop_kinds(sched)
    assert tirx.ForKind.VECTORIZED in loop_kinds(sched)


# ---------------------------------------------------------------------------------------------------- elementwise
@pytest.mark.parametrize("shape", [(128, 1536), (7, 13, 3)])
def test_elementwise(shape):
    big = shape[0] * shape[-1] >= (1 << 16)
    sched = _check(Elementwise(), elementwise_kernel(shape), expect_parallel=big)
    if big:
        assert tirx.ForKind.VECTORIZED in loop_kinds(sched)


def test_transpose_reshape():
    _check(Elementwise(), transpose_kernel(256, 12, 32))


# ---------------------------------------------------------------------------------------------------- declines
def test_rules_decline_other_kinds():
    mm = matmul_kernel(16, 32, 24, "bias")
    conv = conv_kernel(1, 3, 9, 4, 3, 1, 1)
    sm = softmax_kernel((4, 8, 8), masked=True)
    ln = layernorm_kernel((4, 32))
    ew = elementwise_kernel((4, 32))
    assert _apply(Matmul(), sm) is None
    assert _apply(Matmul(), ln) is None
    assert _apply(Matmul(), ew) is None
    assert _apply(Elementwise(), mm) is None
    assert _apply(Elementwise(), sm) is None
    assert _apply(Elementwise(), conv) is None
    assert _apply(RowReduction(), ew) is None
    assert _apply(RowReduction(), mm) is None
    assert _apply(RowReduction(), conv) is None


def test_cpu_rules_decline_gpu_targets():
    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    for rule in (Matmul(), Elementwise(), RowReduction(), Fallback()):
        for func in (matmul_kernel(8, 8, 8), elementwise_kernel((4, 8)), softmax_kernel((2, 4, 4))):
            with cuda:
                assert rule.apply(func, cuda, False) is None


def test_fallback_keeps_results():
    # The catch-all must be correct on anything, e.g. a matmul it does not tile.
    _check(Fallback(), matmul_kernel(9, 10, 11, "bias"), expect_parallel=False)


# ---------------------------------------------------------------------------------------------------- the checker
def test_checker_catches_wrong_tail():
    """A schedule that forgets the last column of a prime-sized N must fail the comparison (NaN pre-fill)."""
    func = matmul_kernel(17, 31, 97)
    sched = _apply(Matmul(), func)
    text = sched.script()
    assert "T.int64(97)" in text
    # Shrink every bounds check of the N tail by one: the last output column is then never written.
    broken_text = text.replace("< T.int64(97)", "< T.int64(96)")
    assert broken_text != text, "expected the schedule to bounds-check the N tail"
    broken = from_source(broken_text)
    with pytest.raises(AssertionError):
        assert_same_result(func, broken)


def test_checker_catches_wrong_values():
    func = matmul_kernel(8, 16, 24)
    sched = _apply(Matmul(), func)
    broken = from_source(sched.script().replace("T.float32(0.0)", "T.float32(0.5)"))
    with pytest.raises(AssertionError):
        assert_same_result(func, broken)

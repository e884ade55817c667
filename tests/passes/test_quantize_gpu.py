"""Quantized models for GPU targets (ember/passes/quantize/gpu.py, ember/schedules/gpu/quant_gemv.py).

CI has no GPU: the layouts and the decode arithmetic are checked in numpy (bit for bit, the same operations the
kernels do), the kernels' buffers structurally (no full-precision weight anywhere), and the artifacts for CUDA,
ROCm and Metal for the quantized kernels they must hold. The numerics on a GPU are in the tests marked ``gpu``
(run where a CUDA device exists; on the H100 through benchmarks/quant_gpu_bench.py, see BENCHMARKS.md).
"""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

import ember
from ember.errors import ConfigError
from ember.schedules.gpu import quant_gemv as qg
from models import MLP, seeded

RNG = np.random.default_rng(0)


def _target(name):
    from ember.compiler.targets import resolve

    return resolve(name)[1]


# -- layouts and decode arithmetic (numpy) ------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_pack_words_round_trip_and_magic_decode(bits):
    """pack_words/unpack_words invert each other, and the kernels' decode (OR into the mantissa of 2^23 / 1024,
    subtract) gives exactly ``code - zero`` for every element, as the kernels compute it."""
    codes = RNG.integers(0, 1 << bits, (7, 96)).astype(np.uint8)
    words = qg.pack_words(codes, bits)
    assert words.dtype == np.uint32 and words.shape == (7, 96 * bits // 32)
    np.testing.assert_array_equal(qg.unpack_words(words, bits, 96), codes)
    epw = 32 // bits
    zero = float(1 << (bits - 1))
    for e in range(epw):  # fp32 path: one element per shift + mask
        v = ((words >> np.uint32(qg.element_shift(e, bits))) & np.uint32((1 << bits) - 1)) | np.uint32(0x4B000000)
        dec = v.view(np.float32) - np.float32(8388608 + zero)
        np.testing.assert_array_equal(dec, codes[:, e::epw].astype(np.float32) - zero)
    if bits == 4:  # fp16x2 path: two neighbouring elements per shift + mask
        for p in range(4):
            v = ((words >> np.uint32(4 * p)) & np.uint32(0x000F000F)) | np.uint32(0x64006400)
            h = v.view(np.float16).reshape(7, -1, 2) - np.float16(1024 + zero)
            np.testing.assert_array_equal(h[..., 0], codes[:, 2 * p::8] - zero)
            np.testing.assert_array_equal(h[..., 1], codes[:, 2 * p + 1::8] - zero)


def test_int8_words_and_sign_extension():
    """int8 codes four per int32 word (byte j = element 4w+j), and the portable dot product (sign-extend each byte
    with shifts, multiply, add) equals the int8 dot product — what __dp4a computes on CUDA."""
    a = RNG.integers(-127, 128, (3, 10)).astype(np.int8)
    b = RNG.integers(-127, 128, (3, 10)).astype(np.int8)
    wa, wb = qg.pack_int8_words(a), qg.pack_int8_words(b)
    assert wa.shape == (3, 3)
    total = np.zeros(3, np.int64)
    for j in range(4):
        sa = (wa.astype(np.int32) << (24 - 8 * j)) >> 24
        sb = (wb.astype(np.int32) << (24 - 8 * j)) >> 24
        total += (sa.astype(np.int64) * sb).sum(1)
    np.testing.assert_array_equal(total, (a.astype(np.int64) * b).sum(1))


# -- the kernels' index arithmetic, run on this CPU (the CPU twin: same loops, serial) --------------------------
def _run_twin(func, *arrays, out_shape, out_dtype):
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      tvm.target.Target({"kind": "llvm"}))
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(out_shape, out_dtype), dev)
    lib["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays], out)
    return out.numpy()


@pytest.mark.parametrize("k,n,bits,group,sym,bias,m,rows,opts", [
    (1408, 40, 4, 128, True, False, 1, 1, {}),  # 176 words: not a multiple of 32 x unroll, a guarded tail
    (256, 24, 4, 32, False, True, 3, 3, {"unroll": 4}),
    (256, 24, 4, 32, True, True, 13, None, {}),  # symbolic rows: tiles of ROW_TILE, last one partial
    (512, 8, 4, 64, True, False, 2, 2, {"prefetch": True}),  # the opt-in prefetch (not yet timed on a GPU)
    (688, 16, 4, 16, True, False, 1, 1, {"prefetch": True, "unroll": 4}),
    (256, 24, 4, 128, True, False, 5, 5, {"chunk_words": 4, "unroll": 2}),  # run 1-2 layout
    (96, 12, 8, -1, False, True, 4, None, {}),  # INT8 codes, one group per row, asymmetric
])
def test_weight_only_gemv_twin_matches_numpy(k, n, bits, group, sym, bias, m, rows, opts):
    """The GEMV's loops, guards, packing and decode (fp32 path) against a numpy matmul on the dequantized
    weights; the GPU-only parts (warp shuffles, the half2 device function) ran on the H100 (BENCHMARKS.md)."""
    from ember.passes.quantize import qmath

    w = RNG.standard_normal((k, n)).astype(np.float32)
    q, sc, z = qmath.quantize_groups(w, bits, group, sym, axis=0, search=False)
    deq = qmath.dequantize_groups(q, sc, z, group, axis=0)
    x = RNG.standard_normal((m, k)).astype(np.float32)
    b = RNG.standard_normal(n).astype(np.float32)
    args = [x, qg.pack_words(np.ascontiguousarray(q.T), bits), np.ascontiguousarray(sc.T).astype(np.float16)]
    if not sym:
        args.append(np.ascontiguousarray(z.T).astype(np.uint8))
    if bias:
        args.append(b)
    func = qg.weight_only_gemv(k, n, bits, group, sym, bias, "float32", rows, _target("cuda-sm90"), emulate=True,
                               **opts)
    y = _run_twin(func, *args, out_shape=(m, n), out_dtype="float32")
    np.testing.assert_allclose(y, x @ deq + (b if bias else 0), rtol=1e-4, atol=1e-4)


def test_interleave_words_round_trip_and_lane_order():
    """Tiled layout: lane t's 16 bytes of a 128-word chunk hold logical words t, 32+t, 64+t, 96+t; the tail keeps
    its order; deinterleave undoes it."""
    words = np.arange(3 * 192, dtype=np.uint32).reshape(3, 192)  # one whole chunk + two tail stripes
    il = qg.interleave_words(words)
    np.testing.assert_array_equal(qg.deinterleave_words(il), words)
    np.testing.assert_array_equal(il[1, 4 * 5:4 * 5 + 4], words[1, [5, 37, 69, 101]])
    np.testing.assert_array_equal(il[:, 128:], words[:, 128:])
    assert qg.tiled_applies(11008, 4096, 4, 128, 1) and not qg.tiled_applies(11008, 4096, 4, 128, None)
    assert not qg.tiled_applies(1408, 4096, 4, 128, 1)  # 176 words: not whole 32-word stripes


@pytest.mark.parametrize("k,n,bits,group,sym,bias,m,opts", [
    (1536, 16, 4, 128, True, False, 1, {}),  # one 16-byte step + two tail stripes, all loads before the decode
    (2048, 16, 4, 128, True, True, 2, {"cols": 4, "batch": 1}),  # two batches of one step
    (2560, 24, 4, 64, False, False, 1, {"cols": 1, "warps": 8, "batch": 4}),  # 5 steps: batch 4 → 1 (divides)
    (256, 24, 4, 32, False, True, 3, {"cols": 1, "warps": 8}),  # tail only
    (1024, 16, 8, -1, False, True, 1, {"cols": 2, "warps": 2}),  # INT8 codes, one group per row
    (1536, 16, 4, 128, True, True, 2, {"hold": True, "pdl": "wait"}),  # CUDA-only options: the twin ignores them
])
def test_weight_only_gemv_tiled_twin_matches_numpy(k, n, bits, group, sym, bias, m, opts):
    """The tiled GEMV (interleaved words, columns per warp, batched loads) against numpy, fp32 decode path."""
    from ember.passes.quantize import qmath

    w = RNG.standard_normal((k, n)).astype(np.float32)
    q, sc, z = qmath.quantize_groups(w, bits, group, sym, axis=0, search=False)
    deq = qmath.dequantize_groups(q, sc, z, group, axis=0)
    x = RNG.standard_normal((m, k)).astype(np.float32)
    b = RNG.standard_normal(n).astype(np.float32)
    words = qg.interleave_words(qg.pack_words(np.ascontiguousarray(q.T), bits))
    args = [x, words, np.ascontiguousarray(sc.T).astype(np.float16)]
    if not sym:
        args.append(np.ascontiguousarray(z.T).astype(np.uint8))
    if bias:
        args.append(b)
    func = qg.weight_only_gemv_tiled(k, n, bits, group, sym, bias, "float32", m, _target("cuda-sm90"),
                                     emulate=True, **opts)
    y = _run_twin(func, *args, out_shape=(m, n), out_dtype="float32")
    np.testing.assert_allclose(y, x @ deq + (b if bias else 0), rtol=1e-4, atol=1e-4)


def test_weight_only_gemv_tiled_cuda_kernel_shape():
    """For the issue's shape on CUDA: half2 decode, 16-byte (4-word vectorized) weight loads, no bounds checks,
    and every buffer thread-local (registers), the largest one the batch of loaded words (10 steps x 1 column)."""
    func = qg.weight_only_gemv_tiled(11008, 4096, 4, 128, True, False, "float16", 1, _target("cuda-sm90"))
    text = func.script()
    assert "ember_i4_dot8s" in text and "ember_ld_stream16" in text  # the defaults: half2s decode, stream loads
    plain = qg.weight_only_gemv_tiled(11008, 4096, 4, 128, True, False, "float16", 1, _target("cuda-sm90"),
                                      decode="half2", stream=False).script()
    assert "ember_i4_dot8(" in plain and "T.vectorized(4)" in plain
    assert " < " not in text  # no guard anywhere: whole stripes, whole column tiles
    allocs = _allocations(func)
    assert all(scope == "local" for _, scope, _ in allocs), allocs
    assert max(size for _, _, size in allocs) == 10 * 1 * 4


@pytest.mark.parametrize("group,gw_lanes", [(128, 2), (32, 8), (256, 1)])
def test_interleave_scales_lane_order_and_round_trip(group, gw_lanes):
    """Staged / scale_vec layout: in each 128-word chunk, lane t's 4 scales of a step (its words 32 j + t,
    j = 0..3) sit side by side at c G + 4 (t // gw); tail groups keep their place; rows padded to 8 fp16."""
    k, bits, n = 1536, 4, 3  # 192 words: one whole chunk + 2 tail stripes
    ng = k // group
    scales = np.arange(n * ng, dtype=np.float16).reshape(n, ng) + 1
    packed = qg.interleave_scales(scales, k, bits, group)
    assert packed.shape == (n, qg.scale_row(ng)) and qg.scale_row(ng) % 8 == 0
    np.testing.assert_array_equal(qg.deinterleave_scales(packed, k, bits, group), scales)
    gw = group // 8
    G = 128 // gw
    for t in (0, 5, 17, 31):
        h = t // gw
        assert h < gw_lanes
        want = [scales[1, (32 * j + t) * 8 // group] for j in range(4)]
        np.testing.assert_array_equal(packed[1, 4 * h:4 * h + 4] if G > 1 else packed[1, :4], want)
    np.testing.assert_array_equal(packed[:, G:ng], scales[:, G:])  # the tail stripes' groups
    assert not packed[:, ng:].any()
    assert not qg.lane_scales_apply(k, bits, 512)  # a group over more than one stripe: per-word scales


@pytest.mark.parametrize("k,n,bits,group,sym,bias,m,warps,depth", [
    (1536, 16, 4, 128, True, False, 1, 4, None),  # one whole step + two tail stripes
    (2048, 16, 4, 128, True, True, 2, 4, None),  # two steps, two rows, bias
    (3584, 16, 4, 128, True, True, 2, 4, 1),  # 3 steps, one in flight: steps 1, 2 copied during the decode
    (2560, 24, 4, 64, False, False, 1, 8, 1),  # asymmetric, 8 warps, 2 steps + 2 tail stripes, depth 1
    (256, 24, 4, 32, False, True, 3, 4, None),  # tail stripe only
    (1024, 16, 8, 32, False, True, 1, 2, None),  # INT8 codes
])
def test_weight_only_gemv_staged_twin_matches_numpy(k, n, bits, group, sym, bias, m, warps, depth):
    """The staged GEMV (rows + scales copied to shared memory, then decoded) against numpy, fp32 decode path;
    the twin runs the copy loop of all lanes before their decode, as cp.async.wait_group + __syncwarp order it."""
    from ember.passes.quantize import qmath

    w = RNG.standard_normal((k, n)).astype(np.float32)
    q, sc, z = qmath.quantize_groups(w, bits, group, sym, axis=0, search=False)
    deq = qmath.dequantize_groups(q, sc, z, group, axis=0)
    x = RNG.standard_normal((m, k)).astype(np.float32)
    b = RNG.standard_normal(n).astype(np.float32)
    words = qg.interleave_words(qg.pack_words(np.ascontiguousarray(q.T), bits))
    args = [x, words, qg.interleave_scales(np.ascontiguousarray(sc.T).astype(np.float16), k, bits, group)]
    if not sym:
        args.append(np.ascontiguousarray(z.T).astype(np.uint8))
    if bias:
        args.append(b)
    assert qg.staged_applies(k, n, bits, group, m, warps)
    func = qg.weight_only_gemv_staged(k, n, bits, group, sym, bias, "float32", m, _target("cuda-sm90"),
                                      warps=warps, depth=depth, emulate=True)
    y = _run_twin(func, *args, out_shape=(m, n), out_dtype="float32")
    np.testing.assert_allclose(y, x @ deq + (b if bias else 0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hold,pdl", [(True, None), (False, "wait"), (True, "wait"), (True, "start")])
def test_weight_only_gemv_tiled_hold_and_pdl_cuda_kernel(hold, pdl):
    """The tiled kernel's ``hold`` and ``pdl`` options on the issue's shape. hold: the 10 16-byte weight loads and
    the 3 tail loads all come before ember_hold_words (which folds the 43 words and feeds the signed zero every
    decode adds: ember_i4_dot8sz), and no decode comes before it. pdl: the launch tag, griddepcontrol.wait after every
    weight load (with hold: inside ember_hold_words_wait, behind the branch on the folded words), x read only after
    it (coherent loads inside the _gx decode), launch_dependents at the start or after the wait."""
    func = qg.weight_only_gemv_tiled(11008, 4096, 4, 128, True, False, "float16", 1, _target("cuda-sm90"),
                                     hold=hold, pdl=pdl)
    text = func.script()
    tags = func.attrs.get("tirx.kernel_launch_params") if func.attrs else None
    assert (list(tags) == [qg.PDL_TAG]) if pdl else tags is None
    def call(name):  # where the kernel calls ``name`` (its CUDA source follows each call in the script)
        return text.index(f'func_call("{name}"')

    first_dot = call(("ember_i4_dot8sz" if hold else "ember_i4_dot8s") + ("_gx" if pdl else ""))
    tail, steps = call("ember_ld_stream4"), call("ember_ld_stream16")
    assert "for j in T.unroll(3)" in text[:tail] and "for u in T.unroll(10)" in text[tail:steps]
    last_load = steps
    if hold:
        hold_at = call("ember_hold_words_wait" if pdl else "ember_hold_words")
        assert tail < steps < hold_at < first_dot
        assert 'func_call("ember_i4_dot8s"' not in text and 'func_call("ember_i4_dot8s_gx"' not in text
        assert "T.address_of(wv[0]), 40, T.address_of(wt[0]), 3, T.address_of(hz[0])" in text  # all 43 words
        assert "hz[0], source_code" in text[first_dot:]  # the decode takes the fold's signed zero
    if pdl is None:
        assert "griddepcontrol" not in text and "ember_grid_dep" not in text
        return
    wait = call("ember_hold_words_wait" if hold else "ember_grid_dep_wait")
    assert last_load < wait < first_dot
    assert "x[" not in text[:wait]  # x only through the coherent loads after the wait (register loads: 0 trips)
    assert text.count("for v0 in T.unroll(0)") == 2 and "for v0 in T.unroll(1)" not in text
    launch = call("ember_grid_dep_launch")
    assert (launch < tail) if pdl == "start" else (wait < launch < first_dot)
    src = qg._HOLD_WAIT_CUDA
    assert src.count("griddepcontrol.wait") == 2 and "bra.uni" in src  # both paths of the branch wait
    with pytest.raises(AssertionError, match="one batch"):
        qg.weight_only_gemv_tiled(11008, 4096, 4, 128, True, False, "float16", 1, _target("cuda-sm90"),
                                  batch=5, hold=hold, pdl=pdl)


def test_weight_only_gemv_tiled_register_cap_reaches_cuda_source():
    """``max_registers`` puts a tirx.max_registers AttrStmt inside the blockIdx.x loop (a PrimFunc attribute does
    not reach the device kernel), which TVM's CUDA codegen prints as __maxnreg__(64); the CPU twin ignores it."""
    import tvm

    from ember.compiler.cuda_aot import cuda_build_environment

    target = _target("cuda-sm90")
    func = qg.weight_only_gemv_tiled(11008, 4096, 4, 128, True, False, "float16", 1, target, hold=True,
                                     max_registers=64)
    text = func.script()
    assert text.count('"tirx.max_registers", 64') == 1
    assert text.index("blockIdx.x") < text.index('"tirx.max_registers"') < text.index("threadIdx.y")
    twin = qg.weight_only_gemv_tiled(1536, 16, 4, 128, True, False, "float32", 1, target, max_registers=64,
                                     emulate=True)
    assert "max_registers" not in twin.script()
    if _available("cuda-sm90"):
        pytest.skip(_available("cuda-sm90"))
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    with cuda_build_environment(target, "cuda-sm90"), target:
        lib = tvm.compile(mod, target)
    assert "__maxnreg__(64)" in lib.mod.imports[0].inspect_source("cuda")


@pytest.mark.parametrize("pdl,pipeline", [(None, False), ("start", False), ("wait", True)])
def test_weight_only_gemv_staged_cuda_kernel(pdl, pipeline):
    """For the issue's shape on CUDA: every copy (10 whole steps, the tail, the scales) is a cp.async issued before
    the one wait; with ``pdl`` the kernel carries the launch tag, and x is read only after griddepcontrol.wait
    (coherent loads inside ember_i4_dot8s_gx) — nothing but weights and scales before it."""
    func = qg.weight_only_gemv_staged(11008, 4096, 4, 128, True, False, "float16", 1, _target("cuda-sm90"), pdl=pdl,
                                      pipeline=pipeline)
    text = func.script()
    if pipeline:  # a group per step (+ the tail's), step c decoded once groups 0..c landed, the tail after all
        assert "ember_cp_async_wait_all" not in text and text.count("ember_cp_async_commit()") == 2
        assert "T.min(10 - c, 15)" in text and "ember_cp_async_wait_n\", 0" in text
    else:
        assert "ember_cp_async_wait_all" in text and "ember_cp_async_commit" not in text
    # three unrolled copy loops: 10 whole steps, the tail (24 lanes x 16 bytes), the scales (11 lanes)
    assert "T.unroll(10)" in text and "tx < 24" in text and "tx < 11" in text
    shared = [(d, size) for d, scope, size in _allocations(func) if scope == "shared"]
    assert sorted(shared) == sorted([("uint32", 4 * 1376), ("float16", 4 * 88)])
    tags = func.attrs.get("tirx.kernel_launch_params") if func.attrs else None
    if pdl is None:
        assert tags is None and "griddepcontrol" not in text
        return
    assert list(tags) == [qg.PDL_TAG]
    wait = text.index("ember_grid_dep_wait()")
    assert text.rindex("ember_cp_async16") < wait < text.index("ember_i4_dot8s_gx(")
    assert "x[" not in text[:wait]  # no x read before the wait
    if pdl == "start":
        assert text.index("ember_grid_dep_launch()") < text.index("ember_cp_async16")
    else:
        assert wait < text.index("ember_grid_dep_launch()") < text.index("ember_i4_dot8s_gx(")
    assert not qg.staged_applies(11008, 4096, 4, 128, 1, target=_target("rocm-gfx942"))


def test_weight_only_gemv_staged_depth_keeps_depth_steps_in_flight():
    """``depth=3`` on the issue's shape: 3 steps (+ scales, tail) copied before the decode, one more copied at each
    decoded step while 3 groups stay pending (cp.async.wait_group 3), no wait-for-all."""
    text = qg.weight_only_gemv_staged(11008, 4096, 4, 128, True, False, "float16", 1, _target("cuda-sm90"),
                                      depth=3).script()
    assert "T.unroll(3)" in text and "c + 3 < 10" in text and "ember_cp_async_wait_all" not in text
    assert "ember_cp_async_wait_n\", 3" in text


def test_staged_fp16_pdl_preset_kernel():
    """STAGED_FP16_PDL (issue 4's measured best for back-to-back fp16 GEMVs): 2 warps per block, 2 steps copied before
    griddepcontrol.wait (+ scales and tail), step c + 2 issued while step c is decoded, the PDL launch tag."""
    func = qg.weight_only_gemv_staged(11008, 4096, 4, 128, True, False, "float16", 1, _target("cuda-sm90"),
                                      **qg.STAGED_FP16_PDL)
    text = func.script()
    assert list(func.attrs["tirx.kernel_launch_params"]) == [qg.PDL_TAG]
    assert "T.thread_binding(2048" in text and "T.thread_binding(2, thread=\"threadIdx.y\")" in text
    wait = text.index("ember_grid_dep_wait")
    assert "for c in T.unroll(2)" in text[:wait] and "c + 2 < 10" in text[wait:]
    assert "ember_cp_async_wait_n\", 2" in text and "x[" not in text[:wait]


@pytest.mark.parametrize("k,n,bias,m,rows", [(70, 24, True, 3, 3), (512, 16, False, 9, None)])
def test_int8_gemv_twin_matches_numpy(k, n, bias, m, rows):
    """INT8 x INT8 → int32 GEMV (the sign-extending dot product, as on ROCm / Metal) against numpy."""
    from ember.passes.quantize import qmath

    w = RNG.standard_normal((k, n)).astype(np.float32)
    wq, ws = qmath.int8_weight(w)
    x = RNG.standard_normal((m, k)).astype(np.float32)
    xq, xs = qmath.quantize_activation_rows(x)
    b = RNG.standard_normal(n).astype(np.float32)
    args = [qg.pack_int8_words(xq.astype(np.int8)), qg.pack_int8_words(np.ascontiguousarray(wq.T)), xs, ws]
    if bias:
        args.append(b)
    func = qg.int8_gemv(k, n, bias, rows, _target("cuda-sm90"), emulate=True)
    y = _run_twin(func, *args, out_shape=(m, n), out_dtype="float32")
    ref = (xq.astype(np.int64) @ wq.astype(np.int64)).astype(np.float32) * xs[:, None] * ws[None, :]
    np.testing.assert_allclose(y, ref + (b if bias else 0), rtol=1e-4, atol=1e-3)


# -- the kernels hold no full-precision weight --------------------------------------------------------------
def _allocations(func):
    import tvm_ffi
    from tvm import tirx

    found = []

    def visit(node):
        buf = node.buffer
        found.append((str(buf.dtype), buf.scope(), int(np.prod([int(d) for d in buf.shape]))))

    for node_type in (tirx.AllocBuffer, tirx.DeclBuffer):
        tvm_ffi.structural_walk(func.body, (node_type, visit), order="post")
    return found


@pytest.mark.parametrize("target", ["cuda-sm90", "rocm-gfx942", "metal"])
@pytest.mark.parametrize("rows,act", [(1, "float16"), (None, "float32")])
def test_weight_only_kernel_buffers_are_registers_only(target, rows, act):
    """The decoded weights never exist as a buffer: every buffer the kernel declares is thread-local (registers)
    and holds at most one 16-byte chunk per unrolled step, far from the K x N weight."""
    k, n = 4096, 512
    func = qg.weight_only_gemv(k, n, 4, 128, True, True, act, rows, _target(target))
    allocs = _allocations(func)
    assert allocs, "expected the kernel's register buffers"
    assert all(scope == "local" for _, scope, _ in allocs), allocs
    assert max(size for _, _, size in allocs) <= qg.UNROLL * qg.CHUNK_WORDS < k * n
    names = [p.name for p in func.params]
    assert len(names) == 5 and "z" not in names  # x, qweight, scales, bias, y: no zeros for symmetric codes


# -- artifacts ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlp():
    model = seeded(MLP, d_in=64, hidden=96, d_out=10)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    return model, x


def _available(target):
    from ember.compiler import cuda_aot, rocm_aot
    from ember.compiler.cross import find_ld64

    if target.startswith("cuda") and cuda_aot.find_nvcc() is None:
        return "nvcc missing"
    if target.startswith("rocm") and (rocm_aot.find_bitcode_dir() is None or not rocm_aot.find_lld()):
        return "rocm-device-libs / lld missing"
    if target == "metal" and find_ld64() is None:
        return "ld64.lld missing"
    return None


def _kernel_names(lib, target):
    """The kernels a library launches, read from the device code (no GPU, no TVM)."""
    if target.startswith("rocm"):
        from ember.compiler.rocm_aot import inspect_code_objects

        return {k for co in inspect_code_objects(lib) for k in co.kernels}
    if target == "metal":
        from ember.compiler.metal import inspect_metal

        return set(inspect_metal(lib).functions)
    data = open(lib, "rb").read()  # CUDA: kernel names are in TVM's function table and the cubin symbols
    return {name for name in ("ember_gpu_wo_gemv", "ember_gpu_int8_gemv", "ember_gpu_quant_rows")
            if name.encode() in data}


@pytest.mark.slow
@pytest.mark.parametrize("staged", [False, True])
def test_int4_mlp_for_cuda_uses_tiled_kernel_where_it_applies(tmp_path, monkeypatch, staged):
    """First layer K = 256 (32 words: one whole stripe) → the tiled kernel on interleaved words (or, with
    quant_gemv.STAGED switched on, the staged kernel with interleaved scales too); second layer K = 64 → the
    one-word kernel. Both in one CUDA artifact."""
    why = _available("cuda-sm90")
    if why:
        pytest.skip(why)
    monkeypatch.setattr(qg, "STAGED", staged)
    model = seeded(MLP, d_in=256, hidden=64, d_out=10)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(3))
    cm = ember.compile(model, (x,), target="cuda-sm90", quantization=ember.WeightOnly(bits=4, group_size=32))
    art = cm.export(tmp_path / "art")
    data = open(f"{art}/model.so", "rb").read()
    kind = b"staged" if staged else b"tiled"
    assert b"ember_gpu_wo_gemv_4_256_64_32_1_1_4_" + kind in data
    assert b"ember_gpu_wo_gemv_4_64_10_32_1_1_4_word" in data


@pytest.mark.slow
@pytest.mark.parametrize("target", ["cuda-sm90", "rocm-gfx942", "metal"])
@pytest.mark.parametrize("scheme", ["int4", "int8dyn"])
def test_quantized_mlp_artifact_holds_gpu_kernels(mlp, target, scheme, tmp_path):
    why = _available(target)
    if why:
        pytest.skip(why)
    model, x = mlp
    cfg = ember.WeightOnly(bits=4, group_size=32) if scheme == "int4" else ember.Int8Dynamic()
    cm = ember.compile(model, (x,), target=target, quantization=cfg)
    art = cm.export(tmp_path / "art")
    manifest = json.load(open(f"{art}/manifest.json"))
    rep = manifest["compression"]["quantization"]
    assert rep["scheme"]["type"] == type(cfg).__name__ and len(rep["layers"]) == 3
    assert "skipped" in rep["end_to_end"]  # a GPU build does not run here; the report says so
    assert manifest["target"]["gpu"]["device_code"] in ("fatbin", "hsaco", "msl")
    names = _kernel_names(f"{art}/model.so", target)
    wanted = ["ember_gpu_wo_gemv"] if scheme == "int4" else ["ember_gpu_int8_gemv", "ember_gpu_quant_rows"]
    for w in wanted:
        assert any(n.startswith(w) for n in names), (w, sorted(names))
    if scheme == "int4":  # K = 64 / 96 are 8 / 12 words, not whole 32-word stripes: the one-word kernel
        assert not qg.tiled_applies(64, 96, 4, 32, 6)
        assert not any("tiled" in n for n in names) and b"_tiled" not in open(f"{art}/model.so", "rb").read()
    # the artifact's weights are the packed codes: no fp32 matrix left
    from tvm.runtime import load_param_dict

    params = load_param_dict(open(f"{art}/params.bin", "rb").read())
    mats = {k: v.numpy() for k, v in params.items() if len(v.shape) == 2}
    assert mats and all(a.dtype != np.float32 for a in mats.values()), {k: a.dtype for k, a in mats.items()}
    if target.startswith("cuda") and scheme == "int8dyn" and shutil.which("cuobjdump", path="/usr/local/cuda/bin"):
        sass = subprocess.run([shutil.which("cuobjdump", path="/usr/local/cuda/bin"), "-sass", f"{art}/model.so"],
                              capture_output=True, text=True, timeout=120).stdout
        if sass:
            assert "IDP4A" in sass, "the int8 GEMV should use the dp4a instruction"


@pytest.mark.slow
def test_cuda_lowered_module_has_no_fp32_weight_buffer(mlp):
    """The whole CUDA module as lowered for the VM: no Relax tensor and no kernel buffer as large as a weight
    matrix in float — the weights stay packed until registers."""
    import tvm
    from tvm import relax

    from ember.compiler.build import import_model
    from ember.compiler.cuda_aot import cuda_build_environment
    from ember.compiler.pipeline import lower, prepare
    from ember.passes.quantize import apply_quantization

    if _available("cuda-sm90"):
        pytest.skip(_available("cuda-sm90"))
    model, x = mlp
    tgt = _target("cuda-sm90")
    imported = import_model(model, (x,))
    imported, _ = apply_quantization(imported, ember.WeightOnly(bits=4, group_size=32), tgt)
    mod = prepare(imported.mod, target=tgt)
    with cuda_build_environment(tgt, "cuda-sm90"), tgt:
        lowered = lower(tgt)(mod)
    smallest_weight = 64 * 96  # elements of the smallest linear weight of the MLP
    for gv, func in lowered.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            for dtype, scope, size in _allocations(func):
                if "float" in dtype:
                    assert size < smallest_weight, (gv.name_hint, dtype, scope, size)
    # Relax side: every float tensor the VM allocates or takes is activation-sized (6 rows) or a bias/scale
    shapes = []

    def visit(e):
        si = getattr(e, "struct_info", None) or getattr(e, "ty", None)
        if "float" in str(getattr(si, "dtype", "")) and hasattr(getattr(si, "shape", None), "values"):
            dims = [int(d) for d in si.shape.values if hasattr(d, "value")]
            if len(dims) == len(si.shape.values):
                shapes.append((tuple(dims), str(si.dtype)))

    relax.analysis.post_order_visit(lowered["main"], visit)
    assert shapes
    assert all(int(np.prod(s)) < smallest_weight for s, _ in shapes), sorted(set(shapes))


def test_gpu_group_must_fit_words(mlp):
    model = nn.Sequential(nn.Linear(36, 16)).eval()
    x = torch.randn(2, 36)
    with pytest.raises(ConfigError, match=r"layer '.*weight'.*multiples of 8"):
        ember.compile(model, (x,), target="cuda-sm90", quantization=ember.WeightOnly(bits=4, group_size=-1))


# -- on a CUDA GPU ------------------------------------------------------------------------------------------
def _cuda_device():
    try:
        import tvm

        from ember.runtime.load import _load_device_runtime

        _load_device_runtime("cuda")
        return tvm.cuda(0).exist
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.gpu
@pytest.mark.parametrize("cfg,tol", [(ember.WeightOnly(bits=4, group_size=32), 0.15),
                                     (ember.WeightOnly(bits=8, group_size=-1, symmetric=False), 0.03),
                                     (ember.Int8Dynamic(), 0.03)])
def test_quantized_mlp_on_cuda_matches_torch_and_cpu_build(mlp, cfg, tol, tmp_path):
    if not _cuda_device():
        pytest.skip("no CUDA device")
    model, x = mlp
    got = ember.compile(model, (x,), target="cuda-sm90", quantization=cfg)(x.numpy())
    cpu = ember.compile(model, (x,), target="host", quantization=cfg)(x.numpy())
    ref = model(x).detach().numpy()
    assert np.abs(np.exp(got) - np.exp(ref)).max() < tol
    np.testing.assert_allclose(got, cpu, atol=1e-3)  # same codes: only the order of the additions differs


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [ember.Int8Dynamic(), ember.WeightOnly(bits=4, group_size=16)])
def test_tiny_transformer_quantized_compiles_for_cuda(cfg, tmp_path):
    """Layer norms feeding INT8 layers (fused with the quantizer on CPUs, kept as a Relax op on GPUs), GELU after
    an INT8 layer, attention and a quantized embedding table, for CUDA."""
    if _available("cuda-sm90"):
        pytest.skip(_available("cuda-sm90"))
    from models import TinyTransformer

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (2, 16), generator=g)
    mask = torch.ones(2, 16, dtype=torch.int64)
    cm = ember.compile(seeded(TinyTransformer), (ids, mask), target="cuda-sm90", quantization=cfg)
    art = cm.export(tmp_path / "art")
    assert json.load(open(f"{art}/manifest.json"))["target"]["gpu"]["device_code"] == "fatbin"
    names = _kernel_names(f"{art}/model.so", "cuda-sm90")
    assert ("ember_gpu_int8_gemv" if isinstance(cfg, ember.Int8Dynamic) else "ember_gpu_wo_gemv") in names


@pytest.mark.slow
@pytest.mark.parametrize("make", [
    lambda x: ember.Int8Dynamic(granularity="tensor"),  # per-tensor range: a max |x| kernel first
    lambda x: ember.Int8Static(calibration=[(x,)], granularity="tensor"),  # calibrated clip + SmoothQuant
    lambda x: ember.Int8Static(calibration=[(x,)], granularity="token"),
    lambda x: ember.WeightOnly(bits=8, group_size=32, symmetric=False),
])
def test_other_schemes_compile_for_cuda(mlp, make, tmp_path):
    """The activation-quantizer variants (per tensor, calibrated clip, smoothing) and asymmetric INT8 weight-only
    compile to CUDA device code. (Their numerics on a GPU are not covered by the H100 runs: see BENCHMARKS.md.)"""
    if _available("cuda-sm90"):
        pytest.skip(_available("cuda-sm90"))
    model, x = mlp
    cm = ember.compile(model, (x,), target="cuda-sm90", quantization=make(x))
    art = cm.export(tmp_path / "art")
    assert json.load(open(f"{art}/manifest.json"))["target"]["gpu"]["device_code"] == "fatbin"

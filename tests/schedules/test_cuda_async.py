"""The inline-PTX helper sources of ember's hand-written CUDA kernels (ember/schedules/gpu/cuda_async.py). The
kernels that paste them are compiled with nvcc in tests/passes/test_attention_resident.py, test_fusion_cuda.py and
test_quantize_gpu.py; here: what each generated helper says."""

import re

from ember.schedules.gpu.cuda_async import (cp_async16_source, cp_async_commit_source, cp_async_wait_source,
                                            ldmatrix_x4_source)


def test_wait_switch_covers_every_count_and_saturates():
    src = cp_async_wait_source("w", 5)
    assert re.findall(r"case (\d+): asm volatile\(\"cp.async.wait_group (\d+);", src) == [(str(i), str(i))
                                                                                          for i in range(5)]
    assert 'default: asm volatile("cp.async.wait_group 5;"' in src  # more pending than 5: wait for 5
    assert "__syncwarp" not in src and "__syncwarp();" in cp_async_wait_source("w", 5, sync_warp=True)
    assert src.count("{") == src.count("}")


def test_copy_commit_and_ldmatrix_variants():
    assert "cp.async.cg.shared.global [%0]" in cp_async16_source("c")
    assert "cp.async.cg.shared.global.L2::256B [%0]" in cp_async16_source("c", l2_prefetch=True)
    assert "void k()" in cp_async_commit_source("k") and "cp.async.commit_group;" in cp_async_commit_source("k")
    assert "m8n8.x4.shared.b16 {%0, %1, %2, %3}" in ldmatrix_x4_source("l")
    assert "m8n8.x4.trans.shared.b16" in ldmatrix_x4_source("l", transpose=True)
    for src in (cp_async16_source("f"), ldmatrix_x4_source("f"), cp_async_wait_source("f", 3)):
        assert "__forceinline__ __device__ void f(" in src

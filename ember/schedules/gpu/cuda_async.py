"""CUDA source of the small inline-PTX helpers that ember's hand-written GPU kernels call through
``cuda_func_call`` (cp.async copies, their commit/wait, ldmatrix), generated from one template each.

Each kernel family names its own copies (``ember_attn_*``, ``ember_cp_async_*``) because TVM pastes every helper's
source into the module once per name; two families with the same name but different bodies would clash.
"""

from __future__ import annotations


def cp_async16_source(name: str, l2_prefetch: bool = False) -> str:
    """``name(smem, smem_last, gmem)``: one 16-byte ``cp.async.cg`` global -> shared copy (``smem_last`` is the
    buffer's last element, passed only so TVM sees the whole shared region written). ``l2_prefetch`` adds the
    ``.L2::256B`` hint (streaming weights: the next 256 bytes are fetched into L2 with this line)."""
    hint = ".L2::256B" if l2_prefetch else ""
    return rf"""
__forceinline__ __device__ void {name}(void* smem, const void* smem_last, const void* gmem) {{
  unsigned int s = (unsigned int)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global{hint} [%0], [%1], 16;" :: "r"(s), "l"(gmem) : "memory");
}}
"""


def cp_async_commit_source(name: str) -> str:
    """``name()``: close the current cp.async group."""
    return rf"""
__forceinline__ __device__ void {name}() {{ asm volatile("cp.async.commit_group;" ::: "memory"); }}
"""


def cp_async_wait_source(name: str, max_pending: int, sync_warp: bool = False) -> str:
    """``name(n)``: wait until at most ``n`` cp.async groups are pending (``n`` > ``max_pending`` waits for
    ``max_pending``). ``wait_group`` takes an immediate, so this is a switch; it folds to one instruction once the
    (unrolled) call has a constant argument. ``sync_warp``: a ``__syncwarp()`` after, for kernels whose lanes
    read what other lanes of the warp copied."""
    cases = "".join(f'    case {i}: asm volatile("cp.async.wait_group {i};" ::: "memory"); break;\n'
                    for i in range(max_pending))
    tail = "  __syncwarp();\n" if sync_warp else ""
    return (f"\n__forceinline__ __device__ void {name}(int n) {{\n  switch (n) {{\n{cases}"
            f'    default: asm volatile("cp.async.wait_group {max_pending};" ::: "memory"); break;\n  }}\n{tail}}}\n')


def ldmatrix_x4_source(name: str, transpose: bool = False) -> str:
    """``name(dst, smem_last, smem)``: ``ldmatrix.sync.aligned.m8n8.x4`` (``.trans`` for ``transpose``) of four
    8x8 b16 matrices into the 4 registers at ``dst``."""
    trans = ".trans" if transpose else ""
    return rf"""
__forceinline__ __device__ void {name}(void* dst, const void* smem_last, const void* smem) {{
  unsigned int s = (unsigned int)__cvta_generic_to_shared(smem);
  unsigned int* d = (unsigned int*)dst;
  asm volatile("ldmatrix.sync.aligned.m8n8.x4{trans}.shared.b16 {{%0, %1, %2, %3}}, [%4];"
               : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3]) : "r"(s) : "memory");
}}
"""

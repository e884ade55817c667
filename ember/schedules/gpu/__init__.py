"""ember's own GPU schedule rules, tried before dlight's defaults where dlight is weak (see each module).

* :class:`GEMV` — decode-shaped matmuls (1..8 activation rows): 128-bit weight loads, split-K, warp shuffles.
* :class:`TensorCoreMatmul` — fp16 GEMMs on tensor cores for CUDA sm_70+ (Hopper included).
"""

from .gemv import GEMV
from .tensor_core import TensorCoreMatmul

__all__ = ["GEMV", "TensorCoreMatmul"]

"""The branch-free float32 erf shared by the CPU (ember.schedules.cpu.fast_math) and the Hopper GEMM's GELU
epilogue (ember.schedules.gpu.hopper_gemm): two polynomials fitted for ember (weighted least squares with Lawson
iterations in float64, coefficients rounded to fp32):

    |x| <  ERF_SPLIT:  erf = a + a * P(a^2)                 (a = |x|, P's coefficients ERF_SMALL, lowest first)
    |x| >= ERF_SPLIT:  erf = 1 - 2^(c * Q(c) - c)            (c = min(a, ERF_CLAMP), Q's coefficients ERF_BIG)

then the sign of x. Beyond ERF_CLAMP erf rounds to 1 in fp32, so the clamp loses nothing and bounds the exponent:
c * Q(c) - c lies in [-26, 0] for every c in [0, ERF_CLAMP], far from exp2's overflow and denormal ranges.
Max error vs the exact erf over [-6, 6]: 1.04 ulp with an exact exp2 (CUDA's exp2f adds < 0.5 ulp of erf near
the split). NaN stays NaN (the small branch takes it), +-inf give +-1. No division, one exp2: both branches are
plain multiply-adds, which vectorize on CPUs and GPUs alike. The checks: tests/schedules/test_cpu_fast_math.py
and tests/schedules/test_hopper_gemm_epilogue.py.
"""

ERF_SPLIT, ERF_CLAMP = 0.921875, 3.9375
ERF_SMALL = (0.12837916612625122, -0.37612634897232056, 0.11283701658248901, -0.02685970440506935,
             0.005201720632612705, -0.0008149847271852195, 8.39794593048282e-05)
ERF_BIG = (-0.6280269622802734, -0.9177154898643494, -0.15022511780261993, 0.030577121302485466,
           -0.002525231335312128, -0.0007775452104397118, 0.00032441955409012735, -5.110219353809953e-05,
           3.194251576132956e-06)

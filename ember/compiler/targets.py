"""Named targets.

A name is what users type (``--target cuda-sm90``); each resolves to a TVM 0.27 target dict. ``host`` is this
machine's CPU as LLVM detects it, with its core count — a fixed ``-mcpu`` would emit instructions (AVX-512, say)
that another machine's CPU lacks and crash it with "Illegal instruction".

Every target also says where its *host code* runs (the Relax VM and the kernel launches): its own CPU for the
``llvm`` targets; generic x86-64 Linux for CUDA and ROCm GPUs; arm64 macOS for Apple's GPUs. The artifact's
manifest records that CPU architecture and OS (:func:`target_arch`, :func:`target_os`) and the CPU features its
code needs (:func:`required_cpu_flags`), so a loader refuses an artifact its machine cannot run before touching
the library.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import TargetError

# Host code of an x86 Linux GPU server: generic x86-64 keeps it loadable on any host CPU.
_X86_LINUX_HOST = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
# Host code of an Apple-silicon Mac. apple-m1 is the oldest M-series core, so M2/M3/M4 run it too.
_MACOS_ARM64_HOST = {"kind": "llvm", "mtriple": "arm64-apple-macos", "mcpu": "apple-m1"}
# A cross-compiled CPU target cannot ask the machine that will run it how many cores it has; num-cores only sizes
# the parallel split of the CPU schedules (the runtime's thread pool is sized where the code runs), and 4 is the
# common small ARM board / phone big-core count.
_CROSS_CORES = 4


@dataclass(frozen=True)
class NamedTarget:
    name: str
    summary: str
    spec: dict  # TVM target dict, without host-specific fields filled in
    device: str  # the runtime device kind: "cpu", "cuda", "rocm", "metal"
    cores: int | None = None  # num-cores of a cross-compiled CPU target; None: this machine's count


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


TARGETS: dict[str, NamedTarget] = {t.name: t for t in [
    NamedTarget("host", "this machine's CPU (LLVM-detected -mcpu, all cores)", {"kind": "llvm"}, "cpu"),
    NamedTarget("x86-avx2", "x86-64 CPUs with AVX2 + FMA (Haswell/Zen and newer)",
                {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}, "cpu"),
    NamedTarget("x86-avx512", "x86-64 CPUs with AVX-512 + VNNI (Cascade Lake and newer)",
                {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake"}, "cpu"),
    NamedTarget("arm64", "64-bit ARM Linux CPUs with NEON (any ARMv8-A: Graviton, Ampere, Raspberry Pi 4/5)",
                {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "generic", "mattr": ["+neon"]}, "cpu",
                cores=_CROSS_CORES),
    NamedTarget("arm64-dotprod", "64-bit ARM Linux CPUs with NEON + int8 dot product (ARMv8.2-A+: Graviton 2+, "
                "Cortex-A55/A76+)",
                {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "generic", "mattr": ["+neon", "+dotprod"]},
                "cpu", cores=_CROSS_CORES),
    NamedTarget("cuda-sm80", "NVIDIA A100 (Ampere)", {"kind": "cuda", "arch": "sm_80"}, "cuda"),
    NamedTarget("cuda-sm89", "NVIDIA L4/L40/RTX 40 (Ada)", {"kind": "cuda", "arch": "sm_89"}, "cuda"),
    NamedTarget("cuda-sm90", "NVIDIA H100/H200 (Hopper)", {"kind": "cuda", "arch": "sm_90a"}, "cuda"),
    # AMD: the code object is compiled for exactly this ISA (no generic targets), wave64 like every CDNA GPU.
    NamedTarget("rocm-gfx90a", "AMD Instinct MI200 series (CDNA2, gfx90a)",
                {"kind": "rocm", "mcpu": "gfx90a", "mtriple": "amdgcn-amd-amdhsa-hcc"}, "rocm"),
    NamedTarget("rocm-gfx942", "AMD Instinct MI300 series (CDNA3, gfx942)",
                {"kind": "rocm", "mcpu": "gfx942", "mtriple": "amdgcn-amd-amdhsa-hcc"}, "rocm"),
    # Apple GPUs: 1024 threads per threadgroup and 32 KiB threadgroup memory on every M-series chip; SIMD groups
    # are 32 wide (TVM's default of 16 is for older iOS GPUs and halves what cross-thread reductions use).
    NamedTarget("metal", "Apple M-series GPUs through Metal (macOS on Apple silicon; kernels as Metal source)",
                {"kind": "metal", "max_threads_per_block": 1024, "max_shared_memory_per_block": 32768,
                 "thread_warp_size": 32}, "metal"),
]}

# Where the host code of a GPU target runs.
_GPU_HOST = {"cuda": _X86_LINUX_HOST, "rocm": _X86_LINUX_HOST, "metal": _MACOS_ARM64_HOST}


def describe() -> list[str]:
    """One line per named target (what ``ember targets`` prints)."""
    width = max(len(n) for n in TARGETS)
    return [f"{t.name:{width}s}  {t.device:5s}  {t.summary}" for t in TARGETS.values()]


def resolve(target) -> tuple[str, "object"]:
    """Return (name, tvm.target.Target) for a named target, a TVM target dict or a Target."""
    import tvm

    if isinstance(target, tvm.target.Target):
        return str(target.kind.name), target
    if isinstance(target, dict):
        try:
            return str(target.get("kind")), tvm.target.Target(target)
        except Exception as e:
            raise TargetError(f"invalid TVM target {target}: {e}") from None
    if not isinstance(target, str) or target not in TARGETS:
        names = ", ".join(TARGETS)
        raise TargetError(f"unknown target {target!r}; choose one of: {names} (or pass a TVM target dict)")
    nt = TARGETS[target]
    spec = dict(nt.spec)
    if nt.name == "host":
        from tvm.target import codegen

        spec["mcpu"] = str(codegen.llvm_get_system_cpu())
    if spec["kind"] == "llvm":
        spec.setdefault("num-cores", nt.cores or _cores())
    else:
        spec["host"] = dict(_GPU_HOST.get(spec["kind"], _X86_LINUX_HOST))
    return nt.name, tvm.target.Target(spec)


def device_kind(target) -> str:
    kind = str(target.kind.name)
    return {"llvm": "cpu", "c": "cpu"}.get(kind, kind)


# LLVM feature names -> the flag Linux shows in /proc/cpuinfo ("flags" on x86, "Features" on AArch64). Only ISA
# extensions a kernel may use are listed: an artifact needing one the loading CPU lacks would die with SIGILL, so
# the loader refuses it first.
_CPUINFO_FLAG = {
    "sse4.2": "sse4_2", "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512cd": "avx512cd", "avx512dq": "avx512dq",
    "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16", "avxvnni": "avx_vnni", "amx-tile": "amx_tile", "amx-int8": "amx_int8",
}
_AARCH64_CPUINFO_FLAG = {
    "neon": "asimd", "dotprod": "asimddp", "fullfp16": "asimdhp", "i8mm": "i8mm", "sve": "sve", "sve2": "sve2",
    "bf16": "bf16",
}


def _host_side(target):
    return target if str(target.kind.name) == "llvm" else target.host


def _triple(target) -> str:
    from tvm.target import codegen

    return str(target.attrs.get("mtriple", "") or codegen.llvm_get_system_triple())


def required_cpu_flags(target) -> list[str]:
    """The /proc/cpuinfo flags a CPU needs to run code compiled for ``target`` (x86 and AArch64 Linux; else empty)."""
    from tvm.target import codegen

    target = _host_side(target)
    if target is None:
        return []
    triple = _triple(target)
    if triple.startswith("x86_64"):
        table = _CPUINFO_FLAG
    elif triple.startswith("aarch64") and "linux" in triple:
        table = _AARCH64_CPUINFO_FLAG
    else:  # macOS has no /proc/cpuinfo to check against; every Apple-silicon Mac has apple-m1's features
        return []
    feats = set(str(f) for f in codegen.llvm_get_cpu_features(target))
    return sorted(flag for feat, flag in table.items() if feat in feats)


def target_arch(target) -> str:
    """The CPU architecture the host code runs on, as platform.machine() spells it on Linux."""
    t = _host_side(target) or target
    arch = _triple(t).split("-")[0]
    return {"arm64": "aarch64"}.get(arch, arch)


def target_os(target) -> str:
    """The OS the host code is built for, as platform.system().lower() spells it: "linux" or "darwin"."""
    t = _host_side(target) or target
    triple = _triple(t)
    if any(s in triple for s in ("apple", "darwin", "macos")):
        return "darwin"
    if "windows" in triple or "msvc" in triple:
        return "windows"
    return "linux"


def gpu_arch(target, attr: str, pattern: str, kind: str, named: str, name: str | None = None) -> str:
    """The GPU architecture a target names in ``attr`` (matching ``pattern``), or a TargetError.

    ember compiles device code ahead of time, so it must know the architecture; ``named`` lists the named targets
    that carry one (for the message)."""
    arch = str(target.attrs.get(attr, "") or "")
    if not re.fullmatch(pattern, arch):
        raise TargetError(f"{kind} target {name or target} names no GPU architecture; ember compiles {kind} ahead "
                          f"of time and must know it: use a named target ({named}) or put \"{attr}\": "
                          f"\"{'sm_XX' if attr == 'arch' else 'gfxNNN'}\" in the target dict")
    return arch

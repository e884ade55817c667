"""Named targets.

A name is what users type (``--target cuda-sm90``); each resolves to a TVM 0.27 target dict. ``host`` is this
machine's CPU as LLVM detects it, with its core count — a fixed ``-mcpu`` would emit instructions (AVX-512, say)
that another machine's CPU lacks and crash it with "Illegal instruction".
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import TargetError


@dataclass(frozen=True)
class NamedTarget:
    name: str
    summary: str
    spec: dict  # TVM target dict, without host-specific fields filled in
    device: str  # the runtime device kind: "cpu", "cuda", "rocm", "metal"


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
    NamedTarget("cuda-sm80", "NVIDIA A100 (Ampere)", {"kind": "cuda", "arch": "sm_80"}, "cuda"),
    NamedTarget("cuda-sm89", "NVIDIA L4/L40/RTX 40 (Ada)", {"kind": "cuda", "arch": "sm_89"}, "cuda"),
    NamedTarget("cuda-sm90", "NVIDIA H100/H200 (Hopper)", {"kind": "cuda", "arch": "sm_90a"}, "cuda"),
]}


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
        spec.setdefault("num-cores", _cores())
    if spec["kind"] != "llvm":
        # Host code of a GPU artifact only launches kernels: generic x86-64 keeps it loadable on any host.
        spec["host"] = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
    return nt.name, tvm.target.Target(spec)


def device_kind(target) -> str:
    kind = str(target.kind.name)
    return {"llvm": "cpu", "c": "cpu"}.get(kind, kind)


# LLVM feature names -> the flag Linux shows in /proc/cpuinfo. Only ISA extensions a kernel may use are listed:
# an artifact needing one the loading CPU lacks would die with SIGILL, so the loader refuses it first.
_CPUINFO_FLAG = {
    "sse4.2": "sse4_2", "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512cd": "avx512cd", "avx512dq": "avx512dq",
    "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16", "avxvnni": "avx_vnni", "amx-tile": "amx_tile", "amx-int8": "amx_int8",
}


def required_cpu_flags(target) -> list[str]:
    """The /proc/cpuinfo flags a CPU needs to run code compiled for ``target`` (x86 only; else empty)."""
    from tvm.target import codegen

    if str(target.kind.name) != "llvm":
        target = target.host
        if target is None:
            return []
    triple = str(target.attrs.get("mtriple", "") or codegen.llvm_get_system_triple())
    if not triple.startswith("x86_64"):
        return []
    feats = set(str(f) for f in codegen.llvm_get_cpu_features(target))
    return sorted(flag for feat, flag in _CPUINFO_FLAG.items() if feat in feats)


def target_arch(target) -> str:
    """The CPU architecture the host code runs on, as platform.machine() spells it."""
    from tvm.target import codegen

    t = target if str(target.kind.name) == "llvm" else (target.host or target)
    triple = str(t.attrs.get("mtriple", "") or codegen.llvm_get_system_triple())
    arch = triple.split("-")[0]
    return {"arm64": "aarch64"}.get(arch, arch)

"""Apple Metal artifacts, built on Linux.

What an ember Metal artifact is: ``model.so`` is an arm64 macOS dylib (linked here by :mod:`ember.compiler.cross`)
whose embedded TVM module blob holds, for every kernel, its Metal Shading Language (MSL) source, after dlight's
GPU schedules gave each kernel its threadgroup layout. The Metal driver on the Mac compiles that source when TVM's
Metal runtime loads the library (``newLibraryWithSource``): no Metal compiler exists on Linux, so there is no
precompiled ``.metallib``, and **nothing Metal runs or is compiled by Apple's tools here**. What is checked here is
structural: every kernel the module launches has its ``kernel void NAME(...)`` source, and none declares
``device``-address-space storage inside a kernel body (invalid MSL that TVM prints for a kernel-internal global
buffer; :mod:`ember.compiler.kernel_scratch` prevents it).

Compile time: dlight's Matmul rule for Metal imports ``tvm.s_tir.tensor_intrin.metal``, and importing any
submodule first runs the package ``__init__``, which registers the tensor intrinsics of every backend (CUDA's
alone take ~30 s of CPU). :func:`metal_build_environment` imports the Metal intrinsics without the others
(see :func:`preload_metal_intrinsics`), so a Metal compile starts in seconds.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import struct
import sys
import threading
import types
from dataclasses import dataclass

from ..errors import ArtifactError

_lock = threading.Lock()
_PKG = "tvm.s_tir.tensor_intrin"


def preload_metal_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin.metal`` without running the package ``__init__`` (all backends).

    A bare package object stands in for ``tvm.s_tir.tensor_intrin`` while the submodule imports and is removed
    right after, so a later ``import tvm.s_tir.tensor_intrin`` still runs the real ``__init__`` and registers
    everything (the Metal intrinsics, already registered, are not registered twice: the submodule stays in
    ``sys.modules``).
    """
    if f"{_PKG}.metal" in sys.modules:
        return
    import tvm

    with _lock:
        if f"{_PKG}.metal" in sys.modules:
            return
        if _PKG in sys.modules:  # the whole package is already imported: nothing to save
            importlib.import_module(f"{_PKG}.metal")
            return
        stand_in = types.ModuleType(_PKG)
        stand_in.__path__ = [os.path.join(os.path.dirname(tvm.__file__), "s_tir", "tensor_intrin")]
        sys.modules[_PKG] = stand_in
        try:
            importlib.import_module(f"{_PKG}.metal")
        finally:
            if sys.modules.get(_PKG) is stand_in:
                del sys.modules[_PKG]


@dataclass(frozen=True)
class MetalBuild:
    active: bool
    arch: str | None = None

    def manifest_entry(self) -> dict:
        return {"device_code": None, "arch": self.arch}


@contextlib.contextmanager
def metal_build_environment(target, name: str | None = None):
    """Around ``tvm.compile`` for a Metal target: the fast intrinsics import (no-op for other targets)."""
    if target is None or str(target.kind.name) != "metal":
        yield MetalBuild(active=False)
        return
    preload_metal_intrinsics()
    yield MetalBuild(active=True, arch="apple-m1")


# ---------------------------------------------------------------------------------------------------------------
# Reading the library: a Mach-O 64 dylib (or an ELF, for a Metal module exported on Linux for tests)
# ---------------------------------------------------------------------------------------------------------------
MH_MAGIC_64 = 0xFEEDFACF
CPU_TYPE_ARM64 = 0x0100000C
_LC_SEGMENT_64, _LC_SYMTAB = 0x19, 0x2
_BLOB_SYMBOL = "__tvm_ffi__library_bin"


def macho_info(data: bytes) -> dict:
    """cputype, filetype and the file offset of TVM's module blob in a Mach-O 64 file."""
    magic, cputype, _sub, filetype, ncmds, _size, _flags, _res = struct.unpack_from("<IiiIIIII", data, 0)
    if magic != MH_MAGIC_64:
        raise ValueError("not a 64-bit Mach-O file")
    p, sections, symtab = 32, [], None
    for _ in range(ncmds):
        cmd, cmdsize = struct.unpack_from("<II", data, p)
        if cmd == _LC_SEGMENT_64:
            nsects, = struct.unpack_from("<I", data, p + 64)
            for i in range(nsects):
                s = p + 72 + 80 * i
                addr, size, offset = struct.unpack_from("<QQI", data, s + 32)
                sections.append((addr, size, offset))
        elif cmd == _LC_SYMTAB:
            symtab = struct.unpack_from("<IIII", data, p + 8)
        p += cmdsize
    blob = None
    if symtab is not None:
        symoff, nsyms, stroff, _strsize = symtab
        for i in range(nsyms):
            strx, _type, sect, _desc, value = struct.unpack_from("<IBBHQ", data, symoff + 16 * i)
            start = stroff + strx
            name = data[start:data.index(b"\0", start)].decode("ascii", "replace")
            if name.lstrip("_") == _BLOB_SYMBOL.lstrip("_") and sect:
                addr, _size, offset = sections[sect - 1]
                blob = offset + value - addr
                break
    return {"cputype": cputype, "filetype": filetype, "blob_offset": blob}


def _library_modules(lib_path):
    with open(os.fspath(lib_path), "rb") as f:
        data = f.read()
    if data[:4] == b"\x7fELF":
        from .cuda_aot import _elf_sections, _tvm_modules

        return {"format": "elf"}, _tvm_modules(data, _elf_sections(data))
    info = macho_info(data)
    if info["blob_offset"] is None:
        raise ValueError(f"no {_BLOB_SYMBOL} symbol: not a library exported by TVM")
    from .cuda_aot import tvm_blob_modules

    return {"format": "macho", **info}, tvm_blob_modules(data, info["blob_offset"])


def _read_str(buf: bytes, p: int):
    n, = struct.unpack_from("<Q", buf, p)
    if n > len(buf) - p - 8:
        raise ValueError("string past the end")
    return buf[p + 8:p + 8 + n].decode("utf-8", "replace"), p + 8 + n


def _parse_metal_payload(payload: bytes) -> tuple[str, list[str], dict[str, str]]:
    """(format, launched kernel names, {kernel name: source}) of one serialized TVM Metal module."""
    fmt, p = _read_str(payload, 0)
    count, = struct.unpack_from("<Q", payload, p)
    p += 8
    names = []
    for _ in range(count):  # function table: name -> (name, arg types, launch tags, extra tags)
        key, p = _read_str(payload, p)
        _name, p = _read_str(payload, p)
        n, = struct.unpack_from("<Q", payload, p)
        p += 8 + 4 * n
        n, = struct.unpack_from("<Q", payload, p)
        p += 8
        for _ in range(n):
            _tag, p = _read_str(payload, p)
        n, = struct.unpack_from("<Q", payload, p)
        p += 8 + 4 * n
        names.append(key)
    count, = struct.unpack_from("<Q", payload, p)  # sources: kernel name -> MSL
    p += 8
    sources = {}
    for _ in range(count):
        key, p = _read_str(payload, p)
        src, p = _read_str(payload, p)
        sources[key] = src
    return fmt, names, sources


@dataclass(frozen=True)
class MetalCode:
    library_format: str            # "macho" (the real artifact) or "elf"
    cputype: int | None
    source_format: str | None      # "metal" (MSL source) or "metallib"
    functions: tuple[str, ...]     # kernels the module launches
    sources: dict                  # kernel name -> MSL source


_KERNEL_DECL = re.compile(r"kernel\s+void\s+(\w+)\s*\(")
# Storage in the device address space declared inside a function body (indented): not valid Metal.
_DEVICE_LOCAL = re.compile(r"^[ \t]+device\s+[\w:]+\s+\w+\s*\[", re.M)


def inspect_metal(lib_path) -> MetalCode:
    """What Metal code an exported ``model.so`` holds. Pure Python; needs no TVM or Mac."""
    try:
        info, mods = _library_modules(lib_path)
    except (ValueError, struct.error, IndexError) as e:
        raise ArtifactError(f"{lib_path}: cannot read the modules TVM embedded ({e}); is this a model.so "
                            "exported by ember?") from None
    fmt, names, sources = None, [], {}
    for kind, payload in mods:
        if kind != "metal":
            continue
        try:
            fmt, n, s = _parse_metal_payload(payload)
        except (ValueError, struct.error) as e:
            raise ArtifactError(f"{lib_path}: unreadable Metal module ({e})") from None
        names += n
        sources.update(s)
    return MetalCode(library_format=info["format"], cputype=info.get("cputype"), source_format=fmt,
                     functions=tuple(sorted(names)), sources=sources)


def msl_problems(mc: MetalCode) -> list[str]:
    """What is wrong with the kernels' MSL as far as can be told without a Metal compiler (empty: nothing)."""
    problems = []
    declared = {}
    for key, src in mc.sources.items():
        for name in _KERNEL_DECL.findall(src):
            declared[name] = key
        if _DEVICE_LOCAL.search(src):
            problems.append(f"{key}: declares device-address-space storage inside a kernel (invalid MSL)")
    missing = [f for f in mc.functions if f not in declared]
    if missing:
        problems.append(f"no MSL source for kernel(s) {missing}")
    return problems


def check_device_code(lib_path, arch: str | None = None, target_name: str | None = None) -> dict:
    """Raise ArtifactError unless ``lib_path`` is an arm64 macOS library holding MSL for every kernel."""
    mc = inspect_metal(lib_path)
    label = target_name or "metal"
    if mc.library_format == "macho" and mc.cputype != CPU_TYPE_ARM64:
        raise ArtifactError(f"{lib_path}: a Mach-O library for CPU type {mc.cputype:#x}, not arm64 (target {label})")
    if mc.source_format is None:
        return {"device_code": None, "arch": arch}
    problems = msl_problems(mc)
    if problems:
        raise ArtifactError(f"{lib_path}: the Metal kernels of target {label} would not compile on the Mac: "
                            + "; ".join(problems))
    return {"device_code": "msl" if mc.source_format == "metal" else mc.source_format, "arch": arch,
            "kernels": len(mc.functions)}

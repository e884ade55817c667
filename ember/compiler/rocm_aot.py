"""ROCm (AMD GPUs) compiled ahead of time, on a machine without an AMD GPU or a ROCm install.

TVM's ``rocm`` codegen (LLVM 22 inside the apache-tvm wheel) turns each kernel into an AMDGPU relocatable ELF,
links in the ROCm device libraries (bitcode) it asks ``tvm_callback_rocm_bitcode_path`` for, and hands the object
to ``tvm_callback_rocm_link``, which runs ``ld.lld -shared`` to make the HSA code object (``.hsaco``) the ROCm
runtime loads. Two things stop that on a stock Linux machine, and this module fixes both:

1. **"ld.lld: error: unknown abi version"**. LLVM 22 emits AMDGPU *code object version 6* by default
   (``EI_ABIVERSION`` 4 in the ELF header). lld only accepts versions it knows: lld 14 (Debian's ``lld``) stops
   at v4, lld 15-19 at v5. ROCm's own LLVM is not on PyPI and the wheel carries no lld. Code object v5 is what
   ROCm 5.x/6.x compilers emit and what every ROCm runtime since 5.0 loads, and it matches the device-library
   ABI TVM links (``oclc_abi_version_500``), so ember asks for v5: LLVM reads the version from the module flag
   ``amdhsa_code_object_version`` (500), and a module flag in any linked module is merged into the kernel
   module. ember passes a three-line LLVM IR file holding that flag as one more "device library". The
   ``rocm`` target kind takes no ``cl-opt``, so the ``-amdhsa-code-object-version`` option cannot be used.
   Linking v5 needs lld >= 15 (Debian: ``lld-16``); with only an older lld ember emits v4 (with the matching
   ``oclc_abi_version_400`` library) and records that in the manifest. ``EMBER_ROCM_CODE_OBJECT=4|5`` forces one.
2. **Device libraries**: TVM looks for them under ``$ROCM_PATH`` or ``/opt/rocm``. Debian's ``rocm-device-libs``
   puts them in ``/usr/lib/x86_64-linux-gnu/amdgcn/bitcode``; ember searches the known places. TVM's list also
   links the ISA-version constants of several unrelated GPUs (803, 900, 906, 1030); ember links the one for the
   target's arch where the package has it (gfx90a does; Debian's 5.2 libraries predate gfx942, whose kernels
   ember compiles do not call library code that reads it).

:func:`inspect_code_objects` reads an exported ``model.so`` (pure Python) and lists each AMDGPU code object:
ELF machine, code object version, the gfx arch from ``e_flags`` and from the metadata note, and the kernels
(``<name>.kd`` kernel descriptors). The export step refuses a library without code for the target's arch.

Nothing here imports TVM at module level.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import re
import shutil
import struct
import subprocess
import tempfile
import threading
from dataclasses import dataclass

from ..errors import ArtifactError, TargetError
from .cuda_aot import _elf_sections, _elf_symbols, library_modules
from .targets import gpu_arch

EM_AMDGPU = 224
# EI_ABIVERSION of an AMDHSA object -> code object version.
_ABI_TO_COV = {1: 3, 2: 4, 3: 5, 4: 6}
# e_flags & 0xff (EF_AMDGPU_MACH) -> gfx name, for the archs ember names and their neighbours.
_MACH = {0x2c: "gfx900", 0x2f: "gfx906", 0x30: "gfx908", 0x3f: "gfx90a", 0x40: "gfx940", 0x4b: "gfx941",
         0x4c: "gfx942", 0x4f: "gfx950", 0x36: "gfx1030", 0x41: "gfx1100", 0x44: "gfx1101", 0x45: "gfx1102"}
SUPPORTED_COV = (4, 5)
BITCODE_DIRS = ("/usr/lib/x86_64-linux-gnu/amdgcn/bitcode", "/opt/rocm/amdgcn/bitcode", "/opt/rocm/lib")

_lock = threading.RLock()


# ---------------------------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------------------------
def find_bitcode_dir() -> str | None:
    """The folder of the ROCm device libraries (ocml.bc, ockl.bc, oclc_*.bc); None if there is none."""
    cands = []
    if os.environ.get("ROCM_PATH"):
        cands += [os.path.join(os.environ["ROCM_PATH"], "amdgcn", "bitcode")]
    cands += list(BITCODE_DIRS) + sorted(glob.glob("/usr/lib/llvm-*/lib/clang/*/lib/amdgcn/bitcode"), reverse=True)
    for d in cands:
        if os.path.isfile(os.path.join(d, "ocml.bc")) and os.path.isfile(os.path.join(d, "ockl.bc")):
            return d
    return None


@functools.lru_cache(maxsize=16)
def _lld_major(path: str) -> int | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"LLD (\d+)\.", out)
    return int(m.group(1)) if m else None


def find_lld() -> list[tuple[str, int]]:
    """Every ld.lld found, newest first, as (path, major version)."""
    names = [f"ld.lld-{v}" for v in range(30, 13, -1)] + ["ld.lld"]
    paths = [shutil.which(n) for n in names]
    paths += sorted(glob.glob("/usr/lib/llvm-*/bin/ld.lld")) + ["/opt/rocm/llvm/bin/ld.lld"]
    seen, found = set(), []
    for p in paths:
        if not p or not os.access(p, os.X_OK) or os.path.realpath(p) in seen:
            continue
        seen.add(os.path.realpath(p))
        major = _lld_major(p)
        if major is not None:
            found.append((p, major))
    return sorted(found, key=lambda pm: -pm[1])


def max_code_object_version(lld_major: int) -> int:
    """The newest AMDGPU code object version this lld links (v5 from lld 15; ember never asks for v6)."""
    return 5 if lld_major >= 15 else 4


@dataclass(frozen=True)
class RocmBuild:
    """What :func:`rocm_build_environment` set up (``active`` is False for non-ROCm targets)."""
    active: bool
    arch: str | None = None
    code_object_version: int | None = None
    lld: str | None = None
    bitcode_dir: str | None = None

    def manifest_entry(self) -> dict:
        return {"device_code": None, "arch": self.arch, "code_object_version": self.code_object_version}


def is_rocm_target(target) -> bool:
    return target is not None and str(target.kind.name) == "rocm"


def rocm_arch(target, name: str | None = None) -> str:
    return gpu_arch(target, "mcpu", r"gfx[0-9a-f]+", "ROCm", "rocm-gfx90a, rocm-gfx942", name)


def plan(target, name: str | None = None) -> RocmBuild:
    """Choose the linker, code object version and device libraries, or raise TargetError saying what to install."""
    label = name or "ROCm"
    arch = rocm_arch(target, label)
    bitcode = find_bitcode_dir()
    if bitcode is None:
        raise TargetError(f"compiling for {label} needs the ROCm device libraries (ocml.bc, ockl.bc): install "
                          "Debian's rocm-device-libs (apt-get install rocm-device-libs) or set ROCM_PATH to a "
                          "ROCm install")
    llds = find_lld()
    if not llds:
        raise TargetError(f"compiling for {label} needs the LLVM linker ld.lld to make the GPU code object: "
                          "install Debian's lld-16 (apt-get install lld-16), or any lld >= 15")
    forced = os.environ.get("EMBER_ROCM_CODE_OBJECT")
    if forced:
        if forced not in ("4", "5"):
            raise TargetError(f"EMBER_ROCM_CODE_OBJECT={forced!r}: use 4 or 5 (AMDGPU code object version)")
        cov = int(forced)
        usable = [(p, m) for p, m in llds if max_code_object_version(m) >= cov]
        if not usable:
            raise TargetError(f"EMBER_ROCM_CODE_OBJECT={cov} needs lld >= 15; found only "
                              f"{', '.join(f'{p} ({m})' for p, m in llds)}: install lld-16")
        lld, _ = usable[0]
    else:
        lld, major = llds[0]
        cov = max_code_object_version(major)
    return RocmBuild(active=True, arch=arch, code_object_version=cov, lld=lld, bitcode_dir=bitcode)


def bitcode_files(build: RocmBuild) -> list[str]:
    """The device libraries to link, in TVM's order, with the ISA and ABI versions of this build."""
    d = build.bitcode_dir
    names = ["oclc_daz_opt_on", "ocml", "oclc_correctly_rounded_sqrt_off", "oclc_correctly_rounded_sqrt_on",
             "oclc_daz_opt_off", "oclc_finite_only_off", "oclc_finite_only_on", "oclc_unsafe_math_off",
             "oclc_unsafe_math_on", "oclc_wavefrontsize64_on", f"oclc_abi_version_{build.code_object_version}00",
             f"oclc_isa_version_{build.arch[3:]}"]
    files = []
    for n in names:
        p = os.path.join(d, n + ".bc")
        if os.path.isfile(p):
            files.append(p)
        elif not n.startswith("oclc_isa_version_"):
            raise TargetError(f"the ROCm device library {p} is missing; reinstall rocm-device-libs")
    return files


def _flag_module(cov: int, where: str) -> str:
    """An LLVM IR file whose only content is the code-object-version module flag (see the module doc)."""
    path = os.path.join(where, f"ember_code_object_v{cov}.ll")
    with open(path, "w") as f:
        f.write(f'!llvm.module.flags = !{{!0}}\n!0 = !{{i32 1, !"amdhsa_code_object_version", i32 {cov}00}}\n')
    return path


def _link(lld: str, obj: bytes) -> bytes:
    with tempfile.TemporaryDirectory(prefix="ember-rocm-link-") as tmp:
        src, out = os.path.join(tmp, "kernels.o"), os.path.join(tmp, "kernels.hsaco")
        with open(src, "wb") as f:
            f.write(obj)
        # --no-undefined: an unresolved device-library call would only show up as an opaque load failure on the GPU.
        res = subprocess.run([lld, "--no-undefined", "-shared", src, "-o", out], capture_output=True, text=True,
                             timeout=600)
        if res.returncode != 0:
            raise TargetError(f"linking the AMDGPU code object with {lld} failed: {res.stderr.strip()[-800:]}")
        with open(out, "rb") as f:
            return f.read()


@contextlib.contextmanager
def rocm_build_environment(target, name: str | None = None):
    """Around ``tvm.compile`` for ``target``: ROCm code objects linkable here (see module doc); no-op otherwise.

    Raises :class:`ember.errors.TargetError` before any work when lld or the device libraries are missing. TVM's
    two ROCm callbacks are replaced for the duration of the block and restored after it; builds in several
    threads are serialised, since the callbacks are process-wide.
    """
    if not is_rocm_target(target):
        yield RocmBuild(active=False)
        return
    build = plan(target, name)
    import tvm  # noqa: F401  (registers TVM's own callbacks first, so that ours replace them)
    import tvm_ffi
    from tvm.support import rocm as tvm_rocm

    with _lock, tempfile.TemporaryDirectory(prefix="ember-rocm-") as tmp:
        libs = bitcode_files(build) + [_flag_module(build.code_object_version, tmp)]

        def bitcode_path(_rocdl_dir=None):
            return tvm.runtime.convert(libs)

        def link(obj_bin):
            return bytearray(_link(build.lld, bytes(obj_bin)))

        tvm_ffi.register_global_func("tvm_callback_rocm_bitcode_path", bitcode_path, override=True)
        tvm_ffi.register_global_func("tvm_callback_rocm_link", link, override=True)
        try:
            with target:
                yield build
        finally:
            tvm_ffi.register_global_func("tvm_callback_rocm_bitcode_path", tvm_rocm.callback_rocm_bitcode_path,
                                         override=True)
            tvm_ffi.register_global_func("tvm_callback_rocm_link", tvm_rocm.callback_rocm_link, override=True)


# ---------------------------------------------------------------------------------------------------------------
# Inspecting an exported library
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CodeObject:
    """One AMDGPU code object (HSA ELF) found in a library."""
    machine: int                 # ELF e_machine: 224 (EM_AMDGPU)
    code_object_version: int | None
    arch_from_flags: str | None  # from e_flags' EF_AMDGPU_MACH
    target_id: str | None        # amdhsa.target of the metadata note, e.g. "amdgcn-amd-amdhsa-hcc-gfx942"
    kernels: tuple[str, ...]     # kernel symbols (those with a "<name>.kd" kernel descriptor)
    functions: tuple[str, ...]   # the function names TVM's module lists for launching (its fmap)
    size: int

    @property
    def arch(self) -> str | None:
        if self.target_id:
            m = re.search(r"-(gfx[0-9a-f]+)", self.target_id)
            if m:
                return m.group(1)
        return self.arch_from_flags


def _read_str(buf: bytes, p: int) -> tuple[str, int]:
    n, = struct.unpack_from("<Q", buf, p)
    if n > len(buf) - p - 8:
        raise ValueError("string past the end")
    return buf[p + 8:p + 8 + n].decode("utf-8", "replace"), p + 8 + n


def _parse_hip_payload(payload: bytes) -> tuple[str, list[str], bytes]:
    """(format, kernel names in the function table, code object bytes) of one serialized TVM ROCm module."""
    fmt, p = _read_str(payload, 0)
    count, = struct.unpack_from("<Q", payload, p)
    p += 8
    names = []
    for _ in range(count):
        key, p = _read_str(payload, p)
        _name, p = _read_str(payload, p)
        n, = struct.unpack_from("<Q", payload, p)  # arg types: DLDataType, 4 bytes each
        p += 8 + 4 * n
        n, = struct.unpack_from("<Q", payload, p)  # launch parameter tags
        p += 8
        for _ in range(n):
            _tag, p = _read_str(payload, p)
        n, = struct.unpack_from("<Q", payload, p)  # extra arg tags (int32 each)
        p += 8 + 4 * n
        names.append(key)
    n, = struct.unpack_from("<Q", payload, p)
    data = payload[p + 8:p + 8 + n]
    return fmt, names, data


def _note_target_id(data: bytes, sections) -> str | None:
    for sec in sections:
        if sec.type == 7:  # SHT_NOTE: the msgpack metadata holds "amdhsa.target" then the target id string
            # "amdgcn-amd-amdhsa-hcc-gfx942" (TVM's triple has the hcc environment; clang's has none: "--gfx942")
            m = re.search(rb"amdgcn-amd-amdhsa-[a-z]*-gfx[0-9a-f]+(?::[a-z]+[+-])*",
                          data[sec.offset:sec.offset + sec.size])
            if m:
                return m.group(0).decode()
    return None


def read_code_object(elf: bytes, functions=()) -> CodeObject:
    if elf[:4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    machine, = struct.unpack_from("<H", elf, 18)
    flags, = struct.unpack_from("<I", elf, 48)
    sections = _elf_sections(elf)
    syms = {n for n, _v, _s, shndx in _elf_symbols(elf, sections) if n and shndx != 0}
    kernels = tuple(sorted(n[:-3] for n in syms if n.endswith(".kd") and n[:-3] in syms))
    return CodeObject(machine=machine, code_object_version=_ABI_TO_COV.get(elf[8]),
                      arch_from_flags=_MACH.get(flags & 0xFF), target_id=_note_target_id(elf, sections),
                      kernels=kernels, functions=tuple(sorted(functions)), size=len(elf))


def inspect_code_objects(lib_path) -> list[CodeObject]:
    """Every AMDGPU code object in an exported ``model.so``. Pure Python; needs no TVM, GPU or ROCm."""
    mods = library_modules(lib_path)
    out = []
    for kind, payload in mods:
        if kind not in ("hip", "rocm"):
            continue
        try:
            fmt, names, blob = _parse_hip_payload(payload)
        except (ValueError, struct.error) as e:
            raise ArtifactError(f"{lib_path}: unreadable ROCm module ({e})") from None
        if fmt not in ("hsaco", "co") or blob[:4] != b"\x7fELF":
            raise ArtifactError(f"{lib_path}: the ROCm module holds {fmt!r}, not a code object (hsaco)")
        out.append(read_code_object(blob, names))
    return out


def check_device_code(lib_path, arch: str, target_name: str | None = None) -> dict:
    """Raise ArtifactError unless ``lib_path`` holds AMDGPU code objects for ``arch``; return the manifest entry."""
    objs = inspect_code_objects(lib_path)
    label = target_name or arch
    if not objs:
        return {"device_code": None, "arch": arch}
    for co in objs:
        if co.machine != EM_AMDGPU or co.arch != arch or co.arch_from_flags != arch:
            raise ArtifactError(f"{lib_path}: holds a code object for machine {co.machine} / {co.arch}, not "
                                f"AMDGPU {arch} (target {label})")
        if set(co.kernels) != set(co.functions):
            raise ArtifactError(f"{lib_path}: the code object's kernels {sorted(co.kernels)} differ from those "
                                f"the module launches {sorted(co.functions)}")
    return {"device_code": "hsaco", "arch": arch, "code_object_version": objs[0].code_object_version,
            "kernels": sum(len(co.kernels) for co in objs)}

"""CUDA compiled ahead of time, on a machine without a GPU or an NVIDIA driver.

What goes wrong without this module: TVM's CUDA runtime lives in a sidecar library,
``tvm/lib/libtvm_runtime_cuda.so``, which links against the driver (``libcuda.so.1``). ``import tvm`` tries to load
it and silently gives up where there is no driver; ``tvm.compile`` for a CUDA target then finds no
``ffi.Module.create.cuda`` and wraps the kernels in a *CUDAFallbackModule*, which keeps CUDA C source. An artifact
built that way needs TVM's compiler plus NVRTC when it is loaded, so TVM's runtime alone cannot run it.

What this module does (see :func:`cuda_build_environment`):

1. If a real driver is present, nothing is stubbed. Otherwise a stand-in ``libcuda.so.1`` is built once with the
   system C compiler into ``~/.cache/ember/cuda-stub/`` (``$XDG_CACHE_HOME``, or ``$EMBER_CACHE_DIR``, move it):
   every driver entry point the sidecar imports, each returning 999 (CUDA_ERROR_UNKNOWN); soname
   ``libcuda.so.1``. It is never called while compiling: it only satisfies the dynamic linker.
2. The stub (RTLD_GLOBAL) and then the sidecar are loaded with ctypes, *in this process, after* ``import tvm``.
   This works: the sidecar's static initialisers register ``ffi.Module.create.cuda`` (and the loader, the device
   API) in TVM-FFI's global registry, and the CUDA codegen looks that function up when it runs, not at import.
   No subprocess is needed. Both stay loaded for the life of the process (a shared object cannot be unloaded
   safely); ``tvm.cuda(0).exist`` stays False with the stub, as without it. One visible consequence: once the
   sidecar is loaded, a CUDA ``tvm.compile`` *outside* this environment in the same process no longer falls back
   to CUDA source silently; it uses TVM's default NVRTC mode and fails if ``cuda-bindings`` is missing — so
   compile CUDA inside :func:`cuda_build_environment` (ember.compile does).
3. Inside the ``with`` block ``TVM_CUDA_COMPILE_MODE=nvcc`` (unless the caller chose a mode), nvcc's folder is on
   ``PATH`` and the target is current, so TVM's ``tvm_callback_cuda_compile`` runs
   ``nvcc --fatbin -gencode arch=compute_90a,code=sm_90a`` and the CUDA module holds a fatbin with SASS for
   exactly the target's arch (no PTX: an sm_80 artifact does not JIT onto an H100).

:func:`inspect_device_code` reads an exported ``model.so`` (pure Python: ELF symbol table, TVM's module blob,
the fatbin / cubin headers) and says what device code it holds, so the export step can check the result and the
manifest can record ``{"device_code": "fatbin", "arch": "sm_90a"}``.

Nothing here imports TVM at module level.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import struct
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field

from ..errors import ArtifactError, TargetError
from .targets import gpu_arch

SIDECAR = "libtvm_runtime_cuda.so"
DRIVER_SONAME = "libcuda.so.1"

# The driver functions libtvm_runtime_cuda.so of apache-tvm 0.27 imports (PLATFORM.md). The list actually used is
# read from the sidecar's dynamic symbol table, so a newer TVM that imports more gets them too; this is the floor.
_KNOWN_DRIVER_SYMBOLS = (
    "cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString", "cuLaunchKernelEx",
    "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload", "cuTensorMapEncodeTiled",
)

_lock = threading.RLock()
_codegen_state: str | None = None  # "driver" or "stub" once the CUDA codegen is usable in this process


# ---------------------------------------------------------------------------------------------------------------
# Small ELF64 reader (little-endian), enough for symbol lookups in the sidecar and in model.so.
# ---------------------------------------------------------------------------------------------------------------
_EM_CUDA = 190
_SHT_SYMTAB, _SHT_DYNSYM = 2, 11


@dataclass(frozen=True)
class _Section:
    name: str
    type: int
    addr: int
    offset: int
    size: int
    link: int
    entsize: int


def _elf_sections(data: bytes) -> list[_Section]:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = raw[shstrndx][4] if shstrndx < shnum else 0

    def name(off):
        end = data.index(b"\0", strtab + off)
        return data[strtab + off:end].decode("ascii", "replace")

    return [_Section(name(r[0]), r[1], r[3], r[4], r[5], r[6], r[9]) for r in raw]


def _elf_symbols(data: bytes, sections=None, *, dynamic_only=False):
    """Yield (name, value, size, section_index) of every symbol in .symtab / .dynsym."""
    sections = sections if sections is not None else _elf_sections(data)
    wanted = (_SHT_DYNSYM,) if dynamic_only else (_SHT_SYMTAB, _SHT_DYNSYM)
    for sec in sections:
        if sec.type not in wanted or not sec.entsize:
            continue
        strs = sections[sec.link]
        for i in range(1, sec.size // sec.entsize):
            entry = sec.offset + i * sec.entsize
            st_name, _info, _other, shndx, value, size = struct.unpack_from("<IBBHQQ", data, entry)
            start = strs.offset + st_name
            yield data[start:data.index(b"\0", start)].decode("ascii", "replace"), value, size, shndx


def _undefined_dynamic_symbols(path: str) -> list[str]:
    with open(path, "rb") as f:
        data = f.read()
    return sorted({n for n, _v, _s, shndx in _elf_symbols(data, dynamic_only=True) if shndx == 0 and n})


# ---------------------------------------------------------------------------------------------------------------
# Tools: nvcc, a C compiler
# ---------------------------------------------------------------------------------------------------------------
def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME / $CUDA_PATH, PATH, or /usr/local/cuda; None if there is none."""
    for env in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(env)
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.access(default, os.X_OK) else None


@functools.lru_cache(maxsize=8)
def nvcc_gpu_codes(nvcc: str) -> frozenset[str]:
    """The real archs this nvcc can emit SASS for (``nvcc --list-gpu-code``), e.g. {"sm_80", "sm_90", ...}."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(re.findall(r"sm_\d+[a-z]?", out.stdout)) if out.returncode == 0 else frozenset()


def find_c_compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand:
            path = shutil.which(cand.split()[0])
            if path:
                return path
    return None


# ---------------------------------------------------------------------------------------------------------------
# The stub driver and the sidecar
# ---------------------------------------------------------------------------------------------------------------
def _sidecar_path() -> str:
    import tvm

    return os.path.join(os.path.dirname(os.path.abspath(tvm.__file__)), "lib", SIDECAR)


def stub_driver_symbols(sidecar: str | None = None) -> list[str]:
    """Driver functions the stub must define: what the sidecar imports from libcuda (``cuXxx``), plus the floor."""
    names = set(_KNOWN_DRIVER_SYMBOLS)
    try:
        names |= {n for n in _undefined_dynamic_symbols(sidecar or _sidecar_path()) if re.match(r"cu[A-Z]\w*$", n)}
    except (OSError, ValueError, struct.error, IndexError):
        pass  # an unreadable sidecar is reported when it is loaded
    return sorted(names)


def _cache_dir() -> str:
    root = os.environ.get("EMBER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ember")
    return os.path.join(root, "cuda-stub")


def build_stub_driver(cache_dir: str | None = None, symbols=None) -> str:
    """Build (once; cached by content) a ``libcuda.so.1`` whose functions all return 999; return its path."""
    symbols = sorted(symbols if symbols is not None else stub_driver_symbols())
    source = ("/* ember: stand-in for the NVIDIA driver, so that TVM's CUDA runtime library loads on a machine\n"
              "   without one while compiling ahead of time. Every function fails with 999 (CUDA_ERROR_UNKNOWN). */\n"
              + "".join(f"int {s}(void) {{ return 999; }}\n" for s in symbols))
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    for base in (cache_dir or _cache_dir(), os.path.join(tempfile.gettempdir(), f"ember-{os.getuid()}", "cuda-stub")):
        out_dir = os.path.join(base, key)
        lib = os.path.join(out_dir, DRIVER_SONAME)
        if os.path.isfile(lib):
            return lib
        cc = find_c_compiler()
        if cc is None:
            raise TargetError("compiling for CUDA on a machine without the NVIDIA driver needs a C compiler (to "
                              "build a stand-in libcuda.so.1): install gcc or clang, or set CC")
        try:
            os.makedirs(out_dir, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".build-", dir=out_dir)
        except OSError:
            continue  # read-only cache: fall back to the temp dir
        try:
            src = os.path.join(tmp, "libcuda_stub.c")
            with open(src, "w") as f:
                f.write(source)
            res = subprocess.run([cc, "-shared", "-fPIC", "-O1", f"-Wl,-soname,{DRIVER_SONAME}", "-o",
                                  os.path.join(tmp, DRIVER_SONAME), src], capture_output=True, text=True, timeout=120)
            if res.returncode != 0:
                raise TargetError(f"building the stand-in libcuda.so.1 with {cc} failed: {res.stderr.strip()[-800:]}")
            os.replace(os.path.join(tmp, DRIVER_SONAME), lib)  # atomic: concurrent builders all end up with one
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return lib
    raise TargetError(f"no writable cache directory for the stand-in libcuda.so.1 (tried {_cache_dir()} and the "
                      "temp dir); set EMBER_CACHE_DIR")


def _real_driver_present() -> bool:
    """True where the NVIDIA driver is installed. The stub is told apart by cuInit, which it never defines."""
    try:
        lib = ctypes.CDLL(DRIVER_SONAME)
    except OSError:
        return False
    return hasattr(lib, "cuInit")


def _cuda_module_registered() -> bool:
    import tvm_ffi

    return tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None


def _preload_cudart(nvcc: str | None):
    """The sidecar needs libcudart.so.N; where the loader cannot find it, take the CUDA toolkit's."""
    roots = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    roots += [os.environ[e] for e in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(e)]
    needed = [n for n in _needed_libraries(_sidecar_path()) if n.startswith("libcudart.so")]
    for root in roots:
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            for name in needed:
                cand = os.path.join(root, sub, name)
                if os.path.isfile(cand):
                    ctypes.CDLL(cand, mode=ctypes.RTLD_GLOBAL)
                    return cand
    return None


def _needed_libraries(path: str) -> list[str]:
    """DT_NEEDED entries of a shared object."""
    with open(path, "rb") as f:
        data = f.read()
    secs = _elf_sections(data)
    dyn = next((s for s in secs if s.name == ".dynamic"), None)
    dynstr = next((s for s in secs if s.name == ".dynstr"), None)
    if dyn is None or dynstr is None:
        return []
    out = []
    for i in range(dyn.size // 16):
        tag, val = struct.unpack_from("<qQ", data, dyn.offset + 16 * i)
        if tag == 0:
            break
        if tag == 1:  # DT_NEEDED
            start = dynstr.offset + val
            out.append(data[start:data.index(b"\0", start)].decode())
    return out


def enable_cuda_codegen(nvcc: str | None = None) -> str:
    """Make this process's TVM able to build real CUDA modules. Returns "driver" or "stub". Idempotent."""
    global _codegen_state
    with _lock:
        if _codegen_state is not None:
            return _codegen_state
        sidecar = _sidecar_path()
        if not os.path.isfile(sidecar):
            raise TargetError(f"this TVM has no CUDA runtime ({sidecar} is missing); install the apache-tvm wheel "
                              "built with CUDA (apache-tvm==0.27.0.post1 on Linux x86-64)")
        if _cuda_module_registered():  # import tvm loaded the sidecar: a real driver is here
            _codegen_state = "driver"
            return _codegen_state
        state = "driver" if _real_driver_present() else "stub"
        if state == "stub":
            ctypes.CDLL(build_stub_driver(), mode=ctypes.RTLD_GLOBAL)
        try:
            try:
                ctypes.CDLL(sidecar, mode=ctypes.RTLD_GLOBAL)
            except OSError as e:
                if "libcudart" not in str(e) or _preload_cudart(nvcc or find_nvcc()) is None:
                    raise
                ctypes.CDLL(sidecar, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise TargetError(f"TVM's CUDA runtime library could not be loaded for compiling ({e}); install the "
                              "CUDA toolkit (its libcudart) or put its lib64 folder on LD_LIBRARY_PATH") from None
        if not _cuda_module_registered():
            raise TargetError(f"{sidecar} loaded but registered no CUDA module; this TVM build cannot emit CUDA "
                              "device code ahead of time")
        _codegen_state = state
        return state


# ---------------------------------------------------------------------------------------------------------------
# The build environment
# ---------------------------------------------------------------------------------------------------------------
def is_cuda_target(target) -> bool:
    return target is not None and str(target.kind.name) == "cuda"


def cuda_arch(target, name: str | None = None) -> str:
    return gpu_arch(target, "arch", r"sm_\d+[a-z]?", "CUDA", "cuda-sm80, cuda-sm89, cuda-sm90", name)


@dataclass(frozen=True)
class CudaBuild:
    """What :func:`cuda_build_environment` set up (None-like for non-CUDA targets: ``active`` is False)."""
    active: bool
    arch: str | None = None
    nvcc: str | None = None
    driver: str | None = None  # "driver" (a real libcuda) or "stub"
    compile_mode: str | None = None


@contextlib.contextmanager
def cuda_build_environment(target, name: str | None = None):
    """Around ``tvm.compile`` (and ``export_library``) for ``target``: real device code for CUDA, no-op otherwise.

    Raises :class:`ember.errors.TargetError` before any work when nvcc (or, without a driver, a C compiler) is
    missing, or when nvcc cannot emit code for the target's arch. Environment changes (``TVM_CUDA_COMPILE_MODE``,
    ``PATH``) are undone on exit; builds in several threads are serialised, since both are process-wide.
    """
    if not is_cuda_target(target):
        yield CudaBuild(active=False)
        return
    label = name or "CUDA"
    arch = cuda_arch(target, label)
    mode = os.environ.get("TVM_CUDA_COMPILE_MODE", "nvcc").lower()
    nvcc = find_nvcc()
    if mode not in ("nvcc", "nvrtc"):
        raise TargetError(f"TVM_CUDA_COMPILE_MODE={mode!r}: use 'nvcc' (ember's default) or 'nvrtc'")
    if mode == "nvrtc" and importlib.util.find_spec("cuda") is None:
        raise TargetError("TVM_CUDA_COMPILE_MODE=nvrtc needs the cuda-bindings package (pip install "
                          "cuda-bindings); or unset it to compile with nvcc")
    if mode == "nvcc":
        if nvcc is None:
            raise TargetError(f"install the CUDA toolkit (nvcc) to compile for {label}: ember compiles CUDA kernels "
                              "ahead of time with nvcc (looked in $CUDA_HOME/bin, PATH and /usr/local/cuda/bin)")
        codes = nvcc_gpu_codes(nvcc)
        base = re.sub(r"[a-z]$", "", arch)
        if codes and base not in codes:
            hint = (" (TVM gives a CUDA target without \"arch\" sm_50 where it sees no GPU: name the arch, e.g. "
                    "target cuda-sm90)" if arch == "sm_50" else f" — use a CUDA toolkit that supports {arch}")
            listed = ", ".join(sorted(codes, key=lambda c: int(re.sub(r"\D", "", c))))
            raise TargetError(f"{nvcc} cannot compile for {arch} (target {label}); it supports {listed}{hint}")
    with _lock:
        driver = enable_cuda_codegen(nvcc)
        saved = {k: os.environ.get(k) for k in ("TVM_CUDA_COMPILE_MODE", "PATH")}
        try:
            os.environ["TVM_CUDA_COMPILE_MODE"] = mode
            if nvcc is not None and shutil.which("nvcc") != nvcc:
                os.environ["PATH"] = os.path.dirname(nvcc) + os.pathsep + os.environ.get("PATH", "")
            with target:
                yield CudaBuild(active=True, arch=arch, nvcc=nvcc, driver=driver, compile_mode=mode)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


# ---------------------------------------------------------------------------------------------------------------
# Inspecting an exported library
# ---------------------------------------------------------------------------------------------------------------
_FATBIN_MAGIC = 0xBA55ED50
_FATBIN_KIND = {1: "ptx", 2: "elf"}
_ARCH_SPECIFIC = 0x100000  # fatbin entry flag of the "a" variants (sm_90a, sm_100a)


@dataclass(frozen=True)
class DeviceCode:
    """What device code a library holds.

    kind: "fatbin" or "cubin" (compiled SASS), "ptx" (only PTX, JIT-compiled by the driver), "source" (CUDA C
    kept by TVM's CUDAFallbackModule: needs TVM's compiler and NVRTC at load time), or None (no CUDA module).
    """
    kind: str | None
    archs: tuple[str, ...] = ()       # SASS: ("sm_90a",)
    ptx_archs: tuple[str, ...] = ()   # PTX: ("compute_90a",)
    cuda_modules: int = 0
    module_formats: tuple[str, ...] = field(default=())  # TVM's own label for each CUDA module ("cubin", "cuda", ...)

    @property
    def compiled(self) -> bool:
        return self.kind in ("fatbin", "cubin") and bool(self.archs)

    def has_code_for(self, arch: str) -> bool:
        return arch in self.archs

    def to_manifest(self, arch: str | None = None) -> dict:
        return {"device_code": self.kind, "arch": arch if arch in self.archs else ",".join(self.archs) or None}


def tvm_blob_modules(data: bytes, off: int):
    """(kind, payload) of each module in the TVM library blob that starts at byte ``off`` of ``data``.

    Layout: total size, the import tree (row pointers, then child indices), then per module its kind and, except
    for ``_lib`` (the library's own host code), its serialized payload. The container (ELF, Mach-O) only decides
    where the blob is: see :func:`_tvm_modules` and ``ember.compiler.metal``."""
    total, = struct.unpack_from("<Q", data, off)
    p, end = off + 8, off + 8 + total
    for _ in range(2):  # import tree: row pointers, then child indices
        n, = struct.unpack_from("<Q", data, p)
        p += 8 + 8 * n
    mods = []
    while p < end:
        n, = struct.unpack_from("<Q", data, p)
        kind = data[p + 8:p + 8 + n].decode("ascii")
        p += 8 + n
        if kind == "_lib":  # the library's own host code: no payload
            mods.append((kind, b""))
            continue
        n, = struct.unpack_from("<Q", data, p)
        mods.append((kind, data[p + 8:p + 8 + n]))
        p += 8 + n
    return mods


def _tvm_modules(data: bytes, sections):
    """(kind, payload) of each module TVM embedded in an ELF library (its ``__tvm_ffi__library_bin`` blob)."""
    for name, value, _size, shndx in _elf_symbols(data, sections):
        if name != "__tvm_ffi__library_bin" or shndx == 0 or shndx >= len(sections):
            continue
        sec = sections[shndx]
        return tvm_blob_modules(data, sec.offset + value - sec.addr)
    raise ValueError("no __tvm_ffi__library_bin symbol: not a library exported by TVM")


def _cubin_arch(elf: bytes) -> str | None:
    """sm_XX[a] of a CUDA ELF: from the toolkit note ("-arch sm_90a") when there, else from e_flags."""
    m = re.search(rb"-arch[ =](sm_\d+[a-z]?)", elf[:1 << 20])
    if m:
        return m.group(1).decode()
    if len(elf) < 52 or struct.unpack_from("<H", elf, 18)[0] != _EM_CUDA:
        return None
    flags, = struct.unpack_from("<I", elf, 48)
    sm = (flags >> 8) & 0xFF if elf[8] >= 8 else flags & 0xFF  # EI_ABIVERSION 8 (CUDA 13) moved the SM field
    return f"sm_{sm}" if sm else None


def _scan_fatbins(buf: bytes):
    """([(entry kind "elf"/"ptx", arch)] of every fatbin in ``buf``, [(start, end)] of those fatbins)."""
    magic = struct.pack("<I", _FATBIN_MAGIC)
    i = buf.find(magic)
    entries, covered = [], []
    while i >= 0 and i + 16 <= len(buf):
        _m, version, hsize, fsize = struct.unpack_from("<IHHQ", buf, i)
        if version == 1 and hsize == 16 and i + 16 + fsize <= len(buf):
            p, end = i + 16, i + 16 + fsize
            while p + 48 <= end:
                kind, _v, ehsize, psize = struct.unpack_from("<HHIQ", buf, p)
                if kind not in _FATBIN_KIND or ehsize < 48:
                    break
                sm, = struct.unpack_from("<I", buf, p + 28)
                flags, = struct.unpack_from("<Q", buf, p + 40)
                suffix = "a" if flags & _ARCH_SPECIFIC else ""
                entries.append((_FATBIN_KIND[kind], f"sm_{sm}{suffix}" if kind == 2 else f"compute_{sm}{suffix}"))
                p += ehsize + psize
            covered.append((i, end))
            i = buf.find(magic, end)
        else:
            i = buf.find(magic, i + 4)
    return entries, covered


def _describe_cuda_payload(payload: bytes):
    """(format label, kind, sass archs, ptx archs) of one serialized CUDA module."""
    n, = struct.unpack_from("<Q", payload, 0)
    fmt = payload[8:8 + n].decode("ascii", "replace")
    entries, covered = _scan_fatbins(payload)
    sass = [arch for what, arch in entries if what == "elf"]
    ptx = [arch for what, arch in entries if what == "ptx"]
    if sass or ptx:
        return fmt, ("fatbin" if sass else "ptx"), sass, ptx
    # A bare cubin (NVRTC mode): an ELF for EM_CUDA outside any fatbin.
    j = payload.find(b"\x7fELF")
    while j >= 0:
        if not any(a <= j < b for a, b in covered) and len(payload) >= j + 52 and \
                struct.unpack_from("<H", payload, j + 18)[0] == _EM_CUDA:
            arch = _cubin_arch(payload[j:])
            if arch:
                sass.append(arch)
        j = payload.find(b"\x7fELF", j + 4)
    if sass:
        return fmt, "cubin", sass, ptx
    if fmt == "ptx" or b".target sm_" in payload:
        ptx = sorted(set(re.findall(rb"\.target (sm_\d+[a-z]?)", payload)))
        return fmt, "ptx", [], [p.decode().replace("sm_", "compute_") for p in ptx]
    if fmt == "cuda" or b"__global__" in payload:
        return fmt, "source", [], []
    return fmt, None, [], []


def library_modules(lib_path) -> list:
    """(kind, payload) of each module TVM embedded in the ELF library ``lib_path`` (an exported ``model.so``),
    or an ArtifactError naming the file when it is not one."""
    with open(os.fspath(lib_path), "rb") as f:
        data = f.read()
    try:
        return _tvm_modules(data, _elf_sections(data))
    except (ValueError, struct.error, IndexError) as e:
        raise ArtifactError(f"{lib_path}: cannot read the modules TVM embedded ({e}); is this a model.so "
                            "exported by ember?") from None


def inspect_device_code(lib_path) -> DeviceCode:
    """Say what CUDA device code an exported ``model.so`` holds. Pure Python; needs no TVM, GPU or CUDA tools."""
    mods = library_modules(lib_path)
    kinds, sass, ptx, fmts, count = [], [], [], [], 0
    for kind, payload in mods:
        if kind != "cuda":
            continue
        count += 1
        fmt, k, s, p = _describe_cuda_payload(payload)
        fmts.append(fmt)
        kinds.append(k)
        sass += s
        ptx += p
    if not count:
        return DeviceCode(kind=None)
    rank = ["source", None, "ptx", "cubin", "fatbin"]  # the weakest module decides what the library needs
    kind = min(kinds, key=rank.index)
    return DeviceCode(kind=kind, archs=tuple(sorted(set(sass))), ptx_archs=tuple(sorted(set(ptx))),
                      cuda_modules=count, module_formats=tuple(fmts))


def check_device_code(lib_path, arch: str, target_name: str | None = None) -> dict:
    """Raise ArtifactError unless ``lib_path`` holds compiled device code for ``arch``; return the manifest entry."""
    dc = inspect_device_code(lib_path)
    label = target_name or arch
    if dc.kind is None:
        return {"device_code": None, "arch": arch}  # no kernel on the device (nothing to check)
    if dc.kind == "source":
        raise ArtifactError(f"{lib_path}: the CUDA kernels for {label} were kept as CUDA source "
                            "(TVM's CUDAFallbackModule), which TVM's runtime alone cannot load; compile inside "
                            "ember.compiler.cuda_aot.cuda_build_environment")
    if not dc.has_code_for(arch):
        raise ArtifactError(f"{lib_path}: holds {dc.kind} for {', '.join(dc.archs + dc.ptx_archs) or 'nothing'}, "
                            f"not {arch} (target {label})")
    return dc.to_manifest(arch)

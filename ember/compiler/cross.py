"""Writing ``model.so`` for the machine the artifact is for, which need not be this one.

``Executable.export_library`` compiles the host code to an object file for the target's triple (TVM's own LLVM
does that for any triple) and then *links* it with the system C compiler, which only makes libraries for this
machine. ember picks the linker from the artifact's target (:func:`export_library`):

* this machine's architecture and OS: the system compiler, as TVM does;
* AArch64 Linux (``arm64``, ``arm64-dotprod``) from another machine: the GNU cross compiler
  ``aarch64-linux-gnu-g++`` (Debian ``g++-aarch64-linux-gnu``), giving an ELF shared object for aarch64;
* macOS on Apple silicon (``metal``): LLVM's Mach-O linker ``ld64.lld`` (Debian ``lld-16``) makes an arm64
  ``.dylib`` (named model.so like every artifact library) with ``-undefined dynamic_lookup``, as TVM builds
  libraries on macOS itself: the TVM runtime symbols it calls are found in the process that loads it. No
  Apple SDK is needed, since the library calls nothing but the TVM runtime and libSystem (dyld's binder).

After linking, device code is checked where ember knows how (CUDA fatbins, ROCm code objects, Metal source) and
the manifest's ``target`` entry is returned with what was found, so an artifact never claims code it lacks.
"""

from __future__ import annotations

import glob
import platform
import shutil
import subprocess

from ..errors import ArtifactError, TargetError

AARCH64_CXX = ("aarch64-linux-gnu-g++", "aarch64-linux-gnu-g++-12", "aarch64-linux-gnu-g++-13",
               "aarch64-linux-gnu-g++-14")
MACOS_MIN_VERSION = "11.0"  # the first macOS on Apple silicon


def this_machine() -> tuple[str, str]:
    """(architecture, os) of this machine, spelled as the manifest spells them ("x86_64"/"aarch64", "linux")."""
    arch = platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64")
    return arch, platform.system().lower()


def find_aarch64_cxx() -> str | None:
    for name in AARCH64_CXX:
        path = shutil.which(name)
        if path:
            return path
    return None


def find_ld64() -> str | None:
    """LLVM's Mach-O linker (ld64.lld), newest first."""
    names = [f"ld64.lld-{v}" for v in range(30, 13, -1)] + ["ld64.lld"]
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    found = sorted(glob.glob("/usr/lib/llvm-*/bin/ld64.lld"), reverse=True)
    return found[0] if found else None


def _macos_linker(ld64: str):
    def link(output, objects, options=None, cc=None, cwd=None, ccache_env=None):  # signature of cc.create_shared
        cmd = [ld64, "-dylib", "-arch", "arm64", "-platform_version", "macos", MACOS_MIN_VERSION,
               MACOS_MIN_VERSION, "-undefined", "dynamic_lookup", "-install_name", "@rpath/model.so", "-o", output]
        cmd += list(objects if isinstance(objects, (list, tuple)) else [objects])
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise ArtifactError(f"linking the macOS arm64 library with {ld64} failed: {res.stderr.strip()[-800:]}")

    link.output_format = "so"
    return link


def fcompile_for(target_entry: dict):
    """The ``fcompile`` for ``export_library`` (None: TVM's default, the system compiler), or TargetError."""
    arch, osname = target_entry.get("arch"), target_entry.get("os", "linux")
    here_arch, here_os = this_machine()
    if (arch in (None, here_arch)) and osname == here_os:
        return None
    label = target_entry.get("name", arch)
    if osname == "linux" and arch == "aarch64":
        cxx = find_aarch64_cxx()
        if cxx is None:
            raise TargetError(f"exporting for {label} (aarch64 Linux) from this {here_arch} machine needs the "
                              "cross compiler aarch64-linux-gnu-g++: apt-get install g++-aarch64-linux-gnu")
        from tvm.support import cc

        return cc.cross_compiler(cxx)
    if osname == "darwin" and arch == "aarch64":
        ld64 = find_ld64()
        if ld64 is None:
            raise TargetError(f"exporting for {label} (macOS arm64) from Linux needs LLVM's Mach-O linker "
                              "ld64.lld: apt-get install lld-16")
        return _macos_linker(ld64)
    raise TargetError(f"ember cannot link a library for {arch} {osname} (target {label}) on this {here_arch} "
                      f"{here_os} machine; export on a machine of that kind")


def export_library(ex, lib_path: str, target_entry: dict) -> dict:
    """Write ``ex`` as ``lib_path`` for the target; return the target entry with the device code found in it."""
    fcompile = fcompile_for(target_entry)
    if fcompile is None:
        ex.export_library(lib_path)
    else:
        ex.export_library(lib_path, fcompile=fcompile)
    gpu = target_entry.get("gpu")
    device = target_entry.get("device")
    if gpu is None:
        return target_entry
    if device == "cuda":  # refuse an artifact whose kernels are not compiled for the GPU
        from .cuda_aot import check_device_code
    elif device == "rocm":
        from .rocm_aot import check_device_code
    elif device == "metal":
        from .metal import check_device_code
    else:
        return target_entry
    found = check_device_code(lib_path, gpu["arch"], target_entry.get("name"))
    return dict(target_entry, gpu={**gpu, **found})

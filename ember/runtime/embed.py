"""What a C++ application needs to load ember artifacts: headers, libraries, a compile line, a cmake invocation.

The headers and libraries come from the installed wheels: ``apache-tvm-ffi`` ships the C++ API
(``tvm/ffi/*.h``, ``dlpack/dlpack.h``, ``libtvm_ffi``) and ``apache-tvm`` ships ``libtvm_runtime`` (the Relax VM,
the artifact loaders, the CPU/GPU device APIs). The packages are located without importing them: importing tvm
would load torch and the compiler, and ``ember embed-info`` must answer in a fraction of a second.

``tvm/include`` from the apache-tvm wheel is *not* on the include path: its ``tvm/runtime/tensor.h`` needs
``tvm/support/io.h``, which the wheel does not ship. The tvm-ffi API (``tvm::ffi::Module``, ``Function``,
``Tensor``) covers everything an app needs; ``tvm::ffi::Tensor`` is the object ``tvm::runtime::Tensor`` wraps.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import platform
import shlex
from dataclasses import asdict, dataclass, field

from ..errors import EmberError

EXAMPLE_SOURCES = ("main.cc", "ember_model.cc", "npy.cc")


@dataclass(frozen=True)
class EmbedInfo:
    tvm_root: str                 # the tvm package directory (-DTVM_ROOT)
    tvm_ffi_root: str             # the tvm_ffi package directory (-DTVM_FFI_ROOT)
    include_dirs: list[str]
    library_dirs: list[str]
    libraries: list[str]          # link names, in link order
    library_files: list[str]
    versions: dict[str, str]
    example_dir: str | None       # examples/cpp of an ember source checkout, if this ember runs from one
    cxxflags: list[str] = field(default_factory=list)
    ldflags: list[str] = field(default_factory=list)

    def compile_line(self, sources=EXAMPLE_SOURCES, output: str = "ember_run") -> str:
        src = [os.path.join(self.example_dir, s) for s in sources] if self.example_dir else list(sources)
        return shlex.join(["c++", *self.cxxflags, *src, "-o", output, *self.ldflags])

    def cmake_commands(self, build_dir: str = "build/ember_run") -> list[str]:
        src = self.example_dir or "examples/cpp"
        return [shlex.join(["cmake", "-S", src, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
                            f"-DTVM_ROOT={self.tvm_root}", f"-DTVM_FFI_ROOT={self.tvm_ffi_root}"]),
                shlex.join(["cmake", "--build", build_dir, "-j"])]

    def to_json(self) -> dict:
        d = asdict(self)
        d["compile_line"] = self.compile_line()
        d["cmake"] = self.cmake_commands()
        return d


def _package_dir(module: str, dist: str) -> str:
    spec = importlib.util.find_spec(module)  # locates without importing
    if spec is None or not spec.submodule_search_locations:
        raise EmberError(f"the '{module}' package is not installed; `pip install {dist}` (the version ember pins "
                         "in pyproject.toml) — its wheel ships the headers and libraries a C++ app links")
    return os.path.realpath(list(spec.submodule_search_locations)[0])


def _find_lib(lib_dir: str, name: str, dist: str) -> str:
    ext = {"Darwin": "dylib", "Windows": "dll"}.get(platform.system(), "so")
    hits = sorted(glob.glob(os.path.join(lib_dir, f"lib{name}.{ext}")) + glob.glob(os.path.join(lib_dir, f"{name}.{ext}")))
    if not hits:
        raise EmberError(f"{lib_dir} has no lib{name}.{ext}; the {dist} installation is incomplete — reinstall it "
                         f"(`pip install --force-reinstall {dist}`)")
    return hits[0]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def embed_info() -> EmbedInfo:
    tvm_root = _package_dir("tvm", "apache-tvm")
    ffi_root = _package_dir("tvm_ffi", "apache-tvm-ffi")
    ffi_include = os.path.join(ffi_root, "include")
    for header in ("tvm/ffi/function.h", "tvm/ffi/extra/module.h", "dlpack/dlpack.h"):
        if not os.path.isfile(os.path.join(ffi_include, header)):
            raise EmberError(f"{ffi_include} lacks {header}; reinstall apache-tvm-ffi")
    runtime = _find_lib(os.path.join(tvm_root, "lib"), "tvm_runtime", "apache-tvm")
    ffi_lib = _find_lib(os.path.join(ffi_root, "lib"), "tvm_ffi", "apache-tvm-ffi")
    lib_dirs = [os.path.dirname(runtime), os.path.dirname(ffi_lib)]
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    example = os.path.join(here, "examples", "cpp")
    example_dir = example if os.path.isfile(os.path.join(example, "CMakeLists.txt")) else None

    cxxflags = ["-std=c++17", "-O2", f"-I{ffi_include}"]
    if platform.system() == "Darwin":
        ldflags = [f"-L{d}" for d in lib_dirs] + ["-ltvm_ffi", f"-Wl,-needed_library,{runtime}"]
    else:
        # libtvm_runtime is reached only through functions it registers when loaded, never by a symbol, so a
        # linker with --as-needed (Ubuntu's default) would drop it: keep it with --no-as-needed.
        ldflags = [f"-L{d}" for d in lib_dirs] + ["-ltvm_ffi", "-Wl,--no-as-needed", "-ltvm_runtime",
                                                  "-Wl,--as-needed", "-lpthread", "-ldl"]
    # The wheel's directories for running in place; $ORIGIN for an app shipped with the two libraries beside it.
    ldflags += [f"-Wl,-rpath,{d}" for d in lib_dirs]
    ldflags.append("-Wl,-rpath,@loader_path" if platform.system() == "Darwin" else "-Wl,-rpath,$ORIGIN")
    return EmbedInfo(
        tvm_root=tvm_root, tvm_ffi_root=ffi_root, include_dirs=[ffi_include], library_dirs=lib_dirs,
        libraries=["tvm_ffi", "tvm_runtime"], library_files=[ffi_lib, runtime],
        versions={"apache-tvm": _version("apache-tvm"), "apache-tvm-ffi": _version("apache-tvm-ffi")},
        example_dir=example_dir, cxxflags=cxxflags, ldflags=ldflags)


def format_info(info: EmbedInfo) -> str:
    lines = [
        f"apache-tvm {info.versions['apache-tvm']}, apache-tvm-ffi {info.versions['apache-tvm-ffi']}",
        "",
        "include dirs   " + " ".join(info.include_dirs) + "   (tvm/ffi/*.h, dlpack/dlpack.h)",
        "library dirs   " + " ".join(info.library_dirs),
        "libraries      " + " ".join(f"-l{n}" for n in info.libraries)
        + "   (link libtvm_runtime with --no-as-needed: it is used only through functions it registers)",
        "",
        "compile line (the example app; run from anywhere):",
        "  " + info.compile_line(),
        "",
        "cmake:",
        *("  " + c for c in info.cmake_commands()),
        "",
        "run:",
        "  build/ember_run/ember_run ARTIFACT_DIR [--input NAME=FILE.npy]... [--dim batch=8] [--output-dir OUT]",
    ]
    if info.example_dir is None:
        lines.append("\n(the example sources, examples/cpp, are in ember's source repository; this ember was "
                     "installed without them)")
    lines.append("\nTo ship the app, copy libtvm_runtime and libtvm_ffi next to the binary (its rpath has $ORIGIN).")
    return "\n".join(lines)

"""``ember.load``: open an artifact with TVM's runtime only.

Nothing here imports torch or TVM's compiler: an application that ships artifacts needs ``apache-tvm`` (run with
``TVM_USE_RUNTIME_LIB=1`` to load only the runtime library) and numpy. The manifest is read and checked before
the library is touched — missing files, a changed file (sha256), an artifact for another CPU architecture, CPU
features this machine lacks, or another device kind are refused with a sentence that says what to do, instead
of a crash inside dlopen or an "Illegal instruction".
"""

from __future__ import annotations

import json
import os
import platform
import tarfile
import tempfile

from ..errors import ArtifactError
from .module import CompiledModel

from .artifact import FORMAT_VERSION, LIB, MANIFEST, PARAMS, sha256_file


def host_arch() -> str:
    """This machine's CPU architecture in the names manifests use (x86_64, aarch64)."""
    return platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64")


def host_cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo, or None where that file does not exist."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86: "flags"; AArch64 Linux: "Features"
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def read_manifest(art_dir: str, where: str) -> dict:
    mpath = os.path.join(art_dir, MANIFEST)
    if not os.path.isfile(mpath):
        raise ArtifactError(f"{where}: no {MANIFEST}; this is not an ember artifact (export one with "
                            "CompiledModel.export or `ember compile`)")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{where}: {MANIFEST} is unreadable ({e}); re-export the artifact") from None
    if manifest.get("format") != "ember-artifact":
        raise ArtifactError(f"{where}: {MANIFEST} is not an ember manifest")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise ArtifactError(f"{where}: artifact format {manifest.get('format_version')} is newer than this ember "
                            f"reads ({FORMAT_VERSION}); upgrade ember")
    return manifest


def verify(art_dir: str, manifest: dict, where: str, device: str, cpu_flags=None):
    import tvm

    for fname, info in manifest.get("files", {}).items():
        fpath = os.path.join(art_dir, fname)
        if not os.path.isfile(fpath):
            raise ArtifactError(f"{where}: {fname} is missing; the artifact is incomplete — re-export it")
        if sha256_file(fpath) != info["sha256"]:
            raise ArtifactError(f"{where}: {fname} does not match the sha256 in {MANIFEST} (the file was changed "
                                "or corrupted after export); re-export the artifact")
    for needed in (LIB, PARAMS):
        if needed not in manifest.get("files", {}):
            raise ArtifactError(f"{where}: {MANIFEST} lists no hash for {needed}; re-export the artifact")
    want = ".".join(str(manifest.get("tvm_version", "")).split(".")[:2])
    have = ".".join(tvm.__version__.split(".")[:2])
    if want != have:
        raise ArtifactError(f"{where}: built with TVM {manifest.get('tvm_version')}, this runtime is TVM "
                            f"{tvm.__version__}; install apache-tvm=={manifest.get('tvm_version')} or recompile")
    tgt = manifest["target"]
    if tgt.get("device") != device:
        raise ArtifactError(f"{where}: compiled for target '{tgt['name']}' which runs on '{tgt['device']}', but "
                            f"device='{device}' was asked; load it with device='{tgt['device']}' or recompile "
                            f"with --target for {device}")
    system = platform.system().lower()
    if tgt.get("os") and tgt["os"] != system:
        raise ArtifactError(f"{where}: compiled for {tgt['os']} (target '{tgt['name']}'), this machine runs "
                            f"{system}; recompile with a target for this machine (e.g. --target host)")
    machine = host_arch()
    if tgt.get("arch") and tgt["arch"] != machine:
        raise ArtifactError(f"{where}: compiled for {tgt['arch']} CPUs (target '{tgt['name']}'), this machine is "
                            f"{machine}; recompile with a target for this machine (e.g. --target host)")
    if tgt.get("device") in ("rocm", "metal") and not (tgt.get("gpu") or {}).get("device_code"):
        raise ArtifactError(f"{where}: the manifest records no checked {tgt['device']} kernels; re-export it "
                            "with this version of ember")
    if tgt.get("device") == "cuda":
        code = (tgt.get("gpu") or {}).get("device_code")
        if code not in ("fatbin", "cubin"):
            raise ArtifactError(f"{where}: its CUDA kernels were not compiled to GPU code (device_code: {code}), so "
                                "TVM's runtime alone cannot run them; recompile it with this version of ember on a "
                                "machine with the CUDA toolkit (nvcc)")
    flags = host_cpu_flags() if cpu_flags is None else cpu_flags
    missing = sorted(set(tgt.get("cpu_flags", [])) - flags) if flags is not None else []
    if missing:
        raise ArtifactError(f"{where}: compiled for target '{tgt['name']}', whose code uses CPU features this CPU "
                            f"lacks ({', '.join(missing)}); running it would crash with 'Illegal instruction'. "
                            "Recompile with --target host on this machine (or a target it supports).")


def _open(path: str):
    """Return (directory, keepalive) for an artifact directory or .tar."""
    if os.path.isdir(path):
        return path, None
    if not os.path.exists(path):
        raise ArtifactError(f"{path}: no such artifact (expected a directory or .tar written by ember)")
    if not tarfile.is_tarfile(path):
        raise ArtifactError(f"{path}: not an ember artifact (neither a directory nor a .tar)")
    tmp = tempfile.TemporaryDirectory(prefix="ember-artifact-")
    with tarfile.open(path) as tf:
        members = [m for m in tf.getmembers() if m.name in (LIB, PARAMS, MANIFEST) and m.isfile()]
        tf.extractall(tmp.name, members=members)
    return tmp.name, tmp


def load(path, device: str = "cpu", *, cpu_flags=None) -> CompiledModel:
    """Load an artifact for ``device`` ("cpu", "cuda", "rocm", "metal")."""
    import tvm

    path = os.path.abspath(os.fspath(path))
    art_dir, keep = _open(path)
    manifest = read_manifest(art_dir, path)
    verify(art_dir, manifest, path, device, cpu_flags)
    _load_device_runtime(device)
    _check_gpu_arch(manifest, path, device)
    try:
        lib = tvm.runtime.load_module(os.path.join(art_dir, LIB))
    except Exception as e:
        raise ArtifactError(f"{path}: {LIB} could not be loaded by the TVM runtime: {str(e).splitlines()[-1]}")
    loaded = tvm.runtime.load_param_dict_from_file(os.path.join(art_dir, PARAMS))
    names = manifest["params"]["names"]
    if set(names) != set(loaded):
        raise ArtifactError(f"{path}: {PARAMS} holds {len(loaded)} tensors, the manifest lists {len(names)}")
    params = [loaded[n] for n in names]
    model = CompiledModel(lib, params, manifest, device=device, artifact_dir=keep)
    model._artifact_source = art_dir
    return model


def _check_gpu_arch(manifest: dict, where: str, device: str):
    """SASS runs on GPUs of its major version with an equal or newer minor; "a" variants (sm_90a) only on theirs."""
    arch = (manifest["target"].get("gpu") or {}).get("arch") or ""
    if device != "cuda" or not arch.startswith("sm_"):
        return
    import tvm

    dev = tvm.device("cuda", 0)
    if not dev.exist:
        raise ArtifactError(f"{where}: no CUDA GPU is visible (or the NVIDIA driver is missing); this artifact needs "
                            f"a GPU that runs {arch} code")
    have = dev.compute_version  # "9.0"
    major, minor = (int(x) for x in have.split("."))
    digits = arch[3:].rstrip("abcdefghijklmnopqrstuvwxyz")
    want_major, want_minor = int(digits[:-1]), int(digits[-1])
    exact = arch[3:] != digits
    if major != want_major or minor < want_minor or (exact and minor != want_minor):
        raise ArtifactError(f"{where}: compiled for {arch} (target '{manifest['target']['name']}'), this GPU is "
                            f"sm_{major}{minor}; recompile with the target for this GPU (e.g. --target "
                            f"cuda-sm{major}{minor})")


def _load_device_runtime(device: str):
    """In runtime-only mode TVM does not load its CUDA sidecar by itself (see PLATFORM.md); load it here."""
    if device not in ("cuda",):
        return
    import ctypes

    import tvm

    lib = os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_cuda.so")
    if os.path.exists(lib):
        try:
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise ArtifactError(f"the CUDA runtime of TVM could not load ({e}); is the NVIDIA driver installed?")

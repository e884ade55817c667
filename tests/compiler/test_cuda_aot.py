"""CUDA compiled ahead of time on a machine without a GPU (ember.compiler.cuda_aot).

Everything but the `gpu`-marked test runs in CI without a GPU or driver: it needs nvcc (the CUDA toolkit) and a
C compiler, and skips with the reason when nvcc is absent.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ember.compiler import cuda_aot
from ember.errors import ArtifactError, TargetError

MODE_BEFORE = os.environ.get("TVM_CUDA_COMPILE_MODE")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_nvcc = pytest.mark.skipif(cuda_aot.find_nvcc() is None,
                                reason="nvcc (the CUDA toolkit) is not installed: CUDA cannot be compiled here")


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)


def _relax_mlp():
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    model = MLP().eval()
    mod = from_exported_program(torch.export.export(model, (torch.randn(4, 64),)), keep_params_as_input=True)
    mod, _params = relax.frontend.detach_params(mod)
    return mod


def _compile_and_export(target_name, path):
    """tvm.compile + export_library through ember's pipeline, inside the CUDA build environment."""
    import tvm

    from ember.compiler.pipeline import lower
    from ember.compiler.targets import resolve

    name, tgt = resolve(target_name)
    with cuda_aot.cuda_build_environment(tgt, name) as build:
        ex = tvm.compile(_relax_mlp(), tgt, relax_pipeline=lower(tgt))
        ex.export_library(str(path))
    return build


@pytest.fixture(scope="module")
def aot_libs(tmp_path_factory):
    pytest.importorskip("ember.schedules", reason="ember.schedules is not there yet")
    if cuda_aot.find_nvcc() is None:
        pytest.skip("nvcc (the CUDA toolkit) is not installed: CUDA cannot be compiled here")
    out = tmp_path_factory.mktemp("cuda_aot")
    libs = {}
    for name in ("cuda-sm90", "cuda-sm80"):
        libs[name] = out / f"{name}.so"
        libs[name + ":build"] = _compile_and_export(name, libs[name])
    return libs


# A fresh interpreter compiles the same MLP for CUDA the plain way (no stub, no nvcc mode): what TVM does by
# itself on a machine without a driver. It must run apart, since the stub stays loaded in this process.
FALLBACK_CHILD = r"""
import json, sys
import torch, tvm, tvm_ffi
sys.path.insert(0, sys.argv[2])
from test_cuda_aot import _relax_mlp
from ember.compiler.pipeline import lower
from ember.compiler.targets import resolve
name, tgt = resolve("cuda-sm90")
with tgt:
    ex = tvm.compile(_relax_mlp(), tgt, relax_pipeline=lower(tgt))
ex.export_library(sys.argv[1])
print(json.dumps({"driver": tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None}))
"""

# TVM's runtime alone (what an application has) opens each library: the CUDA sidecar is loaded by hand as
# ember.load does; without a driver the stub stands in (it is never called: kernels load lazily).
RUNTIME_CHILD = r"""
import ctypes, json, os, sys
if sys.argv[1]:
    ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)
import tvm
ctypes.CDLL(os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_cuda.so"), mode=ctypes.RTLD_GLOBAL)
res = {"runtime_only": __import__("tvm.base").base._RUNTIME_ONLY}
for path in sys.argv[2:]:
    try:
        lib = tvm.runtime.load_module(path)
        kinds = []
        todo = [lib]
        while todo:
            m = todo.pop()
            kinds.append(m.kind)
            todo.extend(m.imports)
        res[path] = sorted(kinds)
    except Exception as e:
        res[path] = "error: " + str(e).strip().splitlines()[-1]
print(json.dumps(res))
"""


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TVM_CUDA_COMPILE_MODE", None)
    return env


@pytest.fixture(scope="module")
def fallback_lib(tmp_path_factory):
    pytest.importorskip("ember.schedules", reason="ember.schedules is not there yet")
    path = tmp_path_factory.mktemp("fallback") / "fallback.so"
    res = subprocess.run([sys.executable, "-c", FALLBACK_CHILD, str(path), os.path.dirname(__file__)],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    if json.loads(res.stdout.strip().splitlines()[-1])["driver"]:
        pytest.skip("an NVIDIA driver is installed: TVM builds real CUDA modules here without help")
    return path


# -- the artifact holds compiled device code ------------------------------------------------------------------
@needs_nvcc
@pytest.mark.parametrize("name,arch", [("cuda-sm90", "sm_90a"), ("cuda-sm80", "sm_80")])
def test_mlp_library_holds_sass_for_the_target_arch(aot_libs, name, arch):
    build = aot_libs[name + ":build"]
    assert build.active and build.arch == arch and build.compile_mode == "nvcc"
    dc = cuda_aot.inspect_device_code(aot_libs[name])
    assert dc.kind == "fatbin" and dc.compiled, dc
    assert dc.archs == (arch,), dc  # SASS for exactly the asked arch, nothing else
    assert cuda_aot.check_device_code(aot_libs[name], arch, name) == {"device_code": "fatbin", "arch": arch}
    other = "sm_80" if arch == "sm_90a" else "sm_90a"
    with pytest.raises(ArtifactError, match=f"not {other}"):
        cuda_aot.check_device_code(aot_libs[name], other)


@needs_nvcc
def test_environment_is_restored_and_cuda_stays_absent(aot_libs):
    import tvm

    assert os.environ.get("TVM_CUDA_COMPILE_MODE") == MODE_BEFORE
    if aot_libs["cuda-sm90:build"].driver == "stub":
        assert not tvm.cuda(0).exist  # the stub makes no GPU appear


@needs_nvcc
def test_fallback_library_fails_the_check(fallback_lib):
    dc = cuda_aot.inspect_device_code(fallback_lib)
    assert dc.kind == "source" and not dc.compiled and dc.archs == (), dc
    with pytest.raises(ArtifactError, match="CUDAFallbackModule"):
        cuda_aot.check_device_code(fallback_lib, "sm_90a", "cuda-sm90")


@needs_nvcc
def test_runtime_alone_loads_the_aot_library_but_not_the_fallback(aot_libs, fallback_lib):
    stub = "" if aot_libs["cuda-sm90:build"].driver == "driver" else cuda_aot.build_stub_driver()
    env = dict(_env(), TVM_USE_RUNTIME_LIB="1")
    aot = str(aot_libs["cuda-sm90"])
    res = subprocess.run([sys.executable, "-c", RUNTIME_CHILD, stub, aot, str(fallback_lib)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["runtime_only"] is True
    assert out[aot] == ["cuda", "library", "relax.VMExecutable"], out
    assert str(out[str(fallback_lib)]).startswith("error:"), out  # needs NVRTC (and TVM's compiler) to load


def test_library_without_cuda_module_and_garbage(tmp_path):
    import tvm

    from ember.compiler.pipeline import lower_unscheduled

    ex = tvm.compile(_relax_mlp(), tvm.target.Target({"kind": "llvm"}), relax_pipeline=lower_unscheduled())
    ex.export_library(str(tmp_path / "cpu.so"))
    assert cuda_aot.inspect_device_code(tmp_path / "cpu.so").kind is None
    (tmp_path / "junk.so").write_bytes(b"\x7fELF" + b"\0" * 100)
    with pytest.raises(ArtifactError, match="cannot read"):
        cuda_aot.inspect_device_code(tmp_path / "junk.so")


# -- ember.compile for a CUDA target (needs the build.py / export.py wiring) ----------------------------------
@needs_nvcc
def test_ember_compile_cuda_sm90_exports_a_fatbin(tmp_path):
    pytest.importorskip("ember.schedules", reason="ember.schedules is not there yet")
    import ember

    compiled = ember.compile(MLP().eval(), (torch.randn(4, 64),), target="cuda-sm90")
    art = compiled.export(tmp_path / "mlp")
    lib = os.path.join(art, "model.so")
    dc = cuda_aot.inspect_device_code(lib)
    assert dc.kind == "fatbin" and dc.archs == ("sm_90a",), (
        f"{dc}: ember.compile did not build CUDA inside cuda_aot.cuda_build_environment")
    with open(os.path.join(art, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["target"]["gpu"] == {"device_code": "fatbin", "arch": "sm_90a"}


# -- errors -----------------------------------------------------------------------------------------------------
def test_missing_nvcc_says_what_to_install(monkeypatch):
    from ember.compiler.targets import resolve

    monkeypatch.setattr(cuda_aot, "find_nvcc", lambda: None)
    monkeypatch.delenv("TVM_CUDA_COMPILE_MODE", raising=False)
    name, tgt = resolve("cuda-sm90")
    with pytest.raises(TargetError, match=r"install the CUDA toolkit \(nvcc\) to compile for cuda-sm90"):
        with cuda_aot.cuda_build_environment(tgt, name):
            pass


def test_missing_c_compiler_is_a_target_error(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda_aot, "find_c_compiler", lambda: None)
    monkeypatch.setattr(cuda_aot.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    with pytest.raises(TargetError, match="needs a C compiler"):
        cuda_aot.build_stub_driver(cache_dir=str(tmp_path / "cache"))


@needs_nvcc
def test_arch_nvcc_cannot_build_is_a_target_error():
    import tvm

    tgt = tvm.target.Target({"kind": "cuda", "arch": "sm_35", "host": {"kind": "llvm"}})
    if "sm_35" in cuda_aot.nvcc_gpu_codes(cuda_aot.find_nvcc()):
        pytest.skip("this nvcc still builds sm_35")
    with pytest.raises(TargetError, match="cannot compile for sm_35"):
        with cuda_aot.cuda_build_environment(tgt, "old-gpu"):
            pass


@needs_nvcc
def test_cuda_target_without_arch_is_a_target_error():
    import tvm

    if tvm.cuda(0).exist:
        pytest.skip("with a GPU, TVM fills in that GPU's arch")
    # Without a GPU, TVM fills in sm_50 (which nvcc 13 no longer builds); with one, the GPU's own arch.
    with pytest.raises(TargetError, match="names no GPU architecture|cannot compile for sm_50.*name the arch"):
        with cuda_aot.cuda_build_environment(tvm.target.Target({"kind": "cuda"}), "cuda"):
            pass


def test_cpu_target_is_left_alone():
    import tvm

    before = dict(os.environ)
    with cuda_aot.cuda_build_environment(tvm.target.Target({"kind": "llvm"})) as build:
        assert not build.active
    assert dict(os.environ) == before


def test_stub_driver_is_a_libcuda_stand_in(tmp_path):
    if cuda_aot.find_c_compiler() is None:
        pytest.skip("no C compiler")
    lib = cuda_aot.build_stub_driver(cache_dir=str(tmp_path))
    assert lib.startswith(str(tmp_path)) and os.path.basename(lib) == "libcuda.so.1"
    assert cuda_aot.build_stub_driver(cache_dir=str(tmp_path)) == lib  # cached
    data = open(lib, "rb").read()
    secs = cuda_aot._elf_sections(data)
    defined = {n for n, _v, _s, shndx in cuda_aot._elf_symbols(data, secs, dynamic_only=True) if shndx}
    wanted = set(cuda_aot.stub_driver_symbols())
    assert set(cuda_aot._KNOWN_DRIVER_SYMBOLS) <= wanted <= defined
    assert "cuInit" not in defined  # how a real driver is told apart from the stub
    assert b"libcuda.so.1" in data[secs[[s.name for s in secs].index(".dynstr")].offset:]
    import ctypes

    assert ctypes.CDLL(lib).cuModuleLoadData() == 999


# -- on a real GPU ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_artifact_runs_on_the_gpu_like_torch(tmp_path):
    import tvm

    import ember

    if not tvm.cuda(0).exist:
        pytest.skip("no CUDA GPU visible")
    cc = tvm.cuda(0).compute_version.replace(".", "")
    name = {"80": "cuda-sm80", "89": "cuda-sm89", "90": "cuda-sm90"}.get(cc)
    if name is None:
        pytest.skip(f"no named ember target for sm_{cc}")
    model = MLP().eval()
    x = torch.randn(4, 64)
    art = ember.compile(model, (x,), target=name).export(tmp_path / "mlp")
    loaded = ember.load(art, device="cuda")
    out = loaded(x.numpy())
    with torch.no_grad():
        ref = model.cuda()(x.cuda()).cpu().numpy() if torch.cuda.is_available() else model(x).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)

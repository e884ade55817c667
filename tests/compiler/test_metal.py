"""Metal artifacts for macOS on Apple silicon, built here (ember.compiler.metal, ember.compiler.cross).

Nothing Metal runs or compiles on this Linux machine: the checks are structural. model.so must be an arm64
Mach-O dylib whose TVM module holds Metal Shading Language source for every kernel the host code launches, each
with GPU thread bindings (dlight's rules), and none with storage that the Metal compiler would reject.
Linking needs ld64.lld (Debian lld-16, `make sysdeps`); skips otherwise.
"""

import json
import re
import subprocess

import pytest
import torch

from ember.compiler import metal
from ember.compiler.cross import find_ld64
from ember.errors import ArtifactError
from models import MLP, TinyTransformer, seeded

pytestmark = pytest.mark.skipif(find_ld64() is None,
                                reason="ld64.lld (LLVM's Mach-O linker) missing: run `make sysdeps` (lld-16)")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    import ember

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (2, 16), generator=g)
    mask = torch.ones(2, 16, dtype=torch.int64)
    model = seeded(TinyTransformer)
    return ember.compile(model, (ids, mask), target="metal").export(tmp_path_factory.mktemp("metal") / "art")


def test_macos_arm64_dylib_with_msl_for_every_kernel(artifact):
    lib = f"{artifact}/model.so"
    data = open(lib, "rb").read()
    info = metal.macho_info(data)
    assert info["cputype"] == metal.CPU_TYPE_ARM64 and info["filetype"] == 6  # MH_DYLIB
    mc = metal.inspect_metal(lib)
    assert mc.source_format == "metal" and mc.functions
    # Every kernel the host launches has its MSL entry point, with dlight's thread bindings.
    for fn in mc.functions:
        src = next(s for s in mc.sources.values() if re.search(rf"kernel\s+void\s+{fn}\s*\(", s))
        assert "[[threadgroup_position_in_grid]]" in src or "[[thread_position_in_threadgroup]]" in src, fn
        assert "#include <metal_stdlib>" in src
    assert metal.msl_problems(mc) == []
    # The arm64 host code exports one entry per kernel group, and each launches kernels that are in the module.
    out = subprocess.run(["llvm-nm", "-g", "--defined-only", lib], capture_output=True, text=True)
    if out.returncode == 0:
        host = {m.group(1) for m in re.finditer(r" T ___tvm_ffi_(\w+)$", out.stdout, re.M)}
        assert host and all(any(k.startswith(h) for k in mc.functions) for h in host), (host, mc.functions)


def test_manifest_names_metal_and_macos(artifact):
    tgt = json.load(open(f"{artifact}/manifest.json"))["target"]
    assert (tgt["name"], tgt["device"], tgt["arch"], tgt["os"]) == ("metal", "metal", "aarch64", "darwin")
    mc = metal.inspect_metal(f"{artifact}/model.so")
    assert tgt["gpu"]["device_code"] == "msl" and tgt["gpu"]["kernels"] == len(mc.functions)
    assert '"thread_warp_size":32' in tgt["tvm"] and "arm64-apple-macos" in tgt["tvm"]


def test_loading_on_linux_is_refused(artifact):
    import platform

    import ember

    if platform.system() == "Darwin":
        pytest.skip("this is a Mac")
    with pytest.raises(ArtifactError, match="darwin"):
        ember.load(artifact, device="metal")


def test_invalid_msl_is_caught():
    """A kernel-internal device array (what TVM prints for a global buffer inside a kernel) is invalid Metal."""
    bad = ("#include <metal_stdlib>\nkernel void k_kernel(device float* a [[ buffer(0) ]],\n"
           "  uint blockIdx [[threadgroup_position_in_grid]]) {\n  device float tmp[40];\n  a[0] = tmp[0];\n}\n")
    mc = metal.MetalCode("macho", metal.CPU_TYPE_ARM64, "metal", ("k_kernel", "missing_kernel"), {"k": bad})
    problems = metal.msl_problems(mc)
    assert any("device-address-space" in p for p in problems)
    assert any("missing_kernel" in p for p in problems)


def test_mlp_kernel_scratch_is_local(tmp_path):
    """The GEMV + bias epilogue kernel keeps its matmul result in registers (ember.compiler.kernel_scratch)."""
    import ember

    art = ember.compile(seeded(MLP), (torch.randn(4, 32),), target="metal").export(tmp_path / "mlp")
    mc = metal.inspect_metal(f"{art}/model.so")
    assert metal.msl_problems(mc) == []
    assert not re.search(r"^\s+device\s+float\s+\w+\[", "\n".join(mc.sources.values()), re.M)


def test_fast_intrinsics_import_leaves_the_package_importable():
    import sys

    metal.preload_metal_intrinsics()
    assert "tvm.s_tir.tensor_intrin.metal" in sys.modules
    # The stand-in package is gone: a full import still runs the real package (all backends' intrinsics).
    pkg = sys.modules.get("tvm.s_tir.tensor_intrin")
    assert pkg is None or hasattr(pkg, "cuda")

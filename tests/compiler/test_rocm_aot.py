"""ROCm artifacts compiled here, without an AMD GPU (ember.compiler.rocm_aot).

Nothing runs on a GPU: the proof is the code object read out of model.so — ELF machine AMDGPU, the target's gfx
arch in e_flags and in the metadata note, code object v5, and one kernel (with its kernel descriptor) per device
function the host code launches. Needs Debian's rocm-device-libs and lld-16 (`make sysdeps`); skips otherwise.
"""

import json
import re
import struct

import pytest
import torch

import elf
from ember.compiler import rocm_aot
from ember.errors import ArtifactError, TargetError
from models import CNN, MLP, randomize_bn, seeded

pytestmark = pytest.mark.skipif(
    rocm_aot.find_bitcode_dir() is None or not rocm_aot.find_lld(),
    reason="ROCm device libraries or ld.lld missing: run `make sysdeps` (apt-get install rocm-device-libs lld-16)")

MACH = {"gfx90a": 0x3F, "gfx942": 0x4C}


def _export(model, args, target, path, **kw):
    import ember

    return ember.compile(model, args, target=target, **kw).export(path)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    out = tmp_path_factory.mktemp("rocm")
    mlp = seeded(MLP)
    cnn = randomize_bn(seeded(CNN))
    return {
        "mlp-gfx942": _export(mlp, (torch.randn(4, 32),), "rocm-gfx942", out / "mlp-gfx942"),
        "cnn-gfx90a": _export(cnn, (torch.randn(1, 3, 32, 32),), "rocm-gfx90a", out / "cnn-gfx90a"),
    }


def _code_objects(lib: bytes) -> list[bytes]:
    """Every AMDGPU ELF inside a library, found by scanning (not through ember's parser)."""
    found, i = [], lib.find(b"\x7fELF", 1)
    while i >= 0:
        if len(lib) > i + 64 and elf.header(lib[i:])["machine"] == 224:
            # The code object ends where its section headers end.
            shoff, = struct.unpack_from("<Q", lib, i + 40)
            shentsize, shnum = struct.unpack_from("<HH", lib, i + 58)
            found.append(lib[i:i + shoff + shentsize * shnum])
        i = lib.find(b"\x7fELF", i + 4)
    return found


def _host_functions(lib: bytes) -> set[str]:
    """The PrimFuncs the x86 host code exports (each launches its device kernel ``<name>_kernel``)."""
    return {s[len("__tvm_ffi_"):] for s in elf.defined_symbols(lib)
            if s.startswith("__tvm_ffi_") and not s.startswith("__tvm_ffi__")}


@pytest.mark.parametrize("key,arch", [("mlp-gfx942", "gfx942"), ("cnn-gfx90a", "gfx90a")])
def test_code_object_holds_the_arch_and_every_kernel(artifacts, key, arch):
    path = artifacts[key]
    with open(f"{path}/model.so", "rb") as f:
        lib = f.read()
    objs = _code_objects(lib)
    assert len(objs) == 1, f"expected one AMDGPU code object, found {len(objs)}"
    co = objs[0]
    h = elf.header(co)
    assert h["machine"] == 224 and h["type"] == 3  # EM_AMDGPU, ET_DYN (linked by lld)
    assert h["os_abi"] == 64  # ELFOSABI_AMDGPU_HSA
    assert h["abi_version"] == 3, "code object v5 (EI_ABIVERSION 3) expected with lld >= 15"
    assert h["flags"] & 0xFF == MACH[arch]
    meta = [desc for owner, typ, desc in elf.notes(co) if owner == "AMDGPU" and typ == 32]  # NT_AMDGPU_METADATA
    assert meta and re.search(rb"amdgcn-amd-amdhsa-[a-z]*-" + arch.encode(), meta[0])
    syms = elf.defined_symbols(co)
    kernels = {s[:-3] for s in syms if s.endswith(".kd")}
    assert kernels and kernels <= syms  # each kernel has its entry symbol and its kernel descriptor
    launched = {f + "_kernel" for f in _host_functions(lib)}
    assert kernels == launched, f"kernels {sorted(kernels)} != launched {sorted(launched)}"
    for k in kernels:  # each kernel's metadata entry is there too
        assert k.encode() in meta[0]
    manifest = json.load(open(f"{path}/manifest.json"))
    gpu = manifest["target"]["gpu"]
    assert manifest["target"]["name"] == f"rocm-{arch}" and manifest["target"]["device"] == "rocm"
    assert gpu == {"device_code": "hsaco", "arch": arch, "code_object_version": 5, "kernels": len(kernels)}
    # ember's own reader agrees with this one.
    (ours,) = rocm_aot.inspect_code_objects(f"{path}/model.so")
    assert ours.arch == arch and set(ours.kernels) == kernels and ours.code_object_version == 5


def test_llvm_readelf_agrees(artifacts, tmp_path):
    readelf = elf.tool("llvm-readelf-16", "llvm-readelf")
    if readelf is None:
        pytest.skip("llvm-readelf is not installed")
    import subprocess

    lib = open(f"{artifacts['mlp-gfx942']}/model.so", "rb").read()
    co = tmp_path / "kernels.hsaco"
    co.write_bytes(_code_objects(lib)[0])
    out = subprocess.run([readelf, "-h", "--notes", str(co)], capture_output=True, text=True).stdout
    assert "EM_AMDGPU" in out and "amdhsa.kernels" in out


def test_gfx90a_code_disassembles_to_amdgpu_instructions(artifacts, tmp_path):
    """LLVM 14's objdump knows gfx90a (not gfx942): every kernel disassembles, ends in s_endpgm, and does math."""
    import subprocess

    objdump = elf.tool("llvm-objdump-16", "llvm-objdump")
    if objdump is None:
        pytest.skip("llvm-objdump is not installed")
    with open(f"{artifacts['cnn-gfx90a']}/model.so", "rb") as f:
        co = _code_objects(f.read())[0]
    path = tmp_path / "cnn.hsaco"
    path.write_bytes(co)
    res = subprocess.run([objdump, "-d", "--mcpu=gfx90a", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    dis = res.stdout
    kernels = {s[:-3] for s in elf.defined_symbols(co) if s.endswith(".kd")}
    listed = set(re.findall(r"^[0-9a-f]+ <(\w+)>:$", dis, re.M))
    assert kernels <= listed, sorted(kernels - listed)
    assert dis.count("s_endpgm") >= len(kernels)
    assert re.search(r"\bv_(fma|fmac|pk_fma)_f32", dis) and "global_load" in dis and "global_store" in dis
    assert not re.search(r"<unknown>|invalid instruction", dis)


def test_wrong_arch_is_refused(artifacts):
    with pytest.raises(ArtifactError, match="not AMDGPU gfx90a"):
        rocm_aot.check_device_code(f"{artifacts['mlp-gfx942']}/model.so", "gfx90a", "rocm-gfx90a")


def test_code_object_v4_with_an_old_linker(tmp_path, monkeypatch):
    """Where only lld 14 exists, ember emits v4 with the v4 device-library ABI (forced here by the env var)."""
    monkeypatch.setenv("EMBER_ROCM_CODE_OBJECT", "4")
    path = _export(seeded(MLP), (torch.randn(2, 32),), "rocm-gfx942", tmp_path / "v4")
    (co,) = rocm_aot.inspect_code_objects(f"{path}/model.so")
    assert co.code_object_version == 4 and co.arch == "gfx942"
    assert json.load(open(f"{path}/manifest.json"))["target"]["gpu"]["code_object_version"] == 4
    assert rocm_aot.max_code_object_version(14) == 4 and rocm_aot.max_code_object_version(16) == 5


def test_missing_tools_are_clear_errors(monkeypatch):
    from ember.compiler.targets import resolve

    _, tgt = resolve("rocm-gfx942")
    monkeypatch.setattr(rocm_aot, "find_lld", lambda: [])
    with pytest.raises(TargetError, match="lld-16"):
        rocm_aot.plan(tgt, "rocm-gfx942")
    monkeypatch.setattr(rocm_aot, "find_bitcode_dir", lambda: None)
    with pytest.raises(TargetError, match="rocm-device-libs"):
        rocm_aot.plan(tgt, "rocm-gfx942")
    monkeypatch.setenv("EMBER_ROCM_CODE_OBJECT", "6")
    monkeypatch.setattr(rocm_aot, "find_bitcode_dir", lambda: "/x")
    monkeypatch.setattr(rocm_aot, "find_lld", lambda: [("/usr/bin/ld.lld", 16)])
    with pytest.raises(TargetError, match="use 4 or 5"):
        rocm_aot.plan(tgt, "rocm-gfx942")


def test_tvm_callbacks_are_restored():
    """The build environment swaps TVM's process-wide ROCm callbacks only for the duration of a build."""
    import tvm_ffi

    from ember.compiler.targets import resolve

    _, tgt = resolve("rocm-gfx942")
    with rocm_aot.rocm_build_environment(tgt, "rocm-gfx942") as build:
        libs = [str(p) for p in tvm_ffi.get_global_func("tvm_callback_rocm_bitcode_path")()]
        assert any(p.endswith("ember_code_object_v5.ll") for p in libs)
        assert any(p.endswith("oclc_abi_version_500.bc") for p in libs)
    libs = [str(p) for p in tvm_ffi.get_global_func("tvm_callback_rocm_bitcode_path")(build.bitcode_dir)]
    assert libs and not any("ember_code_object" in p for p in libs)  # TVM's own list again

import pytest

from ember.compiler.targets import TARGETS, required_cpu_flags, resolve, target_arch
from ember.errors import TargetError


def test_host_is_this_cpu_with_all_cores():
    from tvm.target import codegen

    name, t = resolve("host")
    assert name == "host" and str(t.kind.name) == "llvm"
    assert str(t.attrs["mcpu"]) == str(codegen.llvm_get_system_cpu())
    assert int(t.attrs["num-cores"]) >= 1
    assert target_arch(t) in ("x86_64", "aarch64")


def test_named_targets_resolve():
    for name in TARGETS:
        n, t = resolve(name)
        assert n == name
    _, cuda = resolve("cuda-sm90")
    assert str(cuda.attrs["arch"]) == "sm_90a" and target_arch(cuda) == "x86_64"
    assert "avx512f" in required_cpu_flags(resolve("x86-avx512")[1])
    assert "avx512f" not in required_cpu_flags(resolve("x86-avx2")[1])
    assert {"avx2", "fma"} <= set(required_cpu_flags(resolve("x86-avx2")[1]))


def test_unknown_target():
    with pytest.raises(TargetError, match="unknown target 'gpu'"):
        resolve("gpu")
    with pytest.raises(TargetError, match="invalid TVM target"):
        resolve({"kind": "no-such-kind"})


def test_rocm_arm_metal_targets():
    from ember.compiler.targets import describe, target_os

    _, gfx942 = resolve("rocm-gfx942")
    assert str(gfx942.kind.name) == "rocm" and str(gfx942.attrs["mcpu"]) == "gfx942"
    assert target_arch(gfx942) == "x86_64" and target_os(gfx942) == "linux"
    assert str(resolve("rocm-gfx90a")[1].attrs["mcpu"]) == "gfx90a"
    _, arm = resolve("arm64")
    assert str(arm.attrs["mtriple"]) == "aarch64-linux-gnu" and target_arch(arm) == "aarch64"
    assert required_cpu_flags(arm) == ["asimd"]
    assert required_cpu_flags(resolve("arm64-dotprod")[1]) == ["asimd", "asimddp"]
    assert int(arm.attrs["num-cores"]) == 4  # cross target: a fixed count, not this machine's
    _, mtl = resolve("metal")
    assert str(mtl.kind.name) == "metal" and int(mtl.attrs["thread_warp_size"]) == 32
    assert (target_arch(mtl), target_os(mtl)) == ("aarch64", "darwin")
    assert "arm64-apple-macos" in str(mtl.host)
    lines = describe()
    for name in ("rocm-gfx90a", "rocm-gfx942", "arm64", "arm64-dotprod", "metal"):
        assert any(line.split()[0] == name for line in lines)


def test_cli_lists_every_target():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "ember.cli", "targets"], capture_output=True, text=True,
                         timeout=300).stdout
    for name in TARGETS:
        assert any(line.split()[0] == name for line in out.splitlines() if line.strip()), name


def test_cross_linking_needs_its_tools(monkeypatch):
    from ember.compiler import cross

    monkeypatch.setattr(cross, "this_machine", lambda: ("x86_64", "linux"))
    assert cross.fcompile_for({"name": "host", "arch": "x86_64", "os": "linux"}) is None
    monkeypatch.setattr(cross, "find_aarch64_cxx", lambda: None)
    with pytest.raises(TargetError, match="g\\+\\+-aarch64-linux-gnu"):
        cross.fcompile_for({"name": "arm64", "arch": "aarch64", "os": "linux"})
    monkeypatch.setattr(cross, "find_ld64", lambda: None)
    with pytest.raises(TargetError, match="lld-16"):
        cross.fcompile_for({"name": "metal", "arch": "aarch64", "os": "darwin"})
    monkeypatch.setattr(cross, "this_machine", lambda: ("aarch64", "linux"))
    with pytest.raises(TargetError, match="cannot link a library for x86_64 linux"):
        cross.fcompile_for({"name": "rocm-gfx942", "arch": "x86_64", "os": "linux"})

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

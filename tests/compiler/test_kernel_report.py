"""The kernel report: its counts match the kernels the compiled VM program really calls, its baseline matches a
compile with ember's fusion off, its bytes follow the buffer shapes, and `ember inspect --kernels` prints it."""

import re
import subprocess
import sys

import pytest
import torch
from models import TinyTransformer, seeded

from ember.compiler.build import compile_model


def _vm_kernel_calls(cm):
    """Kernel calls in the executable's VM bytecode, in order: every ``call NAME`` that is not a VM builtin."""
    text = cm._executable.as_text()
    calls = re.findall(r"^\s*call\s+(\S+)\s+in:", text, flags=re.M)
    return [c for c in calls if not c.startswith("vm.")]


@pytest.fixture(scope="module")
def tiny():
    m = seeded(TinyTransformer)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 16, dtype=torch.int64)
    return m, ids, mask, compile_model(m, (ids, mask)), compile_model(m, (ids, mask), fusion=False)


def test_report_matches_compiled_module(tiny):
    _, _, _, fused, _ = tiny
    report = fused.manifest["kernels"]["ember"]
    calls = _vm_kernel_calls(fused)
    assert calls, "the VM program calls no kernel: the bytecode parsing is broken"
    assert report["launches"] == len(calls)
    assert {k["name"] for k in report["kernels"]} == set(calls)
    for k in report["kernels"]:
        assert k["calls"] == calls.count(k["name"]), k["name"]


def test_baseline_matches_a_compile_with_fusion_off(tiny):
    _, _, _, fused, plain = tiny
    base = fused.manifest["kernels"]["tvm_default"]
    calls = _vm_kernel_calls(plain)
    assert base["launches"] == len(calls) == plain.manifest["kernels"]["ember"]["launches"]
    assert plain.manifest["kernels"]["fusion"] is False
    # and ember's fusion launches fewer kernels and moves fewer bytes than TVM's default on this transformer
    ours = fused.manifest["kernels"]["ember"]
    assert ours["launches"] < base["launches"] and ours["bytes"] < base["bytes"]


def test_bytes_and_ops_follow_the_shapes(tiny):
    _, _, _, fused, _ = tiny
    kernels = {k["name"]: k for k in fused.manifest["kernels"]["ember"]["kernels"]}
    att = kernels["fused_attention"]
    # q, k, v and the output: (2, 16, 4, 16) float32; the key-padding mask (2, 1, 1, 16) float32
    assert att["bytes_per_call"] == 4 * (4 * 2 * 16 * 4 * 16 + 2 * 16)
    assert att["ops"] == ["matmul(q,k)", "multiply(scale)", "add(mask)", "softmax", "matmul(p,v)"]
    gelu = [k for k in kernels.values() if "gelu" in k["ops"]]
    # (ember.passes.layout may have turned the matmul into packed_dense: still a matmul kernel)
    assert gelu and all("matmul" in k["ops"] or "packed_dense" in k["ops"] for k in gelu), (
        "GELU is not fused into its matmul")
    totals = fused.manifest["kernels"]["ember"]
    assert totals["bytes"] == sum(k["calls"] * k["bytes_per_call"] for k in totals["kernels"])


def test_inspect_kernels_cli(tiny, tmp_path):
    _, _, _, fused, _ = tiny
    art = fused.export(tmp_path / "tiny")
    res = subprocess.run([sys.executable, "-m", "ember.cli", "inspect", str(art), "--kernels"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    report = fused.manifest["kernels"]
    assert f"kernels launched per inference: {report['ember']['launches']}" in res.stdout
    assert f"TVM default pipeline:           {report['tvm_default']['launches']}" in res.stdout
    assert "fewer launches" in res.stdout
    assert "fused_attention: matmul(q,k) + multiply(scale) + add(mask) + softmax + matmul(p,v)" in res.stdout

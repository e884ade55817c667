"""The ember command line, run as a user runs it (subprocess of the installed entry point's module)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from models import MLP, seeded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ember_cli(*args, check=True):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "ember.cli", *map(str, args)], capture_output=True, text=True,
                         env=env, timeout=600)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model = seeded(MLP)
    path = d / "mlp.onnx"
    torch.onnx.export(model, (torch.randn(2, 32),), str(path), input_names=["features"], output_names=["logp"],
                      dynamic_axes={"features": {0: "batch"}}, opset_version=17, dynamo=False)
    return model, path


def test_help_for_every_command():
    out = ember_cli("--help").stdout
    for cmd in ("compile", "run", "bench", "inspect", "targets", "demo"):
        assert cmd in out
        sub = ember_cli(cmd, "--help").stdout
        assert "usage: ember " + cmd in sub


def test_compile_run_bench_inspect(onnx_model, tmp_path):
    model, path = onnx_model
    art = tmp_path / "mlp.ember"
    out = ember_cli("compile", path, "-o", art).stdout
    assert "input  features: float32[batch, 32]" in out and "output logp: float32[batch, 10]" in out
    x = np.random.default_rng(0).standard_normal((3, 32)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    ember_cli("run", art, "--input", f"features={tmp_path / 'x.npy'}", "-o", tmp_path / "y.npz")
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["logp"], ref, rtol=1e-4, atol=1e-5)
    res = ember_cli("bench", art, "--dim", "batch=4", "--repeat", "5", "--json")
    assert json.loads(res.stdout.strip().splitlines()[-1])["runs"] >= 5
    info = ember_cli("inspect", art).stdout
    assert "target        host" in info and "features: float32['batch', 32]" in info
    manifest = json.loads(ember_cli("inspect", art, "--json").stdout)
    assert manifest["inputs"][0]["shape"] == ["batch", 32]
    # an existing artifact is not replaced without --force
    again = ember_cli("compile", path, "-o", art, check=False)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    ember_cli("compile", path, "-o", art, "--force")


def test_cli_errors_are_one_clear_line(tmp_path):
    res = ember_cli("compile", tmp_path / "missing.onnx", "-o", tmp_path / "o", check=False)
    assert res.returncode == 2 and "missing.onnx: no such file" in res.stderr and "Traceback" not in res.stderr
    res = ember_cli("run", tmp_path / "nope", "--input", "x=y.npy", check=False)
    assert res.returncode == 2 and "no such artifact" in res.stderr
    res = ember_cli("compile", tmp_path / "missing.onnx", "-o", tmp_path / "o", "--target", "nope", check=False)
    assert res.returncode == 2 and "unknown target 'nope'" in res.stderr


def test_targets_lists_host_and_cuda():
    out = ember_cli("targets").stdout
    assert "host" in out and "cuda-sm90" in out

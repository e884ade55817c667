"""The C++ example app (examples/cpp) built with cmake against the installed wheels, run on real artifacts.

Checks what a user of the README's "Embedding in your app" section does: `ember embed-info`, cmake, run the
binary on .npy inputs, and get torch's outputs — for a static artifact, a dynamic-batch artifact at two batch
sizes, and a model with two inputs (one int64) and two outputs fed by name in a different order.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import assert_close
from models import MLP, seeded
from torch import nn

import ember
from ember.runtime.embed import embed_info

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CXX = next((c for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c and shutil.which(c)), None)

pytestmark = [
    pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed (apt-get install cmake)"),
    pytest.mark.skipif(CXX is None, reason="no C++ compiler (c++, g++ or clang++) is installed"),
]


class TwoHeads(nn.Module):
    """Two inputs (float32 features, int64 token ids) and two outputs: exercises names, int64 and tuples."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.emb = nn.Embedding(50, 16)

    def forward(self, x, ids):
        h = self.fc(x) + self.emb(ids).mean(1)
        return h, torch.tanh(h).sum(-1)


def _run(*args, timeout=120):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ember_run(tmp_path_factory):
    """Configure and build examples/cpp with exactly the cmake commands `ember embed-info` prints."""
    build = tmp_path_factory.mktemp("cpp") / "build"
    info = embed_info()
    assert info.example_dir == os.path.join(ROOT, "examples", "cpp")
    configure, _ = info.cmake_commands(str(build))
    res = subprocess.run(configure + f" -DCMAKE_CXX_COMPILER={shutil.which(CXX)}", shell=True,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    res = _run("nice", "-n", "5", "cmake", "--build", build, "-j", "2", timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    exe = build / "ember_run"
    assert exe.exists()
    return exe


@pytest.fixture(scope="module")
def mlp_artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlp")
    model = seeded(MLP)
    x = torch.randn(4, 32)
    static = ember.compile(model, (x,)).export(d / "static")
    dynamic = ember.compile(model, (x,), dynamic_batch=True).export(d / "dynamic")
    return model, static, dynamic


def _outputs(out_dir, names):
    return [np.load(os.path.join(out_dir, f"{n}.npy")) for n in names]


@pytest.mark.slow
def test_static_mlp_matches_torch(ember_run, mlp_artifacts, tmp_path):
    model, static, _ = mlp_artifacts
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "x.npy", x.numpy())
    res = _run(ember_run, static, "--input", f"x={tmp_path / 'x.npy'}", "--output-dir", tmp_path,
               "--repeat", "5", "--min-seconds", "0")
    assert res.returncode == 0, res.stderr
    assert "output output0: float32[4, 10]" in res.stdout and "latency: median" in res.stdout
    with torch.no_grad():
        ref = model(x).numpy()
    (out,) = _outputs(tmp_path, ["output0"])
    assert_close(out, ref, what="C++ MLP output")


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 13])
def test_dynamic_batch_mlp_two_sizes(ember_run, mlp_artifacts, tmp_path, batch):
    model, _, dynamic = mlp_artifacts
    x = torch.randn(batch, 32, generator=torch.Generator().manual_seed(batch))
    np.save(tmp_path / "x.npy", x.numpy())
    res = _run(ember_run, dynamic, "--input", f"x={tmp_path / 'x.npy'}", "--output-dir", tmp_path,
               "--repeat", "3", "--min-seconds", "0", "--json")
    assert res.returncode == 0, res.stderr
    timing = json.loads(res.stdout.strip().splitlines()[-1])
    assert timing["runs"] >= 3 and timing["median_ms"] > 0
    with torch.no_grad():
        ref = model(x).numpy()
    (out,) = _outputs(tmp_path, ["output0"])
    assert out.shape == (batch, 10)
    assert_close(out, ref, what=f"C++ dynamic MLP output at batch {batch}")


@pytest.mark.slow
def test_random_inputs_take_dim_sizes(ember_run, mlp_artifacts, tmp_path):
    _, _, dynamic = mlp_artifacts
    res = _run(ember_run, dynamic, "--dim", "batch=8", "--repeat", "2", "--min-seconds", "0", "--output-dir", tmp_path)
    assert res.returncode == 0, res.stderr
    assert "input  x: float32[8, 32] random" in res.stdout
    assert np.load(tmp_path / "output0.npy").shape == (8, 10)


@pytest.mark.slow
def test_cpu_threads_default_to_physical_cores(ember_run, mlp_artifacts):
    """Without TVM_NUM_THREADS, TVM's pool would take hardware_concurrency()/2 (1 thread on a 2-core VM without
    SMT); ember_run's loader sets the physical-core count as `import ember` does. A user's setting wins."""
    from ember.cpu_threads import physical_cores

    static = mlp_artifacts[1]
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    for extra, want in (({}, physical_cores()), ({"TVM_NUM_THREADS": "1"}, 1)):
        res = subprocess.run([str(ember_run), str(static), "--repeat", "1", "--min-seconds", "0", "--json"],
                             capture_output=True, text=True, timeout=120, env={**env, **extra})
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout.strip().splitlines()[-1])["cpu_threads"] == want, (extra, res.stdout)


@pytest.mark.slow
def test_eight_cpp_threads_share_one_model(ember_run, tmp_path):
    """C++: one Model (library + weights) shared by 8 threads, one Session (VM) each, all results right."""
    torch.manual_seed(0)
    model = TwoHeads().eval()
    x, ids = torch.randn(2, 8), torch.randint(0, 50, (2, 5))
    art = ember.compile(model, (x, ids), dynamic_batch=True).export(tmp_path / "a")
    res = _run(ember_run, art, "--dim", "batch=5", "--threads", "8", "--iterations", "50", "--repeat", "1",
               "--min-seconds", "0")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "8 threads x 50 runs, one Session each over the shared Model: all outputs equal" in res.stdout


@pytest.mark.slow
def test_two_inputs_by_name_int64_and_tuple_outputs(ember_run, tmp_path):
    torch.manual_seed(0)
    model = TwoHeads().eval()
    x, ids = torch.randn(3, 8), torch.randint(0, 50, (3, 5))
    art = ember.compile(model, (x, ids), dynamic_batch=True, output_names=["hidden", "score"]).export(tmp_path / "a")
    x, ids = torch.randn(6, 8), torch.randint(0, 50, (6, 5))
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "ids.npy", ids.numpy())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # Given out of order on the command line: the app must place them by name.
    res = _run(ember_run, art, "--input", f"ids={tmp_path / 'ids.npy'}", "--input", f"x={tmp_path / 'x.npy'}",
               "--output-dir", out_dir, "--repeat", "2", "--min-seconds", "0")
    assert res.returncode == 0, res.stderr
    with torch.no_grad():
        ref_h, ref_s = model(x, ids)
    hidden, score = _outputs(out_dir, ["hidden", "score"])
    assert_close(hidden, ref_h.numpy(), what="hidden")
    assert_close(score, ref_s.numpy(), what="score")


@pytest.mark.slow
def test_bad_inputs_are_clear_errors(ember_run, mlp_artifacts, tmp_path):
    _, static, dynamic = mlp_artifacts
    np.save(tmp_path / "x3.npy", np.zeros((3, 32), np.float32))
    np.save(tmp_path / "xi.npy", np.zeros((4, 32), np.int64))
    cases = [
        ((static, "--input", f"x={tmp_path / 'x3.npy'}"), "dimension 0 must be 4"),
        ((dynamic, "--input", f"x={tmp_path / 'xi.npy'}"), "must be float32, got int64"),
        ((dynamic, "--input", f"nope={tmp_path / 'x3.npy'}"), "no input of that name (inputs: x)"),
        ((dynamic, "--device", "cuda"), "runs on 'cpu'"),
        ((tmp_path, ), "no manifest.json"),
        ((dynamic, "--dim", "batch=0"), "SIZE must be >= 1"),
    ]
    for args, message in cases:
        res = _run(ember_run, *args)
        assert res.returncode == 1, (args, res.stdout, res.stderr)
        assert message in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)


@pytest.mark.slow
def test_truncated_params_refused(ember_run, mlp_artifacts, tmp_path):
    _, static, _ = mlp_artifacts
    broken = tmp_path / "broken"
    shutil.copytree(static, broken)
    with open(broken / "params.bin", "r+b") as f:
        f.truncate(100)
    res = _run(ember_run, broken)
    assert res.returncode == 1 and "truncated" in res.stderr, res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("field,value,message", [
    ("os", "darwin", "compiled for darwin"),
    ("arch", "aarch64", "compiled for aarch64 CPUs"),
    ("cpu_flags", ["avx512_not_a_real_flag"], "CPU features this CPU lacks (avx512_not_a_real_flag)"),
])
def test_artifact_for_another_machine_refused(ember_run, mlp_artifacts, tmp_path, field, value, message):
    """Refused before the library is loaded, as ember.load refuses it (no 'Illegal instruction')."""
    _, static, _ = mlp_artifacts
    other = tmp_path / "other"
    shutil.copytree(static, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["target"][field] = value
    (other / "manifest.json").write_text(json.dumps(manifest))
    res = _run(ember_run, other)
    assert res.returncode == 1 and message in res.stderr, res.stderr


def test_embed_info_cli():
    res = _run(sys.executable, "-m", "ember.cli", "embed-info")
    assert res.returncode == 0, res.stderr
    for needle in ("include dirs", "library dirs", "-ltvm_runtime", "cmake -S", "-DTVM_ROOT=", "c++ -std=c++17"):
        assert needle in res.stdout, needle
    res = _run(sys.executable, "-m", "ember.cli", "embed-info", "--json")
    info = json.loads(res.stdout)
    for d in info["include_dirs"]:
        assert os.path.isfile(os.path.join(d, "tvm", "ffi", "function.h"))
        assert os.path.isfile(os.path.join(d, "dlpack", "dlpack.h"))
    assert all(os.path.isfile(f) for f in info["library_files"])
    assert {"tvm_runtime", "tvm_ffi"} == set(info["libraries"])


@pytest.mark.slow
def test_printed_compile_line_builds_a_working_app(mlp_artifacts, tmp_path):
    """The one-line compile command (no cmake) from `ember embed-info` produces a binary that runs."""
    _, _, dynamic = mlp_artifacts
    info = embed_info()
    exe = tmp_path / "app"
    line = info.compile_line(output=str(exe)).replace("c++ ", f"nice -n 5 {shutil.which(CXX)} ", 1)
    res = subprocess.run(line, shell=True, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    res = _run(exe, dynamic, "--dim", "batch=2", "--repeat", "1", "--min-seconds", "0")
    assert res.returncode == 0 and "float32[2, 10]" in res.stdout, res.stderr

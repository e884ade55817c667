"""arm64 artifacts, cross-compiled here and run under qemu-aarch64 with the aarch64 TVM runtime from PyPI.

The runner is the C++ embedding example, examples/cpp (`ember_run`, TVM's runtime only) -- the very source users
build on x86 -- cross-built with aarch64-linux-gnu-g++ against libtvm_runtime.so / libtvm_ffi.so and headers of the
aarch64 wheels (apache-tvm, apache-tvm-ffi, fetched once with
`pip download` into ~/.cache/ember/aarch64). Outputs must match the x86 build of the same model and PyTorch.
Needs Debian's g++-aarch64-linux-gnu and qemu-user (`make sysdeps`); skips otherwise.
"""

import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import elf
from conftest import assert_close
from models import CNN, MLP, TinyTransformer, randomize_bn, seeded

HERE = os.path.dirname(os.path.abspath(__file__))
CXX = elf.tool("aarch64-linux-gnu-g++")
QEMU = elf.tool("qemu-aarch64", "qemu-aarch64-static")
OBJDUMP = elf.tool("aarch64-linux-gnu-objdump")
SYSROOT = "/usr/aarch64-linux-gnu"
WHEELS = {"apache-tvm": "0.27.0.post1", "apache-tvm-ffi": "0.1.14.post0"}

pytestmark = pytest.mark.skipif(
    CXX is None or QEMU is None or OBJDUMP is None,
    reason="aarch64 cross tools missing: run `make sysdeps` (apt-get install g++-aarch64-linux-gnu qemu-user)")


def _cache() -> str:
    root = os.environ.get("EMBER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ember")
    return os.path.join(root, "aarch64")


@pytest.fixture(scope="module")
def aarch64_runtime():
    """Folder with tvm/lib/libtvm_runtime.so, tvm_ffi/lib/libtvm_ffi.so and tvm_ffi/include for aarch64."""
    cache = _cache()
    root = os.path.join(cache, "root")
    runtime = os.path.join(root, "tvm", "lib", "libtvm_runtime.so")
    if not os.path.isfile(runtime):
        os.makedirs(cache, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.11", "-d", cache,
               *[f"--platform=manylinux_2_{v}_aarch64" for v in (17, 24, 27, 28)],
               *[f"{name}=={ver}" for name, ver in WHEELS.items()]]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            pytest.skip(f"the aarch64 TVM wheels could not be downloaded: {res.stderr.strip()[-300:]}")
        for whl in os.listdir(cache):
            if not whl.endswith(".whl"):
                continue
            with zipfile.ZipFile(os.path.join(cache, whl)) as z:
                for member in z.namelist():
                    if member.startswith(("tvm/lib/libtvm_runtime.so", "tvm_ffi/lib/libtvm_ffi.so",
                                          "tvm_ffi/include/")):
                        z.extract(member, root)
    return root


@pytest.fixture(scope="module")
def runner(aarch64_runtime, tmp_path_factory):
    """examples/cpp's ember_run, cross-built for aarch64."""
    exe = str(tmp_path_factory.mktemp("runner") / "ember_run")
    r = aarch64_runtime
    src = os.path.join(HERE, "..", "..", "examples", "cpp")
    res = subprocess.run([CXX, "-std=c++17", "-O1", f"-I{r}/tvm_ffi/include", "-o", exe,
                          *(os.path.join(src, f) for f in ("main.cc", "ember_model.cc", "npy.cc")),
                          f"-L{r}/tvm_ffi/lib", f"-L{r}/tvm/lib", "-ltvm_ffi", "-ltvm_runtime", "-lpthread",
                          f"-Wl,-rpath-link,{r}/tvm_ffi/lib"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return exe


def run_on_aarch64(runner, runtime, artifact, inputs, tmp_path) -> list[np.ndarray]:
    """Run the artifact with ember_run under qemu: inputs by name from .npy files, outputs read back by name."""
    import json

    manifest = json.load(open(f"{artifact}/manifest.json"))
    args = []
    for spec, x in zip(manifest["inputs"], inputs):
        path = str(tmp_path / f"in_{spec['name']}.npy")
        np.save(path, np.ascontiguousarray(x))
        args += ["--input", f"{spec['name']}={path}"]
    out_dir = tmp_path / "outputs"
    out_dir.mkdir(exist_ok=True)
    env = dict(os.environ, QEMU_LD_PREFIX=SYSROOT,
               QEMU_SET_ENV=f"LD_LIBRARY_PATH={runtime}/tvm/lib:{runtime}/tvm_ffi/lib")
    res = subprocess.run([QEMU, runner, str(artifact), *args, "--output-dir", str(out_dir),
                          "--warmup", "0", "--repeat", "1", "--min-seconds", "0"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, f"aarch64 run failed: {res.stdout}\n{res.stderr[-2000:]}"
    return [np.load(out_dir / f"{spec['name']}.npy") for spec in manifest["outputs"]]


def _transformer_inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (2, 16), generator=g)
    mask = torch.ones(2, 16, dtype=torch.int64)
    mask[0, 11:] = 0
    return ids, mask


CASES = {
    "mlp": (lambda: seeded(MLP), lambda: (torch.randn(4, 32, generator=torch.Generator().manual_seed(1)),)),
    "cnn": (lambda: randomize_bn(seeded(CNN)),
            lambda: (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)),
    "transformer": (lambda: seeded(TinyTransformer), _transformer_inputs),
}


@pytest.mark.slow
@pytest.mark.parametrize("case,target", [("mlp", "arm64"), ("cnn", "arm64"), ("transformer", "arm64-dotprod")])
def test_runs_under_qemu_like_x86(case, target, runner, aarch64_runtime, tmp_path):
    import ember

    model, inputs = CASES[case][0](), CASES[case][1]()
    art = ember.compile(model, inputs, target=target).export(tmp_path / "art")
    with open(f"{art}/model.so", "rb") as f:
        h = elf.header(f.read())
    assert h["machine"] == 183  # EM_AARCH64
    arm = run_on_aarch64(runner, aarch64_runtime, art, [x.numpy() for x in inputs], tmp_path)
    x86 = ember.compile(model, inputs, target="host")(*[x.numpy() for x in inputs])
    x86 = list(x86) if isinstance(x86, tuple) else [x86]
    with torch.no_grad():
        ref = model(*inputs)
    assert len(arm) == len(x86) == 1
    assert_close(arm[0], x86[0], rtol=1e-4, atol=1e-5, what=f"{case} aarch64 vs x86")
    assert_close(arm[0], ref.numpy(), rtol=1e-4, atol=1e-5, what=f"{case} aarch64 vs torch")


def _vector_counts(disassembly: str) -> dict[str, int]:
    """Per function, how many instructions use NEON vector registers with a lane arrangement (v0.4s, v1.8h...)."""
    counts, name = {}, None
    for line in disassembly.splitlines():
        m = re.match(r"[0-9a-f]+ <(.+)>:$", line)
        if m:
            name = m.group(1)
            counts.setdefault(name, 0)
        elif name and re.search(r"\bv\d+\.(16b|8b|8h|4h|4s|2s|2d)\b", line):
            counts[name] += 1
    return counts


def test_hot_kernels_use_neon(tmp_path):
    """arm64 code is cross-compiled with NEON: the matmul and conv kernels are vectorized (fmla on v-registers)."""
    import ember

    model, inputs = CASES["cnn"][0](), CASES["cnn"][1]()
    art = ember.compile(model, inputs, target="arm64").export(tmp_path / "art")
    dis = subprocess.run([OBJDUMP, "-d", f"{art}/model.so"], capture_output=True, text=True, check=True).stdout
    counts = _vector_counts(dis)
    hot = {n: c for n, c in counts.items() if re.search(r"conv|matmul|dense", n) and n.endswith("compute_")}
    assert hot, f"no conv/matmul kernels found among {sorted(counts)}"
    scalar = [n for n, c in hot.items() if c == 0]
    assert not scalar, f"hot kernels without NEON vector instructions: {scalar}"
    assert re.search(r"\bfmla\s+v\d+\.4s", dis), "no 4-lane fused multiply-add (fmla v.4s) anywhere"


def test_manifest_and_loader_refuse_on_x86(tmp_path):
    """The manifest names aarch64 Linux and NEON; ember.load on this x86 machine refuses it with a sentence."""
    import json
    import platform

    import ember
    from ember.errors import ArtifactError

    model, inputs = CASES["mlp"][0](), CASES["mlp"][1]()
    art = ember.compile(model, inputs, target="arm64-dotprod").export(tmp_path / "art")
    tgt = json.load(open(f"{art}/manifest.json"))["target"]
    assert (tgt["name"], tgt["arch"], tgt["os"], tgt["device"]) == ("arm64-dotprod", "aarch64", "linux", "cpu")
    assert tgt["cpu_flags"] == ["asimd", "asimddp"]
    if platform.machine() in ("x86_64", "AMD64"):
        with pytest.raises(ArtifactError, match="aarch64"):
            ember.load(art)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("EMBER_SLOW_TARGETS") != "1",
                    reason="MiniLM on aarch64 takes ~1.5 min (compile + qemu): set EMBER_SLOW_TARGETS=1")
def test_minilm_runs_under_qemu(minilm, runner, aarch64_runtime, tmp_path):
    """The real all-MiniLM-L6-v2 on real sentences, cross-compiled for arm64, equals PyTorch and the x86 build."""
    import ember

    encoder, tokenizer, sentences = minilm
    batch = tokenizer(sentences[:2], padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    args = (batch["input_ids"], batch["attention_mask"])
    art = ember.compile(encoder, args, target="arm64").export(tmp_path / "art")
    (arm,) = run_on_aarch64(runner, aarch64_runtime, art, [a.numpy() for a in args], tmp_path)
    with torch.no_grad():
        ref = encoder(*args)
    ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).numpy()
    x86 = ember.compile(encoder, args, target="host")(*[a.numpy() for a in args])
    assert_close(arm, ref, rtol=1e-4, atol=1e-5, what="MiniLM aarch64 vs torch")
    assert_close(arm, x86, rtol=1e-4, atol=1e-5, what="MiniLM aarch64 vs x86")

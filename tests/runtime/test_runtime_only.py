"""ember.load works with TVM's runtime library alone, with torch absent: what an app that ships artifacts has."""

import json
import os
import subprocess
import sys

import numpy as np
import torch
from models import TinyTransformer, seeded

import ember

# Runs in a fresh interpreter: torch is refused by a meta-path finder before anything imports it (tvm_ffi tries
# `import torch` whenever torch is installed), and TVM loads libtvm_runtime only.
CHILD = r"""
import importlib.abc, json, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is hidden in this test")
sys.meta_path.insert(0, NoTorch())
import numpy as np
import ember
m = ember.load(sys.argv[1])
args = [np.load(p) for p in sys.argv[2:4]]
np.save(sys.argv[4], m(*args))
import tvm.base
print(json.dumps({"torch": "torch" in sys.modules, "runtime_only": tvm.base._RUNTIME_ONLY,
                  "compiler_loaded": any(k.startswith(("tvm.relax", "tvm.s_tir", "ember.compiler"))
                                         for k in sys.modules)}))
"""


def test_load_without_torch_and_without_compiler(tmp_path):
    model = seeded(TinyTransformer)
    ids = torch.randint(0, 100, (3, 16))
    mask = torch.ones(3, 16, dtype=torch.int64)
    compiled = ember.compile(model, (ids, mask), dynamic_batch=True)
    art = compiled.export(tmp_path / "art")
    np.save(tmp_path / "ids.npy", ids.numpy())
    np.save(tmp_path / "mask.npy", mask.numpy())
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", CHILD, art, str(tmp_path / "ids.npy"), str(tmp_path / "mask.npy"),
                          str(tmp_path / "out.npy")], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info == {"torch": False, "runtime_only": True, "compiler_loaded": False}
    with torch.no_grad():
        ref = model(ids, mask).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), ref, rtol=1e-4, atol=1e-5)

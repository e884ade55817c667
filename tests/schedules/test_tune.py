"""Auto-tuning: a small matmul tuned for a handful of trials lands valid records in the database, compiling with
the database runs the tuned kernel and matches numpy, the database tolerates a torn last line, keeps one writer,
refuses another target's records, and a known candidate is reused instead of measured again. Bad configs raise
ConfigError. (The kill/resume and RPC tests are in test_tune_resume.py and test_tune_rpc.py.)
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import ember
from ember.errors import ConfigError, EmberError

# Search settings small enough for CI on 2 busy cores; the machinery exercised is the same as with the defaults.
FAST = {"population_size": 16, "genetic_num_iters": 1, "init_min_unmeasured": 8, "number": 2, "repeat": 1,
        "min_repeat_ms": 5}


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU()).eval(), torch.randn(16, 64)


def numpy_reference(model, x):
    w = model[0].weight.detach().numpy().astype(np.float64)
    b = model[0].bias.detach().numpy().astype(np.float64)
    return np.maximum(x.numpy().astype(np.float64) @ w.T + b, 0.0)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    from ember.schedules.tune import tune

    root = tmp_path_factory.mktemp("tuning")
    model, x = small_model()
    # No rule baseline here, so compile must take the tuned kernel whatever its speed (the numerics under test);
    # test_rules_win_where_faster covers the baseline.
    report = tune(model, "host", ember.Tuning(trials=8, trials_per_iter=4, database=str(root), seed=0,
                                              extra={**FAST, "skip_baseline": True}),
                  example_inputs=(x,), progress=False)
    return root, model, x, report


def _host():
    from ember.compiler.targets import resolve

    return resolve("host")[1]


@pytest.mark.slow
def test_tuning_writes_valid_records(tuned):
    from ember.schedules.tuning_db import RECORDS, TuningDatabase, database_dir

    root, _, _, report = tuned
    assert report.trials == 8 and report.measured == 8 and report.reused == 0
    assert report.valid >= 1, report.to_json()
    assert report.records_after == report.records_before + report.measured
    assert report.tasks[0].best_ms is not None and report.tasks[0].best_ms > 0
    path = database_dir(str(root), _host())
    lines = (path / RECORDS).read_text().splitlines()
    objs = [json.loads(line) for line in lines]  # every line is whole JSON
    assert sum("workload" in o for o in objs) == 1 and sum("record" in o for o in objs) == 8
    db = TuningDatabase(path)
    summary = db.summary()
    assert summary["records"] == 8 and summary["valid_records"] == report.valid and summary["torn_lines_ignored"] == 0
    assert len(db.measured) == report.valid  # each valid record remembers which candidate it measured


@pytest.mark.slow
def test_compile_with_database_uses_tuned_kernel_and_matches_numpy(tuned):
    root, model, x, _ = tuned
    cm = ember.compile(model, (x,), tuning=ember.Tuning(database=str(root), apply_only=True))
    info = cm.manifest["tuning"]
    assert info["tuned_kernels"] >= 1, info
    out = cm(x.numpy())
    ref = numpy_reference(model, x)
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.slow
def test_rules_win_where_faster(tuned, tmp_path):
    """A tuned kernel slower than ember's rule schedule (as timed at tuning) is not used; numerics unchanged."""
    from ember.schedules.tuning_db import TuningDatabase, database_dir

    root, model, x, _ = tuned
    src = database_dir(str(root), _host())
    shutil.copytree(src, tmp_path / src.name, ignore=shutil.ignore_patterns("writer.lock"))
    db = TuningDatabase(tmp_path / src.name, _host(), writable=True)
    wl = next(w for w in db.workloads if w is not None)
    assert db.tuned_wins(wl.mod)
    db.add_baseline(wl.mod, [1e-9])  # "the rules run in a nanosecond"
    assert not db.tuned_wins(wl.mod)
    db.close()
    cm = ember.compile(model, (x,), tuning=ember.Tuning(database=str(tmp_path), apply_only=True))
    assert cm.manifest["tuning"]["tuned_kernels"] == 0
    ref = numpy_reference(model, x)
    assert np.abs(cm(x.numpy()) - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.slow
def test_known_candidate_is_reused_not_measured(tuned):
    from tvm.s_tir import meta_schedule as ms

    from ember.schedules.tune import _REUSED, _ReuseBuilder, _ReuseRunner
    from ember.schedules.tuning_db import TuningDatabase, candidate_hash, database_dir

    root, _, _, _ = tuned
    db = TuningDatabase(database_dir(str(root), _host()))  # a fresh process's view: loaded from the file
    rec = next(r for r in db.get_all_tuning_records() if r.run_secs is not None)
    sch_mod = rec.as_measure_candidate().sch.mod
    key = candidate_hash(sch_mod)
    assert key in db.measured  # the hash written by the tuning run matches a replay of its trace

    class Boom:
        def build(self, inputs):
            raise AssertionError("a known candidate was sent to the builder")

        def run(self, inputs):
            raise AssertionError("a known candidate was sent to the runner")

    built = _ReuseBuilder(Boom(), db).build([ms.builder.BuilderInput(sch_mod, _host())])
    assert built[0].artifact_path == _REUSED + key
    fut = _ReuseRunner(Boom(), db).run([ms.runner.RunnerInput(built[0].artifact_path, "llvm", [])])
    assert [float(s) for s in fut[0].result().run_secs] == pytest.approx(db.measured[key])


@pytest.mark.slow
def test_torn_last_line_is_ignored_then_truncated(tuned, tmp_path):
    from ember.schedules.tuning_db import RECORDS, TuningDatabase, database_dir

    root, _, _, _ = tuned
    src = database_dir(str(root), _host())
    dst = tmp_path / src.name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("writer.lock"))
    whole = (dst / RECORDS).read_bytes()
    with open(dst / RECORDS, "ab") as fh:  # what a kill in the middle of a write leaves
        fh.write(b'{"record":0,"cand":"abc","tr":[[[],[]],[0.00')
    db = TuningDatabase(dst)
    assert len(db) == 8 and db.torn_lines == 1
    w = TuningDatabase(dst, _host(), writable=True)  # the next writer drops the torn tail before appending
    w.close()
    assert (dst / RECORDS).read_bytes() == whole
    assert TuningDatabase(dst).torn_lines == 0


@pytest.mark.slow
def test_one_writer_and_one_target_per_database(tuned):
    import tvm

    from ember.schedules.tuning_db import TuningDatabase, database_dir

    root, _, _, _ = tuned
    path = database_dir(str(root), _host())
    w = TuningDatabase(path, _host(), writable=True)
    try:
        with pytest.raises(EmberError, match="being written by another process"):
            TuningDatabase(path, _host(), writable=True)
    finally:
        w.close()
    other = tvm.target.Target({"kind": "llvm", "mcpu": "znver3", "num-cores": 2})
    with pytest.raises(ConfigError, match="holds records for target"):
        TuningDatabase(path, other, writable=True)


def test_bad_tuning_configs_raise_config_error(tmp_path):
    from ember.schedules.tune import tune

    for kwargs, field in [({"trials": 0}, "trials"), ({"trials": 2.5}, "trials"), ({}, "trials"),
                          ({"minutes": -1}, "minutes"), ({"apply_only": True}, "database"),
                          ({"apply_only": True, "database": "d", "trials": 3}, "trials"),
                          ({"trials": 3, "rpc_tracker": "localhost"}, "rpc_tracker"),
                          ({"trials": 3, "rpc_tracker": "h:9190"}, "device_key"),
                          ({"trials": 3, "device_key": "k"}, "rpc_tracker"),
                          ({"trials": 3, "builder": "magic"}, "builder"),
                          ({"trials": 3, "trials_per_iter": 0}, "trials_per_iter")]:
        with pytest.raises(ConfigError, match=rf"Tuning\.{field}="):
            ember.Tuning(**kwargs)
    model, x = small_model()
    with pytest.raises(ConfigError, match="tuning="):
        ember.compile(model, (x,), tuning={"trials": 3})
    with pytest.raises(ConfigError, match="apply_only"):
        tune(model, "host", ember.Tuning(database=str(tmp_path), apply_only=True), example_inputs=(x,))
    with pytest.raises(ConfigError, match="no records for target"):
        ember.compile(model, (x,), tuning=ember.Tuning(database=str(tmp_path / "empty"), apply_only=True))


def test_unreachable_tracker_is_a_clear_error(tmp_path):
    import socket

    from ember.schedules.tune import tune

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model, x = small_model()
    with pytest.raises(EmberError, match="cannot reach the RPC tracker"):
        tune(model, "host", ember.Tuning(trials=2, database=str(tmp_path), rpc_tracker=f"127.0.0.1:{port}",
                                         device_key="k"), example_inputs=(x,), progress=False)


@pytest.mark.slow
def test_compile_tunes_first_when_given_a_budget(tuned, tmp_path):
    """ember.compile(..., tuning=Tuning(trials=N, database=D)): tune (resuming D), then compile with D."""
    from ember.schedules.tuning_db import database_dir

    root, model, x, _ = tuned
    src = database_dir(str(root), _host())
    shutil.copytree(src, tmp_path / src.name, ignore=shutil.ignore_patterns("writer.lock"))
    cm = ember.compile(model, (x,), tuning=ember.Tuning(trials=4, trials_per_iter=4, database=str(tmp_path), seed=1,
                                                        extra={**FAST, "skip_baseline": True}))
    info = cm.manifest["tuning"]
    assert info["tuned_now"]["trials"] == 4 and info["tuned_now"]["records_before"] == 8
    assert info["records"] == 8 + info["tuned_now"]["measured"] and info["tuned_kernels"] == 1
    ref = numpy_reference(model, x)
    assert np.abs(cm(x.numpy()) - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.slow
def test_compact_keeps_the_best_records(tuned, tmp_path):
    from ember.schedules.tuning_db import TuningDatabase, compact, database_dir

    root, _, _, report = tuned
    src = database_dir(str(root), _host())
    summary = compact(src, tmp_path / "small", top_k=2)
    assert summary == {"records_before": 8, "records_after": min(2, report.valid)}
    small, full = TuningDatabase(tmp_path / "small"), TuningDatabase(src)
    wl = next(w for w in full.workloads if w is not None)
    assert len(small) == min(2, report.valid) and small.best_ms(wl.mod) == pytest.approx(full.best_ms(wl.mod))

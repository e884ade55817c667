"""A tuning run SIGKILLed mid-way leaves a database that loads, and a resumed run continues from it: no crash,
nothing measured twice, the torn tail (if any) dropped, every record of the killed run kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import ember

SCRIPT = r"""
import sys, torch, ember
from ember.schedules.tune import tune
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU()).eval()
x = torch.randn(16, 64)
fast = {"population_size": 16, "genetic_num_iters": 1, "init_min_unmeasured": 8, "number": 2, "repeat": 1,
        "min_repeat_ms": 5}
tune(model, "host", ember.Tuning(trials=400, trials_per_iter=4, database=sys.argv[1], seed=int(sys.argv[2]),
                                 extra=fast), example_inputs=(x,), progress=False)
"""


def _records(path):
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().split(b"\n"):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if "record" in obj:
            out.append(obj)
    return out


@pytest.mark.slow
def test_killed_tuning_run_loads_and_resumes(tmp_path):
    from ember.compiler.targets import resolve
    from ember.schedules.tune import tune
    from ember.schedules.tuning_db import RECORDS, TuningDatabase, database_dir

    from test_tune import FAST, small_model

    target = resolve("host")[1]
    path = database_dir(str(tmp_path), target) / RECORDS
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path), "0"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while len(_records(path)) < 4:  # a batch written: kill while the next is being searched/measured
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the tuning subprocess wrote no records in time"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its build/measure workers, mid-way
        proc.wait()
    with open(path, "ab") as fh:  # and as if the kill had landed inside a write
        fh.write(b'{"record":0,"cand":"0123","tr":[[[],[]],[1.0e-')

    before = TuningDatabase(path.parent)
    assert before.torn_lines == 1
    n_before = len(before)
    assert n_before >= 4
    killed_cands = [r["cand"] for r in _records(path) if r["cand"]]

    model, x = small_model()
    report = tune(model, "host", ember.Tuning(trials=8, trials_per_iter=4, database=str(tmp_path), seed=0,
                                              extra=FAST), example_inputs=(x,), progress=False)
    assert report.records_before == n_before
    assert report.trials == 8 and report.records_after == n_before + report.measured
    after = TuningDatabase(path.parent)
    assert after.torn_lines == 0 and len(after) == n_before + report.measured
    cands = [r["cand"] for r in _records(path) if r["cand"]]
    assert cands[:len(killed_cands)] == killed_cands  # the killed run's records are all still there, first
    assert len(cands) == len(set(cands)), "a candidate was measured twice"

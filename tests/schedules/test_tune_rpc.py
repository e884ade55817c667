"""Tuning through TVM's RPC tracker, on loopback: a tracker and two servers (subprocesses, as on real devices)
measure a small matmul's candidates; the records land in the database with valid times."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

import ember

KEY = "ember-test-cpu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_devices(port: int, n: int, procs, timeout: float = 120.0) -> None:
    from tvm import rpc

    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            assert p.poll() is None, f"an RPC process exited: {p.args}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            info = rpc.connect_tracker("127.0.0.1", port).summary().get("queue_info", {})
            if info.get(KEY, {}).get("free", 0) >= n:
                return
        except (OSError, RuntimeError):
            pass
        assert time.monotonic() < deadline, "RPC servers did not register with the tracker in time"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def tracker():
    port = _free_port()
    py = sys.executable
    procs = [subprocess.Popen([py, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
                               "--port-end", str(port + 1), "--silent"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(2):
            sp = _free_port()
            procs.append(subprocess.Popen([py, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port",
                                           str(sp), "--port-end", str(sp + 20), "--tracker", f"127.0.0.1:{port}",
                                           "--key", KEY, "--silent"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_for_devices(port, 2, procs)
        yield port
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.slow
def test_tuning_through_rpc_tracker_on_loopback(tracker, tmp_path):
    from ember.compiler.targets import resolve
    from ember.schedules.tune import tune
    from ember.schedules.tuning_db import TuningDatabase, database_dir

    from test_tune import FAST, small_model

    model, x = small_model()
    report = tune(model, "host", ember.Tuning(trials=4, trials_per_iter=4, database=str(tmp_path), seed=0,
                                              rpc_tracker=f"127.0.0.1:{tracker}", device_key=KEY, workers=2,
                                              extra=FAST), example_inputs=(x,), progress=False)
    assert report.measured == 4 and report.valid >= 1, report.to_json()
    assert report.tasks[0].rules_ms is not None  # the rule-schedule baseline was timed remotely too
    db = TuningDatabase(database_dir(str(tmp_path), resolve("host")[1]))
    assert len(db) == 4 and len(db.measured) == report.valid
    assert all(0 < s < 1.0 for secs in db.measured.values() for s in secs)


@pytest.mark.slow
def test_unknown_device_key_is_a_clear_error(tracker, tmp_path):
    from ember.schedules.tune import tune

    from test_tune import small_model

    model, x = small_model()
    with pytest.raises(ember.EmberError, match="no device registered under that key"):
        tune(model, "host", ember.Tuning(trials=2, database=str(tmp_path), rpc_tracker=f"127.0.0.1:{tracker}",
                                         device_key="no-such-device"), example_inputs=(x,), progress=False)

"""benchmarks/onnx_conformance.py on a few ONNX node test cases, run as a user would run it (a subprocess).

Checks the JSON report (counts add up, per-case records, machine and versions), and that ember passes the simplest
cases, so this test fails when ember's ONNX path breaks.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "onnx_conformance.py")
# Sorted by name these are abs, add, add_bcast, matmul_2d, relu, sigmoid; --limit 5 leaves sigmoid out.
FILTER = "^test_(abs|add|add_bcast|matmul_2d|relu|sigmoid)$"
EXPECTED = ["test_abs", "test_add", "test_add_bcast", "test_matmul_2d", "test_relu"]
HAVE_ORT = importlib.util.find_spec("onnxruntime") is not None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("onnx")
    out = tmp_path_factory.mktemp("conformance")
    engines = "ember,ort" if HAVE_ORT else "ember"
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, SCRIPT, "--filter", FILTER, "--limit", "5", "--jobs", "2", "--timeout", "120",
           "--engines", engines, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, f"script failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    path = out / "onnx_conformance.json"
    assert path.exists(), f"no JSON written:\n{proc.stdout}\n{proc.stderr}"
    with open(path) as f:
        data = json.load(f)
    data["_stdout"] = proc.stdout
    data["_engines"] = engines.split(",")
    return data


def test_selection_and_counts(report):
    names = [c["name"] for c in report["cases"]]
    assert names == EXPECTED  # --filter, then sorted by name, then --limit
    assert report["cases_selected"] == len(EXPECTED)
    assert report["cases_available"] > 1000
    for engine in report["_engines"]:
        s = report["summary"][engine]
        assert s["total"] == len(EXPECTED)
        assert s["pass"] + s["wrong"] + s["error"] == s["total"]
        statuses = [c["results"][engine]["status"] for c in report["cases"]]
        assert all(st in ("pass", "wrong", "error") for st in statuses)
        assert statuses.count("pass") == s["pass"] and statuses.count("error") == s["error"]
        assert sum(row["count"] for row in report["error_categories"][engine]) == s["error"]
        assert sum(sum(per_op[engine].values()) for per_op in report["by_op"].values()) == s["total"]


def test_records_and_metadata(report):
    by_name = {c["name"]: c for c in report["cases"]}
    assert by_name["test_add"]["op_type"] == "Add" and by_name["test_matmul_2d"]["op_type"] == "MatMul"
    for c in report["cases"]:
        for r in c["results"].values():
            assert {"status", "message", "max_abs_err", "seconds"} <= set(r)
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    assert report["versions"]["ember"] and report["versions"]["onnx"] and report["versions"]["tvm"]
    assert "onnx_conformance.py" in report["command"] and "--limit 5" in report["command"]
    assert report["date"]
    # the table is printed
    assert "engine" in report["_stdout"] and "ember" in report["_stdout"]


def test_ember_passes_simple_cases(report):
    failed = {c["name"]: c["results"]["ember"] for c in report["cases"] if c["results"]["ember"]["status"] != "pass"}
    assert not failed, f"ember fails simple ONNX cases: {failed}"


@pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime not installed")
def test_onnxruntime_passes_simple_cases(report):
    assert report["summary"]["ort"]["pass"] == len(EXPECTED)

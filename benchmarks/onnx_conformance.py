"""ONNX conformance: every node test case of the installed onnx package through ember and ONNX Runtime (CPU).

    python benchmarks/onnx_conformance.py [--filter REGEX] [--limit N] [--jobs 2] [--timeout 60]
                                          [--engines ember,ort] [--out benchmarks/out]

Each case (a one-op model, or its function-expanded form, with inputs and expected outputs from
``onnx.backend.test.case.node``) is classified per engine as

    pass   every output has the expected count, shape and dtype and is within tolerance,
    wrong  the engine ran but an output differs (values, shape, dtype or count),
    error  the model failed to import, compile or run (including a worker crash or a timeout).

Values are compared the way onnx's backend test runner does: ``|actual - expected| <= atol + rtol * |expected|``
elementwise with NaN matching NaN (rtol/atol from the case: 1e-3 / 1e-7 for all node cases of onnx 1.23),
strings exactly, bfloat16 with rtol at least 2**-6.  Other ml_dtypes types (float8, int4, ...) are compared
after a cast to float32.

Every (case, engine) pair runs in a worker process (``--jobs`` of them, one engine at a time), so a
segfault, an abort or a hang inside TVM or ONNX Runtime marks that one case ``error`` ("crash" or "timeout")
and the run goes on with a fresh worker.  Workers' stdout/stderr go to ``OUT/onnx_conformance_logs/``.

Prints a table (engine, pass, wrong, error, total) and ember's most common error categories (exception type and
first line of the message, with the case name replaced by <model>), and writes ``OUT/onnx_conformance.json``
with the per-case results, the summary, the machine, the versions and the command line.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import multiprocessing as mp
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from multiprocessing.connection import wait as mp_wait

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchtools
from benchtools import cpu_name  # noqa: E402

ENGINES = ("ember", "ort")
ENGINE_LABELS = {"ember": "ember (host)", "ort": "ONNX Runtime (CPU)"}
STATUSES = ("pass", "wrong", "error")
RECYCLE_AFTER = 250  # tasks per worker before it is replaced (bounds memory held by TVM's caches)
MSG_MAX = 400


# ---------------------------------------------------------------------------------------------------------------
# Loading the cases (parent process)
# ---------------------------------------------------------------------------------------------------------------

def _plain(value):
    """Test-data values as plain Python/numpy: TensorProto -> ndarray, numpy scalar -> 0-d array, lists kept."""
    import onnx
    from onnx import numpy_helper

    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, onnx.SequenceProto):
        return [_plain(v) for v in numpy_helper.to_list(value)]
    if isinstance(value, onnx.OptionalProto):
        return _plain(numpy_helper.to_optional(value))
    return np.asarray(value)


def load_cases(pattern: str | None = None, limit: int | None = None):
    """(selected cases as picklable dicts sorted by name, number of cases available)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from onnx.backend.test.case.node import collect_testcases

        all_cases = list(collect_testcases(None))
    single_op = {c.name: c.model.graph.node[0].op_type for c in all_cases if len(c.model.graph.node) == 1}
    rx = re.compile(pattern) if pattern else None
    chosen = sorted((c for c in all_cases if rx is None or rx.search(c.name)), key=lambda c: c.name)
    if limit is not None:
        chosen = chosen[:limit]
    cases = []
    for c in chosen:
        nodes = c.model.graph.node
        if len(nodes) == 1:
            op = nodes[0].op_type
        else:  # a function-expanded case: name the op of the one-node case it expands
            op = single_op.get(re.sub(r"_expanded(_ver\d+)?$", "", c.name)) or "+".join(
                sorted({n.op_type for n in nodes}))
        cases.append({
            "name": c.name,
            "op_type": op,
            "expanded": len(nodes) != 1,
            "opset": max((o.version for o in c.model.opset_import if o.domain in ("", "ai.onnx")), default=None),
            "graph_name": c.model.graph.name,
            "model": c.model.SerializeToString(),
            "data_sets": [([_plain(x) for x in ins], [_plain(x) for x in outs]) for ins, outs in c.data_sets],
            "rtol": float(c.rtol),
            "atol": float(c.atol),
        })
    return cases, len(all_cases)


# ---------------------------------------------------------------------------------------------------------------
# Comparing outputs (worker process)
# ---------------------------------------------------------------------------------------------------------------

class Mismatch(Exception):
    """The engine ran, but an output is not what the test expects."""

    def __init__(self, message, max_abs_err=None):
        super().__init__(message)
        self.max_abs_err = max_abs_err


def _is_ml_dtype(dt: np.dtype) -> bool:
    """bfloat16, float8*, float4, int4/uint4, int2/uint2: the ml_dtypes types onnx uses (numpy user types)."""
    return dt.num >= 256 or dt.kind == "V"


def _max_abs_err(out: np.ndarray, ref: np.ndarray):
    """Largest |out - ref| (float64); matching NaN/inf positions count as 0, non-matching ones as inf."""
    if out.size == 0:
        return 0.0
    a, b = out.astype(np.float64), ref.astype(np.float64)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(same, 0.0, np.abs(a - b))
    diff = np.where(np.isnan(diff), np.inf, diff)
    return float(diff.max())


def compare_one(out, ref, rtol, atol, where):
    """Raise Mismatch unless ``out`` matches ``ref``; returns the max abs error (None where not numeric)."""
    if isinstance(ref, list):
        if not isinstance(out, (list, tuple)):
            raise Mismatch(f"{where}: expected a sequence of {len(ref)} tensors, got {type(out).__name__}")
        if len(out) != len(ref):
            raise Mismatch(f"{where}: sequence of {len(out)} tensors, expected {len(ref)}")
        errs = [compare_one(o, r, rtol, atol, f"{where}[{j}]") for j, (o, r) in enumerate(zip(out, ref))]
        errs = [e for e in errs if e is not None]
        return max(errs) if errs else None
    if ref is None:
        if out is not None:
            raise Mismatch(f"{where}: expected an empty optional, got {type(out).__name__}")
        return None
    if out is None or isinstance(out, (list, tuple)):
        raise Mismatch(f"{where}: expected a tensor, got {type(out).__name__}")
    out, ref = np.asarray(out), np.asarray(ref)
    if out.shape != ref.shape:
        raise Mismatch(f"{where}: shape {list(out.shape)}, expected {list(ref.shape)}")
    if ref.dtype == object or ref.dtype.kind in "US":
        if out.dtype.kind not in "OUS" or not np.array_equal(out.astype(object), ref.astype(object)):
            raise Mismatch(f"{where}: strings differ")
        return None
    if out.dtype != ref.dtype:
        raise Mismatch(f"{where}: dtype {out.dtype}, expected {ref.dtype}")
    if _is_ml_dtype(ref.dtype):
        if ref.dtype.name == "bfloat16":
            rtol = max(rtol, 2.0 ** -6)
        out, ref = out.astype(np.float32), ref.astype(np.float32)
    err = _max_abs_err(out, ref)
    with np.errstate(invalid="ignore", over="ignore"):
        close = np.isclose(out, ref, rtol=rtol, atol=atol, equal_nan=True)
    if not bool(np.all(close)):
        bad = int(close.size - np.count_nonzero(close))
        raise Mismatch(f"{where}: {bad} of {close.size} values differ (max abs error {err:.3g}, "
                       f"rtol {rtol:g}, atol {atol:g})", err)
    return err


def compare(outs, refs, rtol, atol):
    if len(outs) != len(refs):
        raise Mismatch(f"{len(outs)} outputs, expected {len(refs)}")
    errs = [compare_one(o, r, rtol, atol, f"output {i}") for i, (o, r) in enumerate(zip(outs, refs))]
    errs = [e for e in errs if e is not None]
    return max(errs) if errs else None


# ---------------------------------------------------------------------------------------------------------------
# Engines (worker process)
# ---------------------------------------------------------------------------------------------------------------

class NonTensorValue(Exception):
    """The case feeds a sequence or optional input, which the engine's API cannot take."""


def _headline(exc: BaseException) -> str:
    """First meaningful line of an exception's message (for TVM tracebacks-in-messages, the error line)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    line = lines[0]
    if line.startswith("Traceback") or line.startswith("File "):
        line = lines[-1]
    return line[:MSG_MAX]


def _ember_prepare(model_bytes, threads):
    import onnx

    import ember

    proto = onnx.load_model_from_string(model_bytes)
    cm = ember.compile(proto, target="host")

    def run(inputs):
        for i, x in enumerate(inputs):
            if x is None or isinstance(x, list):
                raise NonTensorValue(f"input {i} is a {'sequence' if isinstance(x, list) else 'missing optional'}; "
                                     "CompiledModel takes tensors only")
        res = cm(*inputs)
        if isinstance(res, tuple):
            return list(res)
        return [res]

    return run


def _ort_value_in(ort, x):
    """A numpy array of an ml_dtypes type (bfloat16, float8, int4...) as an OrtValue: ORT's numpy bridge
    refuses them, so the bytes go in as ONNX stores them (packed for sub-byte types)."""
    import ctypes

    from onnx import numpy_helper

    tp = numpy_helper.from_array(np.ascontiguousarray(x))
    ov = ort.OrtValue.ortvalue_from_shape_and_type(list(x.shape), tp.data_type)
    raw = tp.raw_data
    if len(raw) != ov.tensor_size_in_bytes():
        raise RuntimeError(f"cannot pass a {x.dtype} input to ONNX Runtime ({len(raw)} bytes for "
                           f"{ov.tensor_size_in_bytes()})")
    if raw:
        ctypes.memmove(ov.data_ptr(), raw, len(raw))
    return ov


def _ort_value_out(ov, elem_type):
    """An OrtValue of a type numpy lacks (ORT's .numpy() fails, or gives uint8 for float8), read through its raw
    bytes into the ml_dtypes array onnx uses."""
    import ctypes

    from onnx import TensorProto, numpy_helper

    tp = TensorProto(data_type=elem_type, dims=list(ov.shape()))
    n = ov.tensor_size_in_bytes()
    tp.raw_data = ctypes.string_at(ov.data_ptr(), n) if n else b""
    return numpy_helper.to_array(tp)


def _ort_prepare(model_bytes, threads):
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    graph = onnx.load_model_from_string(model_bytes).graph
    out_names = [o.name for o in graph.output]
    out_types = [o.type.tensor_type.elem_type if o.type.HasField("tensor_type") else None for o in graph.output]

    def run(inputs):
        exotic = any(isinstance(x, np.ndarray) and _is_ml_dtype(x.dtype) for x in inputs) or any(
            t is not None and _is_ml_dtype(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t))) for t in out_types)
        if not exotic or any(x is None or isinstance(x, list) for x in inputs) or None in out_types:
            feeds = {n: x for n, x in zip(names, inputs) if x is not None}
            return list(sess.run(None, feeds))
        feeds = {n: (_ort_value_in(ort, x) if _is_ml_dtype(x.dtype) else ort.OrtValue.ortvalue_from_numpy(x))
                 for n, x in zip(names, inputs)}
        outs = sess.run_with_ort_values(out_names, feeds)
        return [_ort_value_out(ov, t) if _is_ml_dtype(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t)))
                else ov.numpy() for ov, t in zip(outs, out_types)]

    return run


PREPARE = {"ember": _ember_prepare, "ort": _ort_prepare}


def run_task(engine, case, threads):
    """One (engine, case): returns a result dict (never raises)."""
    t0 = time.perf_counter()
    res = {"status": "error", "stage": "compile", "error_type": None, "message": None, "max_abs_err": None}
    try:
        run = PREPARE[engine](case["model"], threads)
        errs = []
        for k, (inputs, refs) in enumerate(case["data_sets"]):
            res["stage"] = "run"
            outs = run(inputs)
            res["stage"] = "compare"
            e = compare(outs, refs, case["rtol"], case["atol"])
            if e is not None:
                errs.append(e)
        res.update(status="pass", stage=None, max_abs_err=max(errs) if errs else None)
    except Mismatch as m:
        res.update(status="wrong", stage="compare", error_type="Mismatch", message=str(m)[:MSG_MAX],
                   max_abs_err=m.max_abs_err)
    except Exception as e:  # noqa: BLE001 - every failure of an engine is a result here
        res.update(error_type=type(e).__name__, message=_headline(e))
        ops = getattr(e, "ops", None)
        if ops:
            res["ops"] = [str(o) for o in ops]
        tb = traceback.extract_tb(e.__traceback__)
        if tb:
            f = tb[-1]
            res["raised_at"] = f"{os.path.relpath(f.filename, REPO) if f.filename.startswith(REPO) else f.filename}" \
                               f":{f.lineno}"
    res["seconds"] = round(time.perf_counter() - t0, 3)
    if res["max_abs_err"] is not None and not np.isfinite(res["max_abs_err"]):
        res["max_abs_err"] = None
        res["nonfinite_mismatch"] = True
    return res


def worker_main(conn, engine, log_path, threads):
    """Worker loop: receive a case, send back its result; None means stop."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    import warnings

    warnings.simplefilter("ignore")
    try:  # load the engine before the first case, so its per-case seconds measure that case alone
        if engine == "ember":
            import ember.compiler.build  # noqa: F401
            import tvm.relax.frontend.onnx  # noqa: F401
        else:
            import onnxruntime  # noqa: F401
    except Exception:  # noqa: BLE001 - the first case will report it
        traceback.print_exc()
    while True:
        try:
            case = conn.recv()
        except EOFError:
            return
        if case is None:
            return
        print(f"=== {engine} {case['name']}", flush=True)
        result = run_task(engine, case, threads)
        conn.send(result)


# ---------------------------------------------------------------------------------------------------------------
# The pool (parent process)
# ---------------------------------------------------------------------------------------------------------------

def _signal_name(code):
    if code is None:
        return "still running"
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class Worker:
    def __init__(self, ctx, engine, slot, log_dir, threads):
        self.ctx, self.engine, self.slot, self.threads = ctx, engine, slot, threads
        self.log_path = os.path.join(log_dir, f"{engine}-worker{slot}.log")
        self.proc = None
        self.conn = None
        self.tasks_done = 0
        self.current = None  # index of the case it is running
        self.started_at = None
        self.log_offset = 0

    def start(self):
        parent_conn, child_conn = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=worker_main, args=(child_conn, self.engine, self.log_path, self.threads),
                                     daemon=True)
        self.proc.start()
        child_conn.close()
        self.conn = parent_conn
        self.tasks_done = 0

    def submit(self, index, case):
        self.current = index
        self.started_at = time.monotonic()
        try:
            self.log_offset = os.path.getsize(self.log_path)
        except OSError:
            self.log_offset = 0
        self.conn.send(case)

    def log_tail(self, max_lines=3):
        """Last lines the worker wrote while running its current case (often the crash reason)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("=== ")]
        telling = [ln for ln in lines if re.search(r"error|what\(\)|terminate|fatal|check failed|assert|segfault|"
                                                   r"abort", ln, re.IGNORECASE)]
        return " | ".join((telling or lines)[:max_lines])[:MSG_MAX]

    def stop(self, kill=False):
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=10)
        try:
            self.conn.close()
        except OSError:
            pass
        self.proc, self.conn, self.current = None, None, None


def run_engine(engine, cases, jobs, timeout, log_dir, threads, progress_every=30.0):
    """Run every case through ``engine`` in ``jobs`` workers; returns one result dict per case, in order."""
    ctx = mp.get_context("spawn")
    results = [None] * len(cases)
    pending = collections.deque(range(len(cases)))
    workers = [Worker(ctx, engine, k, log_dir, threads) for k in range(max(1, min(jobs, len(cases))))]
    for w in workers:
        open(w.log_path, "w").close()
    counts = collections.Counter()
    t_start = last_report = time.monotonic()

    def finish(w, res):
        results[w.current] = res
        counts[res["status"]] += 1
        w.current = None
        w.tasks_done += 1

    try:
        while pending or any(w.current is not None for w in workers):
            for w in workers:  # keep every worker busy
                if w.current is None and pending:
                    if w.proc is None or not w.proc.is_alive() or w.tasks_done >= RECYCLE_AFTER:
                        w.stop()
                        w.start()
                    i = pending.popleft()
                    try:
                        w.submit(i, cases[i])
                    except (OSError, BrokenPipeError):  # died while idle: one fresh worker, one more try
                        w.stop(kill=True)
                        w.start()
                        w.submit(i, cases[i])
            busy = [w for w in workers if w.current is not None]
            now = time.monotonic()
            wait_s = max(0.05, min(timeout - (now - w.started_at) for w in busy)) if busy else 0.05
            ready = mp_wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=min(wait_s, 1.0))
            for w in busy:
                if w.conn in ready or w.proc.sentinel in ready:
                    res = None
                    try:
                        if w.conn.poll():
                            res = w.conn.recv()
                    except (EOFError, OSError):
                        res = None
                    if res is not None:
                        finish(w, res)
                        continue
                    w.proc.join(timeout=5)
                    code = w.proc.exitcode
                    tail = w.log_tail()
                    finish(w, {"status": "error", "stage": "crash", "error_type": "WorkerCrash",
                               "message": f"worker died ({_signal_name(code)})", "detail": tail,
                               "max_abs_err": None, "seconds": round(time.monotonic() - w.started_at, 3)})
                    w.stop(kill=True)
                elif time.monotonic() - w.started_at > timeout:
                    secs = round(time.monotonic() - w.started_at, 3)
                    tail = w.log_tail()
                    finish(w, {"status": "error", "stage": "timeout", "error_type": "Timeout",
                               "message": f"no result after {timeout:g} s; worker killed", "detail": tail,
                               "max_abs_err": None, "seconds": secs})
                    w.stop(kill=True)
            if time.monotonic() - last_report > progress_every:
                last_report = time.monotonic()
                done = sum(counts.values())
                print(f"  [{engine}] {done}/{len(cases)} done: " + ", ".join(f"{s} {counts[s]}" for s in STATUSES)
                      + f" ({time.monotonic() - t_start:.0f} s)", file=sys.stderr, flush=True)
    finally:
        for w in workers:
            w.stop(kill=w.current is not None)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Summary and report (parent process)
# ---------------------------------------------------------------------------------------------------------------

def category(case, res) -> str:
    """Group key for a failing result: exception type and message first line, without case-specific names."""
    msg = res.get("message") or ""
    for name in sorted({case["name"], case["graph_name"]} - {""}, key=len, reverse=True):
        msg = re.sub(rf"(?<![\w]){re.escape(name)}(?![\w])", "<model>", msg)
    msg = re.sub(r" \(nodes? '[^)]*\)", "", msg)  # which node(s) of the case
    msg = re.sub(r"(?<![\w.])-?\d+(?![\w.])", "N", msg)  # sizes, shapes, indices: one category for all
    msg = re.sub(r"\bparam=\w+", "param=<name>", msg)  # which parameter of a Relax function
    msg = re.sub(r"\bdtype=\"\w+\"|\bT\.\w+", lambda m: "dtype=<dtype>" if m.group(0).startswith("dtype") else
                 "T.<dtype>", msg)
    return f"{res.get('error_type') or 'Error'}: {msg}".strip()


def categories(cases, results, status="error"):
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for case, res in zip(cases, results):
        if res["status"] == status:
            groups[category(case, res)].append(case["name"])
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return [{"category": k, "count": len(v), "ops": sorted({c["op_type"] for c in cases if c["name"] in set(v)}),
             "examples": v[:5]} for k, v in ranked]


def summarize(results):
    c = collections.Counter(r["status"] for r in results)
    return {**{s: c[s] for s in STATUSES}, "total": len(results)}



def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    try:
        from ember.version import __version__ as ember_version

        out["ember"] = ember_version
    except Exception:  # noqa: BLE001
        out["ember"] = None
    for key, dist in (("tvm", "apache-tvm"), ("tvm_ffi", "apache-tvm-ffi"), ("onnx", "onnx"),
                      ("onnxruntime", "onnxruntime"), ("numpy", "numpy")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    return out


def git_state() -> dict:
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": head or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def print_table(summary, engines):
    print()
    print(f"{'engine':<20} {'pass':>6} {'wrong':>6} {'error':>6} {'total':>6} {'pass %':>7}")
    for e in engines:
        s = summary[e]
        pct = 100.0 * s["pass"] / s["total"] if s["total"] else 0.0
        print(f"{ENGINE_LABELS[e]:<20} {s['pass']:>6} {s['wrong']:>6} {s['error']:>6} {s['total']:>6} {pct:>6.1f}%")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--filter", default=None, help="regular expression on case names (re.search)")
    ap.add_argument("--limit", type=int, default=None, help="at most N cases (first N by name, after --filter)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per case and engine (default 60)")
    ap.add_argument("--engines", default="ember,ort", help="comma-separated subset of: " + ",".join(ENGINES))
    ap.add_argument("--out", default=os.path.join("benchmarks", "out"), help="output directory")
    ap.add_argument("--top", type=int, default=15, help="error categories to print (default 15)")
    a = ap.parse_args(argv)
    a.engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    bad = [e for e in a.engines if e not in ENGINES]
    if bad or not a.engines:
        ap.error(f"--engines: unknown {bad}; choose from {','.join(ENGINES)}")
    if a.jobs < 1:
        ap.error("--jobs must be at least 1")
    if a.limit is not None and a.limit < 0:
        ap.error("--limit must be >= 0")
    if a.filter:
        try:
            re.compile(a.filter)
        except re.error as e:
            ap.error(f"--filter: {e}")
    return a


def main(argv=None):
    a = parse_args(argv)
    command = " ".join(shlex.quote(x) for x in [sys.executable, *(sys.argv if argv is None else [__file__, *argv])])
    if "ort" in a.engines:
        import importlib.util

        if importlib.util.find_spec("onnxruntime") is None:
            sys.exit("onnxruntime is not installed: pip install onnxruntime, or pass --engines ember")
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()

    cases, available = load_cases(a.filter, a.limit)
    print(f"{len(cases)} of {available} ONNX node test cases; engines {','.join(a.engines)}; {a.jobs} worker(s), "
          f"{a.timeout:g} s per case", file=sys.stderr, flush=True)
    if not cases:
        sys.exit("no test case matches --filter/--limit")

    threads = max(1, (os.cpu_count() or 1) // a.jobs)
    os.environ.setdefault("TVM_NUM_THREADS", str(threads))  # workers inherit these
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    out_dir = os.path.abspath(a.out)
    log_dir = os.path.join(out_dir, "onnx_conformance_logs")
    os.makedirs(log_dir, exist_ok=True)

    results, engine_seconds = {}, {}
    for engine in a.engines:
        te = time.perf_counter()
        results[engine] = run_engine(engine, cases, a.jobs, a.timeout, log_dir, threads)
        engine_seconds[engine] = round(time.perf_counter() - te, 1)
        s = summarize(results[engine])
        print(f"  [{engine}] finished in {engine_seconds[engine]:.0f} s: "
              + ", ".join(f"{k} {s[k]}" for k in STATUSES), file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0

    summary = {e: summarize(results[e]) for e in a.engines}
    cats = {e: categories(cases, results[e], "error") for e in a.engines}
    wrong_ops = {e: collections.Counter(c["op_type"] for c, r in zip(cases, results[e]) if r["status"] == "wrong")
                 for e in a.engines}
    by_op: dict = {}
    for i, c in enumerate(cases):
        row = by_op.setdefault(c["op_type"], {e: {s: 0 for s in STATUSES} for e in a.engines})
        for e in a.engines:
            row[e][results[e][i]["status"]] += 1

    report = {
        "benchmark": "onnx_conformance",
        "date": started.isoformat(timespec="seconds"),
        "command": command,
        "cwd": os.getcwd(),
        "wall_seconds": round(wall, 1),
        "engine_seconds": engine_seconds,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "hostname": platform.node()},
        "versions": versions(),
        "git": git_state(),
        "options": {"filter": a.filter, "limit": a.limit, "jobs": a.jobs, "timeout_s": a.timeout,
                    "engines": a.engines, "ember_target": "host", "ort_providers": ["CPUExecutionProvider"],
                    "threads_per_worker": threads,
                    "comparison": "onnx backend runner: count, shape, dtype, isclose(rtol, atol, equal_nan)"},
        "cases_available": available,
        "cases_selected": len(cases),
        "summary": summary,
        "error_categories": cats,
        "error_stages": {e: dict(collections.Counter(r.get("stage") or "?" for r in results[e]
                                                     if r["status"] == "error").most_common()) for e in a.engines},
        "wrong_by_op": {e: dict(wrong_ops[e].most_common()) for e in a.engines},
        "by_op": dict(sorted(by_op.items())),
        "cases": [{"name": c["name"], "op_type": c["op_type"], "expanded": c["expanded"], "opset": c["opset"],
                   "results": {e: results[e][i] for e in a.engines}} for i, c in enumerate(cases)],
    }
    path = os.path.join(out_dir, "onnx_conformance.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)

    print_table(summary, a.engines)
    if "ember" in a.engines and cats["ember"]:
        print(f"\nTop ember error categories ({summary['ember']['error']} errors in {len(cats['ember'])} categories):")
        for row in cats["ember"][:a.top]:
            ops = ", ".join(row["ops"][:3]) + (", ..." if len(row["ops"]) > 3 else "")
            print(f"  {row['count']:>5}  {row['category'][:220]}  [{ops}]")
        stages = report["error_stages"]["ember"]
        print("  by stage: " + ", ".join(f"{k} {v}" for k, v in stages.items()))
    if "ember" in a.engines and wrong_ops["ember"]:
        print(f"\nember wrong results by op ({summary['ember']['wrong']} cases): "
              + ", ".join(f"{op} {n}" for op, n in wrong_ops["ember"].most_common(12)))
    print(f"\n{len(cases)} cases in {wall:.0f} s; wrote {path}")
    return report


if __name__ == "__main__":
    main()

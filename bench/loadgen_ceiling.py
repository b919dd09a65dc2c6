"""The load generator's own ceiling: requests/s and streamed tokens/s it can drive on this machine against a
server that answers instantly (an in-process aiohttp server streaming completions chunks with no model behind).

    python bench/loadgen_ceiling.py [--requests 2000] [--tokens 64] [--concurrency 256]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web

from autotune.spec.workload import LengthDist, Workload
from autotune.trials.loadgen import drive, summarise


async def completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    chunk = {"choices": [{"index": 0, "text": " w", "finish_reason": None}]}
    for _ in range(body["max_tokens"] - 1):
        await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
    last = {"choices": [{"index": 0, "text": " w", "finish_reason": "length"}],
            "usage": {"completion_tokens": body["max_tokens"]}}
    await resp.write(f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode())
    await resp.write_eof()
    return resp


async def main_async(args) -> None:
    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    workload = Workload("ceiling", LengthDist("fixed", value=32), LengthDist("fixed", value=args.tokens),
                        mode="concurrency", num_requests=args.requests, concurrency=args.concurrency)
    t = time.perf_counter()
    records = await asyncio.get_running_loop().run_in_executor(
        None, lambda: asyncio.run(drive(f"http://127.0.0.1:{port}", "x", workload)))
    wall = time.perf_counter() - t
    await runner.cleanup()
    s = summarise(records, 1)
    print(f"{args.requests} requests x {args.tokens} streamed tokens at concurrency {args.concurrency}: "
          f"{args.requests / wall:,.0f} requests/s, {s['output_tok_s']:,.0f} tokens/s "
          f"(server and client share this machine's {__import__('os').cpu_count()} cores; "
          f"{s['failed_requests']} failed)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=256)
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()

"""A small OpenAI-compatible server for the tests and benchmarks: real HTTP, canned tokens.

    python tests/fake_worker.py --port 8001 [--id w1] [--token-delay 0.02] [--tokens 16]
        [--unhealthy-file F] [--engine-stats F] [--start-delay S] [--model NAME]

``/health``, ``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions`` (``stream: true``
gives SSE chunks ending with ``data: [DONE]``). Every answer carries ``x-worker-id`` so a test can
tell which worker served it. ``/health`` answers 503 while the file named by ``--unhealthy-file``
exists, and ``/fail`` always answers 500. With ``--engine-stats FILE`` it stands in for
flockctl's engine's ``/stats``: the file's JSON, read on every request (503 while the file is
missing); without it ``/stats`` is 404, as on any server that is not the engine.
``--start-delay S`` waits that long before listening, like a server loading a model.
``--model NAME`` is the model its ``/v1/models`` lists and its answers name (default ``fake``).
``--service-model FILE`` times answers by a ``flockctl simulate`` service model (the simulator's
own worker model, on this server's loop): a request's ``max_tokens`` output tokens after a
``fake_prompt_tokens`` prompt (default 1), batched as the model says.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

from aiohttp import web


def build_app(
    worker_id: str,
    tokens: int,
    token_delay: float,
    unhealthy: Path | None,
    engine_stats: Path | None = None,
    model: str = "fake",
    service: Path | None = None,
) -> web.Application:
    headers = {"x-worker-id": worker_id}
    timed: list = []  # the service model's engine, made on the serving loop

    async def served(prompt_tokens: int, n: int) -> object:
        if not timed:
            from flockctl.server.simulate.service import EngineModel, load_service_model

            assert service is not None
            timed.append(EngineModel(load_service_model(service), asyncio.get_running_loop()))
        job = timed[0].submit(prompt_tokens, n)
        await job.first
        return job

    async def health(_req: web.Request) -> web.Response:
        if unhealthy is not None and unhealthy.exists():
            return web.json_response({"status": "unhealthy"}, status=503, headers=headers)
        return web.json_response({"status": "ok"}, headers=headers)

    async def models(_req: web.Request) -> web.Response:
        data = {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "tests"}]}
        return web.json_response(data, headers=headers)

    async def stats(_req: web.Request) -> web.Response:
        assert engine_stats is not None
        try:
            body = engine_stats.read_bytes()
        except FileNotFoundError:
            return web.json_response({"error": "no stats"}, status=503, headers=headers)
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def fail(_req: web.Request) -> web.Response:
        return web.json_response(
            {"error": {"message": "always fails"}}, status=500, headers=headers
        )

    async def complete(req: web.Request) -> web.StreamResponse:
        try:
            body = await req.json()
        except json.JSONDecodeError:
            return web.json_response(
                {"error": {"message": "invalid JSON"}}, status=400, headers=headers
            )
        chat = req.path.endswith("/chat/completions")
        n = int(body.get("max_tokens") or tokens)
        delay = float(body.get("fake_token_delay", token_delay))
        created = int(body.get("fake_created", time.time()))
        kind = "chat.completion" if chat else "text_completion"
        job = await served(int(body.get("fake_prompt_tokens", 1)), n) if service else None
        if job is not None:
            delay = 0.0
        if not body.get("stream"):
            if job is not None:
                await job.done
            if delay:
                await asyncio.sleep(delay * n)
            text = " ".join(f"t{i}" for i in range(n))
            choice = (
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "length",
                }
                if chat
                else {"index": 0, "text": text, "finish_reason": "length"}
            )
            return web.json_response(
                {
                    "id": "fake-1",
                    "object": kind,
                    "created": created,
                    "model": model,
                    "system_fingerprint": worker_id,
                    "choices": [choice],
                    "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1},
                },
                headers=headers,
            )
        resp = web.StreamResponse(
            headers={**headers, "content-type": "text/event-stream", "cache-control": "no-cache"}
        )
        await resp.prepare(req)
        for i in range(n):
            if delay:
                await asyncio.sleep(delay)
            if job is not None and i == 1:
                await job.done  # the first token came with the prefill, the rest by the end
            piece = f"t{i} "
            choice = (
                {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                if chat
                else {"index": 0, "text": piece, "finish_reason": None}
            )
            chunk = {
                "id": "fake-1",
                "object": f"{kind}.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": worker_id,
                "choices": [choice],
            }
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_route("*", "/fail", fail)
    if engine_stats is not None:
        app.router.add_get("/stats", stats)
    app.router.add_post("/v1/chat/completions", complete)
    app.router.add_post("/v1/completions", complete)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--id", default=os.environ.get("FLOCKCTL_WORKER_ID", "fake"))
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--unhealthy-file", type=Path)
    parser.add_argument("--engine-stats", type=Path)
    parser.add_argument("--start-delay", type=float, default=0.0)
    parser.add_argument("--model", default="fake")
    parser.add_argument("--service-model", type=Path)
    args = parser.parse_args()
    time.sleep(args.start_delay)
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    app = build_app(
        args.id,
        args.tokens,
        args.token_delay,
        args.unhealthy_file,
        args.engine_stats,
        args.model,
        args.service_model,
    )
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None, loop=loop)


if __name__ == "__main__":
    main()

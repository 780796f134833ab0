"""The daemon's ASGI app: the balancer in front, the FastAPI admin API behind it.

Admin routes live under ``/-/`` and need the admin token (``Authorization: Bearer <token>``):
``GET /-/status``, ``POST /-/workers``, ``DELETE /-/workers/{id}``, ``POST /-/shutdown``.
``GET /metrics`` (Prometheus) and ``GET /health`` are open, like a worker's.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict

from flockctl.server.deployment import Deployment
from flockctl.server.provisioners import StaticProvisioner
from flockctl.server.proxy import Balancer
from flockctl.server.workers import LIVE, WorkerState


class AddWorker(BaseModel):
    """Body of ``POST /-/workers`` (optional): ``url`` for a static deployment."""

    model_config = ConfigDict(extra="forbid")
    url: str | None = None


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status)


def create_app(
    deployment: Deployment,
    request_shutdown: Callable[[], None] | None = None,
    on_stopped: Callable[[], None] | None = None,
) -> Balancer:
    """Build the daemon's ASGI app.

    ``request_shutdown`` is how ``POST /-/shutdown`` stops the server; ``on_stopped`` runs once
    every worker is gone, at the end of the lifespan.
    """
    balancer: Balancer

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        balancer.open_session()
        await deployment.start()
        try:
            yield
        finally:
            await deployment.stop()
            await balancer.close_session()
            if on_stopped is not None:
                on_stopped()

    app = FastAPI(
        title="flockctl daemon",
        lifespan=lifespan,
        docs_url="/-/docs",
        redoc_url=None,
        openapi_url="/-/openapi.json",
    )

    @app.exception_handler(HTTPException)
    async def _http_error(_req: Request, exc: HTTPException) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found", 409: "conflict"}.get(
            exc.status_code, "invalid_request_error"
        )
        resp = _error(exc.status_code, str(exc.detail), kind)
        if exc.status_code == 401:
            resp.headers["www-authenticate"] = "Bearer"
        return resp

    @app.exception_handler(RequestValidationError)
    async def _bad_body(_req: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return _error(422, problems, "invalid_request_error")

    expected = f"Bearer {deployment.token}"

    def admin(request: Request) -> None:
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), expected.encode()):
            raise HTTPException(
                401,
                "the admin API needs 'Authorization: Bearer <admin token>'"
                " (the token is in daemon.json, or --node-control-key)",
            )

    guarded = [Depends(admin)]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "ready_workers": len(deployment.pool.ready())}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(deployment.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/-/status", dependencies=guarded)
    async def status() -> dict[str, Any]:
        return deployment.snapshot()

    @app.post("/-/workers", dependencies=guarded, status_code=201)
    async def add_worker(body: AddWorker | None = None) -> dict[str, Any]:
        controller = deployment.controller
        assert controller is not None
        provisioner = deployment.provisioner
        if isinstance(provisioner, StaticProvisioner):
            if body is None or not body.url:
                if not provisioner.capacity(0):
                    raise HTTPException(
                        409, 'every endpoint already has a worker; add one with {"url": "..."}'
                    )
            else:
                if not body.url.startswith(("http://", "https://")):
                    raise HTTPException(422, f"url: {body.url!r} is not an http(s) URL")
                provisioner.add_endpoint(body.url)
        elif body is not None and body.url:
            raise HTTPException(422, "url: only a static deployment takes a worker URL")
        live = len(deployment.pool.live())
        if deployment.policy.name != "fixed" and live >= deployment.policy.max_workers:
            raise HTTPException(
                409,
                f"already at max_workers ({deployment.policy.max_workers});"
                " restart with a larger --max-workers",
            )
        worker = controller.add_worker()
        return worker.to_dict()

    @app.delete("/-/workers/{worker_id}", dependencies=guarded, status_code=202)
    async def remove_worker(worker_id: str) -> dict[str, Any]:
        controller = deployment.controller
        assert controller is not None
        worker = deployment.pool.get(worker_id)
        if worker is None:
            raise HTTPException(404, f"no worker {worker_id!r}")
        if worker.state not in LIVE:
            raise HTTPException(409, f"worker {worker_id} is already {worker.state.value}")
        controller.remove_worker(worker)
        return worker.to_dict()

    @app.post("/-/shutdown", dependencies=guarded, status_code=202)
    async def shutdown() -> dict[str, Any]:
        if request_shutdown is None:
            raise HTTPException(409, "this daemon cannot be shut down over the API")
        request_shutdown()
        draining = sum(1 for w in deployment.pool if w.state != WorkerState.TERMINATED)
        return {"status": "shutting down", "workers": draining}

    balancer = Balancer(
        app,
        deployment.pool,
        deployment.metrics,
        max_attempts=deployment.cfg.max_attempts,
        queue_timeout=deployment.cfg.queue_timeout,
        api_key=deployment.cfg.api_key,
        on_connect_error=deployment.on_connect_error,
    )
    return balancer

"""The daemon's ASGI app: the balancer in front, the FastAPI admin API behind it.

Admin routes live under ``/-/`` and need the admin token (``Authorization: Bearer <token>``):

- ``GET /-/status``: the status snapshot (schema 1) the CLI, the dashboard and scripts read;
- ``GET /-/workers/{id}``: one worker as the snapshot shows it, plus ``probe_history`` (its last
  30 readiness probes) and ``command`` (the command line it runs, where the provisioner knows it);
- ``POST /-/workers`` ``{"url"?, "model"?}``: one more worker (the target goes up); ``url`` adds
  an endpoint to a static deployment, ``model`` starts flockctl's engine serving that model;
- ``DELETE /-/workers/{id}``: drain a worker and lower the target (remove it);
- ``POST /-/workers/{id}/drain``: drain a worker and keep the target (recycle it: a fresh worker
  replaces it);
- ``PATCH /-/autoscaler`` ``{"min_workers"?, "max_workers"?}``: new bounds, applied at once
  (never above ``workers_ceiling``: 422);
- ``GET /-/logs/{daemon|worker id}?tail=&offset=``: log lines, followed by polling with the
  returned byte offset;
- ``GET /-/requests?after=&limit=&status=&slow=&worker=&text=``: the newest request log records
  the daemon keeps in memory (numbered by ``seq``; ``after`` asks for the newer ones only), those
  that match the filter ``flockctl logs requests`` applies;
- ``POST /-/update`` ``{"config" | "changes" | "rollback", "mode"?, "max_surge"?,
  "update_timeout"?, "group"?}``: move the deployment to its next version running ``config`` (a
  resolved config, as ``flockctl update`` sends it) or the running config with ``changes`` (the
  dashboard's), or back to the version before (``rollback``); with worker groups, each group
  that changes moves in turn, or only ``group``; answers at once (202) with the update, whose
  progress ``deployment.update`` of the snapshot shows;
- ``POST /-/shutdown``: drain every worker and stop.

- ``GET /-/openapi.json``: this API's OpenAPI schema. There is no ``/-/docs`` page: a browser
  cannot send the admin token, and the API must not describe itself to anyone without it.

Errors are ``{"error": {"message", "type", "code"}}``. ``GET /metrics`` (Prometheus) and
``GET /health`` are open, like a worker's.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from flockctl import admin_routes as routes
from flockctl.request_log_reader import RequestFilter, parse_statuses
from flockctl.schema import (
    AutoscalerView,
    LogChunk,
    StatusSnapshot,
    UpdateView,
    WorkerDetail,
    WorkerView,
)
from flockctl.server.config import DeploymentConfig
from flockctl.server.deployment import Deployment
from flockctl.server.proxy import Balancer
from flockctl.server.request_log import RequestLog
from flockctl.server.update import UPDATABLE, UpdateRefused
from flockctl.server.workers import LIVE, Worker, WorkerState
from flockctl.state import MAX_LOG_LINES, REQUEST_LOG, read_log


class AddWorker(BaseModel):
    """Body of ``POST /-/workers`` (optional): ``url`` for a static deployment, or ``model`` for
    a local one to start flockctl's engine serving that model on the new worker."""

    model_config = ConfigDict(extra="forbid")
    url: str | None = None
    model: str | None = None


class Bounds(BaseModel):
    """Body of ``PATCH /-/autoscaler``: either bound, or both; ``group`` names the worker group
    whose bounds change (default: the deployment's, or its first group's)."""

    model_config = ConfigDict(extra="forbid")
    min_workers: int | None = None
    max_workers: int | None = None
    group: str | None = None


class StartUpdate(BaseModel):
    """Body of ``POST /-/update``: the new version's resolved ``config``, or ``changes`` to the
    running one (the dashboard's), or ``rollback``; and how to roll it out."""

    model_config = ConfigDict(extra="forbid")
    config: dict[str, Any] | None = None
    changes: dict[str, Any] | None = None
    mode: Literal["rolling", "blue-green"] = "rolling"
    max_surge: int = Field(1, ge=1)
    update_timeout: float = Field(600.0, gt=0)
    rollback: bool = False
    #: With worker groups: update this group alone (its definition from ``config``).
    group: str | None = None


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
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served below, behind the admin token
    )

    # Starlette's own errors too (an admin path with no route, a wrong method), in one shape.
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {
            401: "authentication_error",
            404: "not_found",
            405: "method_not_allowed",
            409: "conflict",
        }.get(exc.status_code, "invalid_request_error")
        resp = _error(exc.status_code, str(exc.detail), kind)
        resp.headers.update(exc.headers or {})
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
    request_log = RequestLog(deployment.state_dir / REQUEST_LOG)

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

    @app.get(routes.OPENAPI, dependencies=guarded, include_in_schema=False)
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    # response_model=None: the typed answers go out as built, never filtered or re-validated.
    @app.get(routes.STATUS, dependencies=guarded, response_model=None)
    async def status() -> StatusSnapshot:
        return deployment.snapshot()

    def find(worker_id: str) -> Worker:
        worker = deployment.pool.get(worker_id)
        if worker is None:
            known = ", ".join(w.id for w in deployment.pool) or "none"
            raise HTTPException(404, f"no worker {worker_id!r}; known: {known}")
        return worker

    @app.get(routes.WORKER, dependencies=guarded, response_model=None)
    async def worker_detail(worker_id: str) -> WorkerDetail:
        worker = find(worker_id)
        return {
            **worker.to_dict(),
            "probe_history": list(worker.probe_history),
            "command": deployment.provisioner.command_line(worker),
        }

    @app.post(routes.WORKERS, dependencies=guarded, status_code=201, response_model=None)
    async def add_worker(body: AddWorker | None = None) -> WorkerView:
        controller = deployment.controller
        assert controller is not None
        provisioner = deployment.provisioner
        can = provisioner.capabilities
        url = body.url if body is not None else None
        model = body.model if body is not None else None
        if url is not None and model is not None:
            raise HTTPException(
                422,
                "url and model cannot be used together: url adds an endpoint to a static"
                " deployment, model starts a local worker running flockctl's engine",
            )
        if model is not None and not model.strip():
            raise HTTPException(422, "model: must name a model (a hub id, a local path or demo)")
        if model is not None and not can.runs_models:
            raise HTTPException(422, f"model: {can.why_no_models}")
        if can.takes_urls:
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
        command = deployment.cfg.model_command(model) if model is not None else None
        # A worker with its own model joins the group of that model (made now if none has it).
        if model is not None and command is not None:
            controller = deployment.groups.for_model(model, command)
        policy = controller.policy
        live = len(deployment.pool.live())
        ceiling = deployment.cfg.workers_ceiling
        if live >= ceiling:
            raise HTTPException(
                409,
                f"already at the workers ceiling ({ceiling} workers); restart with a larger"
                " --workers-ceiling to run more",
            )
        if policy.name != "fixed" and len(controller.live()) >= policy.max_workers:
            raise HTTPException(
                409,
                f"already at max_workers ({policy.max_workers}); raise max_workers"
                " first (PATCH /-/autoscaler) or restart with a larger --max-workers",
            )
        worker = controller.add_worker(command, model)
        return worker.to_dict()

    def live_worker(worker_id: str) -> Worker:
        worker = find(worker_id)
        if worker.state not in LIVE:
            raise HTTPException(409, f"worker {worker_id} is already {worker.state.value}")
        return worker

    @app.delete(routes.WORKER, dependencies=guarded, status_code=202, response_model=None)
    async def remove_worker(worker_id: str) -> WorkerView:
        assert deployment.controller is not None
        worker = live_worker(worker_id)
        deployment.controller_of(worker).remove_worker(worker)
        return worker.to_dict()

    @app.post(routes.WORKER_DRAIN, dependencies=guarded, status_code=202, response_model=None)
    async def drain_worker(worker_id: str) -> WorkerView:
        assert deployment.controller is not None
        worker = live_worker(worker_id)
        deployment.controller_of(worker).recycle_worker(worker)
        return worker.to_dict()

    @app.patch(routes.AUTOSCALER, dependencies=guarded, response_model=None)
    async def set_bounds(body: Bounds) -> AutoscalerView:
        controller = deployment.controller
        assert controller is not None
        if body.min_workers is None and body.max_workers is None:
            raise HTTPException(422, "give min_workers, max_workers or both")
        if not deployment.provisioner.capabilities.bounds_change:
            raise HTTPException(409, deployment.provisioner.capabilities.why_fixed_bounds)
        if body.group is not None:
            found = deployment.groups.named_group(body.group)
            if found is None:
                known = ", ".join(v["name"] for v in deployment.groups.views()) or "none"
                raise HTTPException(422, f"group: no group {body.group!r}; groups: {known}")
            controller = found
        policy = controller.policy
        low = policy.min_workers if body.min_workers is None else body.min_workers
        high = policy.max_workers if body.max_workers is None else body.max_workers
        ceiling = deployment.cfg.workers_ceiling
        for key, value in (("max_workers", body.max_workers), ("min_workers", body.min_workers)):
            if value is not None and value > ceiling:
                raise HTTPException(
                    422,
                    f"{key}: {value} is above the workers ceiling ({ceiling}); restart with a"
                    " larger --workers-ceiling to allow that many workers",
                )
        try:
            controller.set_bounds(low, high)
        except ValueError as exc:  # the policy names both numbers
            raise HTTPException(422, str(exc)) from None
        return controller.to_dict()

    @app.get(routes.LOGS, dependencies=guarded, response_model=None)
    async def logs(
        target: str,
        tail: int = Query(200, ge=0, le=MAX_LOG_LINES),
        offset: int | None = Query(None, ge=0),
    ) -> LogChunk:
        path = log_path(target)
        chunk = await asyncio.to_thread(read_log, path, tail, offset)
        return {
            "target": target,
            "offset": chunk.offset,
            "lines": chunk.lines,
            "reset": chunk.reset,
        }

    def log_path(target: str) -> Path:
        """The log file of ``target``: the daemon's, or a worker's (one the pool knows, or one
        with a log in ``workers/``); never a path built from anything else."""
        directory = deployment.state_dir
        logs_dir = directory / "workers"
        if target == routes.DAEMON_LOG:
            path = directory / "daemon.log"
            if not path.is_file():
                raise HTTPException(
                    404,
                    f"the daemon has no log file ({path} is missing): a daemon started with"
                    " flockctl up --foreground logs to its stderr",
                )
            return path
        worker = deployment.pool.get(target)
        if worker is not None:
            can = deployment.provisioner.capabilities
            if not can.has_logs:
                raise HTTPException(404, f"worker {target} has no log: {can.why_no_logs}")
            return logs_dir / f"{target}.log"  # a worker still launching: its log is coming
        known = sorted((p.stem for p in logs_dir.glob("*.log")), key=lambda n: (len(n), n))
        if "/" not in target and ".." not in target and target in known:
            return logs_dir / f"{target}.log"
        known.insert(0, routes.DAEMON_LOG)
        raise HTTPException(404, f"no log for {target!r}; known: {', '.join(known)}")

    @app.get(routes.REQUESTS, dependencies=guarded, response_model=None)
    async def requests(
        status: Annotated[list[str] | None, Query()] = None,
        slow: float | None = Query(None, ge=0),
        worker: str | None = None,
        text: str = "",
        after: int | None = Query(None, ge=0),
        limit: int = Query(100, ge=1, le=routes.MAX_REQUESTS),
    ) -> dict[str, Any]:
        try:
            exact, classes = parse_statuses(status or [])
        except ValueError as exc:
            raise HTTPException(422, f"status: {exc}") from None
        keep = RequestFilter(exact, classes, slow, worker or None, text)
        found, last, reset = request_log.recent(keep, after=after, limit=limit)
        return {"records": found, "last": last, "reset": reset}

    def changed(changes: dict[str, Any]) -> dict[str, Any]:
        """The running config with ``changes``; a new model or worker command replaces
        whatever ran before (engine flags and drafts too, unless given)."""
        wrong = sorted(set(changes) - UPDATABLE)
        if wrong:
            raise HTTPException(
                422,
                f"changes.{wrong[0]}: an update cannot change it (it may change: "
                f"{', '.join(sorted(UPDATABLE))})",
            )
        values = deployment.cfg.model_dump(mode="json")
        if {"model", "worker_command"} & set(changes):
            for key in ("model", "worker_command", "engine_args", "draft_models"):
                values.pop(key, None)
        return {**values, **changes}

    @app.post(routes.UPDATE, dependencies=guarded, status_code=202, response_model=None)
    async def start_update(body: StartUpdate) -> UpdateView:
        given = [k for k in ("config", "changes") if getattr(body, k) is not None]
        if body.rollback and given:
            raise HTTPException(
                422, f"{given[0]}: not with rollback, which brings back the previous version's"
            )
        if not body.rollback and len(given) != 1:
            raise HTTPException(
                422, "config: give the new version's resolved config, or changes (not both)"
            )
        new_cfg = None
        if given:
            values = body.config if body.changes is None else changed(body.changes)
            try:
                new_cfg = DeploymentConfig.model_validate(values)
            except ValidationError as exc:
                # A check across fields has no location; its message starts with the field.
                problems = "; ".join(
                    ".".join(["config", *(str(p) for p in e["loc"])])
                    + ("." if not e["loc"] else ": ")
                    + str(e["msg"]).removeprefix("Value error, ")
                    for e in exc.errors()
                )
                raise HTTPException(422, problems) from None
        try:
            update = deployment.start_update(
                new_cfg, body.mode, body.max_surge, body.update_timeout, body.rollback, body.group
            )
        except UpdateRefused as exc:
            raise HTTPException(exc.status, str(exc)) from None
        except NotImplementedError as exc:
            raise HTTPException(409, str(exc)) from None
        return update.to_dict()

    @app.post(routes.SHUTDOWN, dependencies=guarded, status_code=202)
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
        upstream_timeout=deployment.cfg.upstream_timeout,
        api_key=deployment.cfg.api_key,
        admin_token=deployment.token,
        on_connect_error=deployment.on_connect_error,
        request_log=request_log,
        otel_endpoint=deployment.cfg.otel_collector_endpoint,
    )
    return balancer

"""The engine's HTTP API: OpenAI's, TGI's and FastServe's, over one ``Engine``.

``create_app(engine)`` serves:

- ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE with ``stream: true``, ending with
  ``data: [DONE]``), ``GET /v1/models``: what OpenAI clients and the flockctl balancer speak.
- ``POST /generate`` takes TGI's body (``{"inputs", "parameters": {...}}``, greedy unless
  ``do_sample`` or a sampling parameter is set, as TGI decides) or FastServe's (``{"prompt",
  "max_new_tokens", ...}``, sampling at temperature 1 unless told otherwise), and answers with the
  text plus the job's scheduling figures. ``POST /generate_stream`` (and ``/generate/stream``)
  sends TGI's token events, the last one carrying the text and those figures.
- ``GET /health``, ``/stats``, ``/stats/detailed``, ``/jobs/{id}``, ``/metrics`` for the control
  plane's prober and for people; ``GET /openapi.json`` describes every route and body.

Every error is OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: a body that is
not JSON or fails validation is a 400 whose ``param`` names the field, an unknown model a 404, a
full queue a 429. Bad input is never a 5xx: a body nested past 64 levels or holding a string that
is not Unicode (a lone UTF-16 surrogate, in any field) is a 400 before it reaches a tokenizer. A
bug's 500 says ``Connection: close``, as the server then drops the connection, so a client that
keeps connections alive opens a new one instead of failing its next request. A client that hangs
up cancels its job at once, so the engine never spends iterations on text nobody reads.

Request bodies live in ``protocol.py``; OpenAI's routes in ``openai_routes.py``; the error shape,
body parsing and job submission every route module shares in ``routes_common.py``; SSE and
disconnect handling in ``streaming.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException

from flockctl import __version__
from flockctl.engine import routes_common
from flockctl.engine.embedding_routes import add_embedding_routes
from flockctl.engine.job import INSTANCE, FinishReason, SamplingParams
from flockctl.engine.openai_routes import openai_failed, register_openai
from flockctl.engine.protocol import ChatRequest, CompletionRequest, field_path
from flockctl.engine.protocol_tgi import GenerateRequest
from flockctl.engine.routes_common import (
    CLIENT_CLOSED,
    APIError,
    SafeJSON,
    body_schema,
    collect,
    finish,
    parse,
    run_to_end,
    server_error,
)
from flockctl.engine.streaming import EventStream, sse
from flockctl.engine.tgi_stream import tgi_events
from flockctl.engine.tokenize_routes import add_tokenize_routes
from flockctl.engine.tracing import TraceContextMiddleware
from flockctl.schema import EncoderStats, EngineStats

if TYPE_CHECKING:
    from flockctl.engine.encoder import EncoderEngine
    from flockctl.engine.engine import Engine
    from flockctl.engine.handle import JobHandle

__all__ = [
    "CLIENT_CLOSED",
    "APIError",
    "SafeJSON",
    "collect",
    "create_app",
    "openai_failed",
    "parse",
    "run_to_end",
]

# The bodies the routes parse themselves; /openapi.json gets their schemas from here.
BODIES: tuple[type[BaseModel], ...] = (CompletionRequest, ChatRequest, GenerateRequest)


def create_app(engine: Engine | EncoderEngine) -> FastAPI:
    """Build the engine's ASGI app; the caller owns ``engine`` (loads it, closes it after)."""
    app = FastAPI(
        title="flockctl engine",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        default_response_class=SafeJSON,
    )
    publish_bodies(app)
    observer = getattr(engine, "observer", None)  # an encoder engine runs no jobs
    if observer is not None and observer.active:
        app.add_middleware(TraceContextMiddleware)  # a job's span continues its caller's trace
    tokenizer = engine.tokenizer
    special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()))
    eos_id = getattr(tokenizer, "eos_token_id", None)

    @app.exception_handler(APIError)
    async def _api_error(_req: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        problems = "; ".join(f"{field_path(e['loc']) or 'body'}: {e['msg']}" for e in errors)
        param = field_path(errors[0]["loc"]) if errors else None
        return APIError(400, problems, param or None).response()

    @app.exception_handler(Exception)
    async def _bug(_req: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises the exception after this answer, and uvicorn then logs it and drops
        # the connection: say so, or a keep-alive client sends its next request into a closed one.
        message = f"internal error: {type(exc).__name__}: {exc}"
        return SafeJSON({"error": server_error(message)}, 500, headers={"connection": "close"})

    @app.exception_handler(HTTPException)
    async def _http_error(req: Request, exc: HTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {req.method} {req.url.path}; see /v1/models, /generate, /stats"
        return APIError(exc.status_code, message, code=_snake(str(exc.detail))).response()

    def submit(
        prompt_ids: list[int],
        params: Callable[[], SamplingParams],
        fields: Mapping[str, str] | None = None,
    ) -> JobHandle:
        return routes_common.submit(engine, prompt_ids, params, fields)

    register_openai(app, engine)
    add_embedding_routes(app, engine)
    add_tokenize_routes(app, engine)

    # -- TGI and FastServe -----------------------------------------------------------------------

    def generate_job(body: GenerateRequest) -> JobHandle:
        unsupported = body.unsupported()
        if unsupported is not None:
            raise APIError(400, unsupported[1], unsupported[0], "unsupported_parameter")
        return submit(tokenizer.encode(body.text), body.sampling_params, body.fields())

    def figures(handle: JobHandle) -> dict[str, Any]:
        job = handle.job
        detail = job.detail()
        return {
            "job_id": job.id,
            "total_tokens": job.total_tokens,
            "completion_time": detail["completion_time"],
            "queue_time": detail["queue_time"],
            "execution_time": detail["execution_time"],
            "preemption_count": job.preemption_count,
            "finish_reason": finish(handle),
            "prompt_tokens": len(job.prompt_ids),
            "generated_tokens": len(job.output_ids),
        }

    def tgi_details(handle: JobHandle) -> dict[str, Any]:
        job = handle.job
        if job.finish_reason is FinishReason.LENGTH:
            reason = "length"
        elif job.output_ids and job.output_ids[-1] == eos_id:
            reason = "eos_token"
        else:
            reason = "stop_sequence"
        return {
            "finish_reason": reason,
            "generated_tokens": len(job.output_ids),
            "seed": job.params.seed,
        }

    @app.post("/generate", openapi_extra=body_schema(GenerateRequest))
    async def generate(request: Request) -> Response:
        body = await parse(request, GenerateRequest)
        handle = generate_job(body)
        text, _final = await run_to_end(request, handle)
        out: dict[str, Any] = {"generated_text": body.full_text(text), **figures(handle)}
        if body.wants_details:
            out["details"] = tgi_details(handle)
        return SafeJSON(out)

    async def generate_events(handle: JobHandle, body: GenerateRequest) -> AsyncIterator[bytes]:
        def final(text: str) -> dict[str, Any]:
            return {
                "generated_text": body.full_text(text),
                "details": tgi_details(handle),
                **figures(handle),
            }

        async for event in tgi_events(handle, tokenizer, special_ids, final):
            yield sse(event)

    async def generate_stream(request: Request) -> Response:
        body = await parse(request, GenerateRequest)
        handle = generate_job(body)
        return EventStream(generate_events(handle, body), handle, generate_failed)

    # Two paths (TGI's, and the one some clients build from /generate), so two operation ids.
    for path, operation in (
        ("/generate_stream", "generate_stream"),
        ("/generate/stream", "generate_stream_alias"),
    ):
        app.add_api_route(
            path,
            generate_stream,
            methods=["POST"],
            operation_id=operation,
            openapi_extra=body_schema(GenerateRequest),
        )

    # -- state -----------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, Any]:
        # a dead model loop must fail the probe, so the balancer stops sending work here
        if engine.failed or engine.closing:
            reason = engine.failed or "the engine is shutting down"
            raise APIError(503, reason, code="engine_unavailable", kind="server_error")
        # the instance token begins every job id of this engine: the balancer learns it here
        return {"status": "ok", "model": engine.model_name, "instance": INSTANCE}

    @app.get("/stats", response_model=None)  # sent as built: never filtered by the type
    async def stats() -> EngineStats | EncoderStats:
        stats = engine.stats()
        stats["instance"] = INSTANCE
        return stats

    @app.get("/stats/detailed")
    async def stats_detailed() -> dict[str, Any]:
        return {**engine.stats(detailed=True), "instance": INSTANCE}

    @app.get("/jobs/{job_id}")
    async def job(job_id: str) -> dict[str, Any]:
        # The OpenAI routes answer with "cmpl-" and the job's id; take either form.
        bare = job_id.rpartition("-")[2]
        info = engine.job_info(bare)
        if info is None:
            raise APIError(
                404,
                f"no job {job_id!r}: it never existed or finished too long ago"
                " (live jobs are listed by /stats)",
                code="job_not_found",
            )
        return info

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = engine.metrics.render()
        return Response(body, media_type=content_type)

    return app


# -- helpers shared by the routes -----------------------------------------------------------------


def publish_bodies(app: FastAPI) -> None:
    """Put ``BODIES``' schemas (and the models they use) into the app's OpenAPI components:
    FastAPI sees no body parameter on the routes, so it would not publish them itself."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        first = app.openapi_schema is None
        schema = build()  # FastAPI's own, built once and cached
        if first:
            _refs, defs = models_json_schema(
                [(model, "validation") for model in BODIES],
                ref_template="#/components/schemas/{model}",
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def generate_failed(message: str) -> bytes:
    """The last event of a TGI stream whose events failed, as TGI sends its errors."""
    return sse({"error": message, "error_type": "generation"})


def _snake(text: str) -> str:
    return "_".join(text.lower().split()) or "error"

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

Request bodies live in ``protocol.py``; SSE and disconnect handling in ``streaming.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException

from flockctl import __version__
from flockctl.engine.engine import EngineUnavailable, QueueFull
from flockctl.engine.job import FinishReason, InvalidRequest, SamplingParams
from flockctl.engine.protocol import (
    MAX_DEPTH,
    ChatRequest,
    CompletionRequest,
    GenerateRequest,
    OpenAIRequest,
    field_path,
    first_surrogate,
    too_deep,
)
from flockctl.engine.streaming import EventStream, json_bytes, sse, until_disconnect

if TYPE_CHECKING:
    from flockctl.engine.engine import Engine
    from flockctl.engine.handle import Delta, JobHandle

M = TypeVar("M", bound=BaseModel)

# Not a real status: nobody reads it. It marks, in access logs, a request whose client hung up.
CLIENT_CLOSED = 499

# The bodies the routes parse themselves; /openapi.json gets their schemas from here.
BODIES: tuple[type[BaseModel], ...] = (CompletionRequest, ChatRequest, GenerateRequest)


class SafeJSON(JSONResponse):
    """JSON that a stray string cannot break: see ``json_bytes``."""

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


class APIError(Exception):
    """An answer in OpenAI's error shape; raised anywhere in a route."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        headers = {"retry-after": "1"} if self.status == 429 else None
        return SafeJSON({"error": body}, self.status, headers=headers)


def create_app(engine: Engine) -> FastAPI:
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
    created = int(time.time())
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

    def check_model(model: str | None) -> None:
        if model and model != engine.model_name:
            raise APIError(
                404,
                f"the model {model!r} does not exist here; this server serves"
                f" {engine.model_name!r}",
                "model",
                "model_not_found",
            )

    def submit(
        prompt_ids: list[int],
        params: Callable[[], SamplingParams],
        fields: Mapping[str, str] | None = None,
    ) -> JobHandle:
        """Hand a job to the engine; its refusals become 400/429. ``fields`` renames the
        engine's parameter names (``max_tokens``, ``prompt``) to what this body called them."""
        try:
            return engine.submit(prompt_ids, params())
        except InvalidRequest as exc:
            field = (fields or {}).get(exc.param or "", exc.param)
            message = str(exc) if field == exc.param else f"{field}: {exc}"
            raise APIError(400, message, field) from exc
        except QueueFull as exc:
            raise APIError(429, str(exc), code="queue_full", kind="rate_limit_error") from exc
        except EngineUnavailable as exc:
            raise APIError(503, str(exc), code="engine_unavailable", kind="server_error") from exc

    # -- OpenAI -------------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": engine.model_name,
                    "object": "model",
                    "created": created,
                    "owned_by": "flockctl",
                    "max_model_len": engine.max_model_len,
                }
            ],
        }

    @app.post("/v1/completions", openapi_extra=body_schema(CompletionRequest))
    async def completions(request: Request) -> Response:
        body = await parse(request, CompletionRequest)
        check_openai(body)
        prompt = body.prompt
        prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        handle = submit(prompt_ids, lambda: body.sampling_params(default_max_tokens=16))
        head = openai_head(f"cmpl-{handle.job.id}", "text_completion")
        if body.stream:
            usage = body.include_usage
            return EventStream(completion_events(handle, head, usage), handle, openai_failed)
        text, _final = await run_to_end(request, handle)
        choice = {"index": 0, "text": text, "finish_reason": finish(handle), "logprobs": None}
        return SafeJSON({**head, "choices": [choice], "usage": usage_of(handle)})

    @app.post("/v1/chat/completions", openapi_extra=body_schema(ChatRequest))
    async def chat_completions(request: Request) -> Response:
        body = await parse(request, ChatRequest)
        check_openai(body)
        prompt_ids = chat_prompt(body)
        default = max(engine.max_model_len - len(prompt_ids), 1)
        # The prompt is what the messages became: errors name the fields the client sent.
        limit = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        handle = submit(
            prompt_ids,
            lambda: body.sampling_params(default_max_tokens=default),
            {"prompt": "messages", "max_tokens": limit},
        )
        head = openai_head(f"chatcmpl-{handle.job.id}", "chat.completion")
        if body.stream:
            head["object"] = "chat.completion.chunk"
            events = chat_events(handle, head, body.include_usage)
            return EventStream(events, handle, openai_failed)
        text, _final = await run_to_end(request, handle)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish(handle),
            "logprobs": None,
        }
        return SafeJSON({**head, "choices": [choice], "usage": usage_of(handle)})

    def check_openai(body: OpenAIRequest) -> None:
        check_model(body.model)
        unsupported = body.unsupported()
        if unsupported is not None:
            raise APIError(400, unsupported[1], unsupported[0], "unsupported_parameter")

    def chat_prompt(body: ChatRequest) -> list[int]:
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(
                400,
                f"the model {engine.model_name!r} has no chat template, so it cannot take"
                " messages; send a prompt to /v1/completions instead",
                "messages",
                "no_chat_template",
            )
        # Templates index message["content"]; an assistant turn may have sent none.
        messages = [
            {**m.model_dump(exclude_none=True), "content": m.content or ""} for m in body.messages
        ]
        try:
            out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # templates raise on what they refuse (roles out of order...)
            raise APIError(
                400, f"the chat template rejected the messages: {exc}", "messages"
            ) from exc
        ids = out["input_ids"] if isinstance(out, Mapping) else out
        if ids and isinstance(ids[0], list):  # a batch of one
            ids = ids[0]
        return [int(t) for t in ids]

    def openai_head(response_id: str, kind: str) -> dict[str, Any]:
        return {
            "id": response_id,
            "object": kind,
            "created": int(time.time()),
            "model": engine.model_name,
        }

    async def completion_events(
        handle: JobHandle, head: dict[str, Any], include_usage: bool
    ) -> AsyncIterator[bytes]:
        extra = {"usage": None} if include_usage else {}
        async for delta in handle:
            if delta.error:
                yield sse({"error": server_error(delta.error)})
                break
            if delta.text or delta.finish_reason is not None:
                reason = delta.finish_reason.value if delta.finish_reason else None
                choice = {"index": 0, "text": delta.text, "finish_reason": reason, "logprobs": None}
                yield sse({**head, "choices": [choice], **extra})
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage_of(handle)})
        yield b"data: [DONE]\n\n"

    async def chat_events(
        handle: JobHandle, head: dict[str, Any], include_usage: bool
    ) -> AsyncIterator[bytes]:
        extra = {"usage": None} if include_usage else {}

        def chunk(delta: dict[str, Any], reason: FinishReason | None = None) -> bytes:
            choice = {
                "index": 0,
                "delta": delta,
                "finish_reason": reason.value if reason else None,
                "logprobs": None,
            }
            return sse({**head, "choices": [choice], **extra})

        yield chunk({"role": "assistant", "content": ""})
        async for delta in handle:
            if delta.error:
                yield sse({"error": server_error(delta.error)})
                break
            if delta.finish_reason is not None:
                yield chunk({"content": delta.text} if delta.text else {}, delta.finish_reason)
            elif delta.text:
                yield chunk({"content": delta.text})
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage_of(handle)})
        yield b"data: [DONE]\n\n"

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
        parts: list[str] = []
        index = 0
        async for delta in handle:
            if delta.error:
                yield sse({"error": delta.error, "error_type": "generation"})
                return
            parts.append(delta.text)
            index += max(len(delta.token_ids), 1)
            token_id = delta.token_ids[-1] if delta.token_ids else None
            token = {
                "id": token_id,
                "text": delta.text,
                "logprob": None,
                "special": token_id in special_ids,
            }
            event: dict[str, Any] = {
                "index": index,
                "token": token,
                "generated_text": None,
                "details": None,
            }
            if delta.finish_reason is not None:
                event["generated_text"] = body.full_text("".join(parts))
                event["details"] = tgi_details(handle)
                event.update(figures(handle))
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
        return {"status": "ok", "model": engine.model_name}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return engine.stats()

    @app.get("/stats/detailed")
    async def stats_detailed() -> dict[str, Any]:
        return engine.stats(detailed=True)

    @app.get("/jobs/{job_id}")
    async def job(job_id: str) -> dict[str, Any]:
        # The OpenAI routes answer with "cmpl-job-7"; take either form.
        bare = job_id.removeprefix("chatcmpl-").removeprefix("cmpl-")
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


async def parse(request: Request, model: type[M]) -> M:
    """Read and validate a JSON body, here rather than by FastAPI: a body sent without a
    content-type is taken as JSON, every failure gets the same 400 shape, and a non-JSON
    content-type (``curl -d`` sends a form's) gets a 415 that says what to send."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type and not (content_type == "application/json" or content_type.endswith("+json")):
        raise APIError(
            415, f"send the body as JSON (content-type: application/json), not {content_type}"
        )
    raw = await request.body()
    if not raw.strip():
        raise APIError(400, "the request has no body; send a JSON object")
    if too_deep(raw):  # before json.loads, which recurses once per level
        raise APIError(
            400,
            f"the body nests deeper than {MAX_DEPTH} levels of arrays and objects;"
            " no field of this API needs more than four",
        )
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, not {type(data).__name__}")
    # Every string, known field or not: a lone surrogate breaks tokenizers and JSON encoding.
    found = first_surrogate(data)
    if found is not None:
        param, problem = found
        raise APIError(400, f"{param or 'the body'} {problem}", param or None)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_input=False)) from exc


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a route that parses ``model`` itself (``parse``)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


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


def server_error(message: str) -> dict[str, Any]:
    return {"message": message, "type": "server_error", "param": None, "code": None}


def finish(handle: JobHandle) -> str | None:
    reason = handle.job.finish_reason
    return reason.value if reason is not None else None


def openai_failed(message: str) -> bytes:
    """The last events of an OpenAI stream whose events failed."""
    return sse({"error": server_error(message)}) + b"data: [DONE]\n\n"


def generate_failed(message: str) -> bytes:
    """The last event of a TGI stream whose events failed, as TGI sends its errors."""
    return sse({"error": message, "error_type": "generation"})


def usage_of(handle: JobHandle) -> dict[str, int]:
    job = handle.job
    prompt, completion = len(job.prompt_ids), len(job.output_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _snake(text: str) -> str:
    return "_".join(text.lower().split()) or "error"


async def collect(handle: JobHandle) -> tuple[str, Delta]:
    """The whole text of a job and its last delta."""
    parts: list[str] = []
    async for delta in handle:
        parts.append(delta.text)
        if delta.finish_reason is not None:
            return "".join(parts), delta
    raise RuntimeError(f"job {handle.job.id} ended without a finish reason")


async def run_to_end(request: Request, handle: JobHandle) -> tuple[str, Delta]:
    """Wait for a non-streaming job; a client gone first cancels it (the route answers 499)."""
    outcome = await until_disconnect(collect(handle), request.receive, handle)
    if outcome is None:
        raise APIError(CLIENT_CLOSED, "the client closed the connection", code="client_closed")
    text, final = outcome
    if final.finish_reason is FinishReason.ABORT:
        raise APIError(
            503,
            final.error or f"job {handle.job.id} was aborted",
            code="aborted",
            kind="server_error",
        )
    return text, final

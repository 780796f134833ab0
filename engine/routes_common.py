"""What every route module of the engine's API shares: the error shape, body parsing, handing a
job to the engine, and waiting for one.

Every error is OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: a body that is
not JSON or fails validation is a 400 whose ``param`` names the field, an unknown model a 404, a
full queue a 429.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from flockctl.engine.engine import EngineUnavailable, QueueFull
from flockctl.engine.job import FinishReason, InvalidRequest, SamplingParams
from flockctl.engine.protocol import MAX_DEPTH, first_surrogate, too_deep
from flockctl.engine.streaming import json_bytes, until_disconnect

if TYPE_CHECKING:
    from flockctl.engine.encoder import EncoderEngine
    from flockctl.engine.engine import Engine
    from flockctl.engine.handle import Delta, JobHandle

M = TypeVar("M", bound=BaseModel)

# Not a real status: nobody reads it. It marks, in access logs, a request whose client hung up.
CLIENT_CLOSED = 499


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


def check_model(engine: Engine | EncoderEngine, model: str | None) -> None:
    """A 404 for a model this engine does not serve (none named: the one it serves)."""
    if model and model != engine.model_name:
        raise APIError(
            404,
            f"the model {model!r} does not exist here; this server serves {engine.model_name!r}",
            "model",
            "model_not_found",
        )


def submit(
    engine: Engine | EncoderEngine,
    prompt_ids: list[int],
    params: Callable[[], SamplingParams],
    fields: Mapping[str, str] | None = None,
) -> JobHandle:
    """Hand a job to the engine; its refusals become 400/429/503. ``fields`` renames the
    engine's parameter names (``max_tokens``, ``prompt``) to what this body called them."""
    with refusals(fields):
        return engine.submit(prompt_ids, params())
    raise AssertionError("unreachable")  # refusals() re-raises every exception it catches


@contextlib.contextmanager
def refusals(fields: Mapping[str, str] | None = None) -> Iterator[None]:
    """The engine's refusals of a job, as the API's errors: 400 naming the field, 429, 503."""
    try:
        yield
    except InvalidRequest as exc:
        field = (fields or {}).get(exc.param or "", exc.param)
        message = str(exc) if field == exc.param else f"{field}: {exc}"
        raise APIError(400, message, field) from exc
    except QueueFull as exc:
        raise APIError(429, str(exc), code="queue_full", kind="rate_limit_error") from exc
    except EngineUnavailable as exc:
        raise APIError(503, str(exc), code="engine_unavailable", kind="server_error") from exc


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


def server_error(message: str) -> dict[str, Any]:
    return {"message": message, "type": "server_error", "param": None, "code": None}


def finish(handle: JobHandle) -> str | None:
    reason = handle.job.finish_reason
    return reason.value if reason is not None else None


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

"""``POST /v1/embeddings`` in OpenAI's shape, over the engine's :class:`~.embeddings.Embedder`.

``input`` is a string, a list of strings, a list of token ids or a list of such lists (at most
:data:`~.embeddings.MAX_INPUTS`, none empty, none longer than the model's context); each comes
back as ``{"object": "embedding", "index": i, "embedding": [...]}`` in order, as floats or, with
``encoding_format: "base64"``, as the base64 of little-endian float32 bytes (what OpenAI's client
asks for by default and decodes). ``dimensions`` is refused with a 400 unless the model was trained
to be shortened (``matryoshka_dimensions`` in its config); then the vector is cut and normalized
again. On an embedding-only model the generation routes answer 400 naming ``model``.
"""

from __future__ import annotations

import base64
import struct
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import field_validator

from flockctl.engine.embeddings import EmbedderClosed
from flockctl.engine.job import InvalidRequest
from flockctl.engine.protocol import Body
from flockctl.engine.routes_common import APIError, SafeJSON, check_model, parse
from flockctl.engine.streaming import until_disconnect

if TYPE_CHECKING:
    from flockctl.engine.encoder import EncoderEngine
    from flockctl.engine.engine import Engine

# The routes a model without a generative head answers with a 400 (and why).
GENERATION_ROUTES = (
    "/v1/completions",
    "/v1/chat/completions",
    "/generate",
    "/generate_stream",
    "/generate/stream",
)


class EmbeddingRequest(Body):
    """OpenAI's embeddings body; ``add_special_tokens`` is vLLM's extension."""

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    add_special_tokens: bool = True

    @field_validator("input", mode="before")
    @classmethod
    def _one_shape(cls, value: Any) -> Any:
        """One of OpenAI's four shapes, never a mix, so the error names the field once."""
        if isinstance(value, str) or (isinstance(value, list) and _one_form(value)):
            return value
        raise ValueError(
            "input must be a string, a list of strings, a list of token ids or a list of lists"
            " of token ids"
        )


def inline_body(model: type[Body]) -> dict[str, Any]:
    """The OpenAPI request body of a route that parses ``model`` itself."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    content = {"application/json": {"schema": schema}}
    return {"requestBody": {"required": True, "content": content}}


class _NoJob:
    """What ``until_disconnect`` cancels when the client goes: an embedding has no job (the
    cancelled wait drops its inputs from the queue)."""

    def cancel(self) -> None:
        pass


def add_embedding_routes(app: FastAPI, engine: Engine | EncoderEngine) -> None:
    """Serve ``/v1/embeddings``; on a model that cannot generate, refuse the generation routes."""
    tokenizer = engine.tokenizer

    def token_lists(body: EmbeddingRequest) -> list[list[int]]:
        value = body.input
        if isinstance(value, str) or (value and isinstance(value[0], str)):
            texts = [value] if isinstance(value, str) else list(value)
            for i, text in enumerate(texts):
                if not text:
                    where = f"input[{i}]" if isinstance(value, list) else "input"
                    raise APIError(400, f"{where} is an empty string; send some text", where)
            encoded = tokenizer(texts, add_special_tokens=body.add_special_tokens)
            return [list(ids) for ids in encoded["input_ids"]]
        if value and isinstance(value[0], list):
            return [list(ids) for ids in value]
        return [list(value)] if value else []  # type: ignore[arg-type]

    @app.post("/v1/embeddings", openapi_extra=inline_body(EmbeddingRequest))
    async def embeddings(request: Request) -> Response:
        body = await parse(request, EmbeddingRequest)
        check_model(engine, body.model)
        if engine.failed or engine.closing:
            reason = engine.failed or "the engine is shutting down"
            raise APIError(503, reason, code="engine_unavailable", kind="server_error")
        inputs = token_lists(body)
        try:
            vectors = await until_disconnect(
                engine.embedder.embed(inputs, body.dimensions), request.receive, _NoJob()
            )
        except InvalidRequest as exc:
            raise APIError(400, str(exc), exc.param) from exc
        except EmbedderClosed as exc:
            raise APIError(503, str(exc), code="engine_unavailable", kind="server_error") from exc
        if vectors is None:
            raise APIError(499, "the client closed the connection", code="client_closed")
        data = [
            {"object": "embedding", "index": i, "embedding": encode(v, body.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        tokens = sum(len(ids) for ids in inputs)
        return SafeJSON(
            {
                "object": "list",
                "data": data,
                "model": engine.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    if "generate" not in engine.capabilities:
        _refuse_generation(app, engine.model_name)


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def _one_form(items: list[Any]) -> bool:
    return (
        all(isinstance(x, str) for x in items) or _is_ids(items) or all(_is_ids(x) for x in items)
    )


def encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def _refuse_generation(app: FastAPI, model_name: str) -> None:
    """Put a 400 in front of every generation route: this model has no head to generate with."""

    async def refuse(_request: Request) -> Response:
        raise APIError(
            400,
            f"the model {model_name!r} is an embedding model: it serves /v1/embeddings,"
            " /tokenize and /detokenize, not text generation",
            "model",
            "embedding_model",
        )

    for path in GENERATION_ROUTES:
        app.add_api_route(path, refuse, methods=["POST"], include_in_schema=False)
        app.router.routes.insert(0, app.router.routes.pop())

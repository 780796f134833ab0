"""``POST /tokenize`` and ``POST /detokenize`` in vLLM's shapes.

``/tokenize`` takes ``{"prompt": text}`` (``add_special_tokens`` defaults to true) or
``{"messages": [...]}`` run through the model's chat template (``add_generation_prompt`` true and
``add_special_tokens`` false by default, as vLLM's chat form: the template writes the special
tokens itself) and answers ``{"count", "max_model_len", "tokens", "token_strs"}``, the token
strings only when ``return_token_strs`` is true. ``/detokenize`` takes ``{"tokens": [...]}`` and
answers ``{"prompt": text}``. What a client counts here is what the engine will see: the same
tokenizer and template as the generation routes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import Field

from flockctl.engine.embedding_routes import inline_body
from flockctl.engine.protocol import Body, ChatMessage
from flockctl.engine.routes_common import APIError, SafeJSON, check_model, parse

if TYPE_CHECKING:
    from flockctl.engine.encoder import EncoderEngine
    from flockctl.engine.engine import Engine


class TokenizeRequest(Body):
    """vLLM's two tokenize bodies in one: exactly one of ``prompt`` and ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[int]


def add_tokenize_routes(app: FastAPI, engine: Engine | EncoderEngine) -> None:
    tokenizer = engine.tokenizer
    vocab_size = len(tokenizer)

    def chat_text(body: TokenizeRequest) -> str:
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(
                400,
                f"the model {engine.model_name!r} has no chat template, so it cannot take"
                " messages; send a prompt instead",
                "messages",
                "no_chat_template",
            )
        messages = [
            {**m.model_dump(exclude_none=True), "content": m.content or ""}
            for m in body.messages or ()
        ]
        try:
            text = tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=body.add_generation_prompt,
                continue_final_message=body.continue_final_message,
                tokenize=False,
            )
        except Exception as exc:  # templates raise on what they refuse (roles out of order...)
            raise APIError(
                400, f"the chat template rejected the messages: {exc}", "messages"
            ) from exc
        return str(text)

    @app.post("/tokenize", openapi_extra=inline_body(TokenizeRequest))
    async def tokenize(request: Request) -> Response:
        body = await parse(request, TokenizeRequest)
        check_model(engine, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of prompt and messages", "prompt")
        if body.continue_final_message and body.add_generation_prompt:
            raise APIError(
                400,
                "continue_final_message needs add_generation_prompt false: the reply continues"
                " the last message instead of starting a new one",
                "continue_final_message",
            )
        if body.messages is not None:
            text, special = chat_text(body), bool(body.add_special_tokens)
        else:
            text = body.prompt or ""
            special = body.add_special_tokens is not False
        tokens = list(tokenizer.encode(text, add_special_tokens=special))
        strings = tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
        out: dict[str, Any] = {
            "count": len(tokens),
            "max_model_len": engine.max_model_len,
            "tokens": tokens,
            "token_strs": strings,
        }
        return SafeJSON(out)

    @app.post("/detokenize", openapi_extra=inline_body(DetokenizeRequest))
    async def detokenize(request: Request) -> Response:
        body = await parse(request, DetokenizeRequest)
        check_model(engine, body.model)
        for i, token in enumerate(body.tokens):
            if not 0 <= token < vocab_size:
                raise APIError(
                    400,
                    f"tokens[{i}]: token id {token} is outside the vocabulary"
                    f" (0..{vocab_size - 1})",
                    f"tokens[{i}]",
                )
        return SafeJSON({"prompt": tokenizer.decode(body.tokens)})

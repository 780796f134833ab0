"""What a routing decision may know about a relayed request: its model, prompt text and session.

The balancer relays request bytes unchanged and, by default, never parses them: least-connection
needs nothing from the body, and a JSON parse would be most of its CPU per request. Policies that
route on content (``prefix``) and routing by model ask for a ``RequestMeta``; the body is then
parsed once, here, and the prompt text the policy sees is capped (``PROMPT_CHARS``) so that a
huge prompt costs the balancer no more than its first characters.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: The most prompt characters a policy sees; a shared prefix longer than this is all the same.
PROMPT_CHARS = 16 * 1024


@dataclass(frozen=True, slots=True)
class RequestMeta:
    """The routing-relevant parts of one request; ``None`` where the request does not say."""

    model: str | None = None
    #: The prompt as text, in order (chat messages rendered one after another), capped.
    prompt_text: str | None = None
    #: ``x-session-id`` header, else the OpenAI body's ``user``.
    session: str | None = None


#: The meta of a request whose content nobody asked for (the default, parse-free path).
NO_META = RequestMeta()


def _text(value: Any) -> str:
    """A prompt value as text: a string, a list of strings or token ids, or content parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts: list[str] = []
        for item in value:
            if isinstance(item, str):
                parts.append(item)
            elif isinstance(item, int):
                parts.append(f"{item} ")
            elif isinstance(item, list):
                parts.append(_text(item))
            elif isinstance(item, dict) and isinstance(item.get("text"), str):
                parts.append(item["text"])  # chat content part {"type": "text", "text": ...}
        return "".join(parts)
    return ""


def _chat_text(messages: list[Any]) -> str:
    """Chat messages rendered in order, role first: a longer conversation extends a shorter one."""
    out: list[str] = []
    size = 0
    for m in messages:
        if not isinstance(m, dict):
            continue
        piece = f"<{m.get('role', '')}>{_text(m.get('content'))}\n"
        out.append(piece)
        size += len(piece)
        if size >= PROMPT_CHARS:
            break
    return "".join(out)


def prompt_of(body: dict[str, Any]) -> str | None:
    """The prompt text of a parsed request body: chat ``messages``, completions ``prompt``,
    or ``/generate``'s ``inputs``; None if it has none of them."""
    if isinstance(body.get("messages"), list):
        text = _chat_text(body["messages"])
    elif "prompt" in body:
        text = _text(body["prompt"])
    elif "inputs" in body:
        text = _text(body["inputs"])
    else:
        return None
    return text[:PROMPT_CHARS]


def extract(headers: Iterable[tuple[bytes, bytes]], body: bytes) -> RequestMeta:
    """The meta of a request from its (ASGI, lower-case) headers and whole body.

    A body that is not a JSON object gives no model and no prompt: the worker, not the
    balancer, answers that it is malformed.
    """
    session: str | None = None
    for k, v in headers:
        if k == b"x-session-id":
            session = v.decode("latin-1")
            break
    parsed: Any = None
    if body[:1] == b"{" or body.lstrip()[:1] == b"{":
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            parsed = None
    if not isinstance(parsed, dict):
        return RequestMeta(session=session)
    model = parsed.get("model")
    if session is None and isinstance(parsed.get("user"), str) and parsed["user"]:
        session = parsed["user"]
    return RequestMeta(
        model=model if isinstance(model, str) else None,
        prompt_text=prompt_of(parsed),
        session=session,
    )

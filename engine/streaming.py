"""Server-sent events and client disconnects, for routes that wait on a job.

A job costs the engine an iteration slot for every token, so a request whose client has gone
must stop its job at once, including while the job still waits in the queue and nothing is being
sent (a failed send alone would notice only at the next token). Both helpers watch the ASGI
``receive`` channel for ``http.disconnect`` next to the work.

A stream whose events fail half way ends with an error event, whole: left to the server, the
exception would cut the chunked body and the connection with it, and the client could not tell a
bug from a network fault.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

if TYPE_CHECKING:
    from flockctl.engine.handle import JobHandle

T = TypeVar("T")


class Cancellable(Protocol):
    """What ``until_disconnect`` stops when the client goes: a job's handle, or a stand-in for
    work that has no job."""

    def cancel(self) -> None: ...


log = logging.getLogger("flockctl.engine")

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}

_SURROGATE = re.compile("[\ud800-\udfff]")


def json_bytes(obj: Any) -> bytes:
    """Compact JSON in UTF-8 that can always be sent.

    A str holding a lone UTF-16 surrogate cannot be encoded as UTF-8; rather than fail a whole
    answer (a job listing, an event) over one string, such characters go out as U+FFFD. Requests
    with one are refused at the door, so this is the last guard, and costs nothing until needed.
    """
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        return text.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text).encode()


def sse(obj: Mapping[str, Any]) -> bytes:
    """One event: ``data: <json>`` and a blank line (JSON escapes newlines, so it is one line)."""
    return b"data: " + json_bytes(obj) + b"\n\n"


async def until_disconnect(work: Awaitable[T], receive: Receive, handle: Cancellable) -> T | None:
    """Run ``work`` while watching the connection for ``http.disconnect``.

    Returns what ``work`` returns, or None if the client went away first; then, or if ``work``
    failed, the job is cancelled. The body has already been read, so the only message left on
    ``receive`` is the disconnect (uvicorn and httpx's ASGITransport both send it when the
    connection drops or the response is complete).
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    finished = False
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            return None
        result = task.result()
        finished = True
        return result
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait((task,))  # let it unwind; never re-raises its cancellation
        if not finished:
            handle.cancel()


async def _disconnected(receive: Receive) -> None:
    while True:
        try:
            message = await receive()
        except Exception:  # a server that raises once the client is gone
            return
        if message["type"] == "http.disconnect":
            return


class EventStream(StreamingResponse):
    """``text/event-stream`` of a job's events that cancels the job when the client hangs up,
    even while the job waits in the queue and no event is being sent.

    ``failed`` renders the last event when ``events`` raises: the message in the route's own
    error shape (the exception is logged with its traceback).
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        handle: JobHandle,
        failed: Callable[[str], bytes],
    ):
        super().__init__(_ending_on_error(events, failed, handle), headers=SSE_HEADERS)
        self.events = events
        self.handle = handle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await until_disconnect(self.stream_response(send), receive, self.handle)
        except OSError:  # the send failed: the client is gone (ASGI spec 2.4)
            pass
        finally:
            for events in (self.body_iterator, self.events):
                aclose = getattr(events, "aclose", None)
                if aclose is not None:
                    await aclose()


async def _ending_on_error(
    events: AsyncIterator[bytes], failed: Callable[[str], bytes], handle: JobHandle
) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield event
    except Exception as exc:
        log.exception("the event stream of job %s failed", handle.job.id)
        handle.cancel()
        yield failed(f"internal error: {type(exc).__name__}: {exc}")

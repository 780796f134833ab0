"""The daemon's HTTP/1.1 connections: uvicorn's httptools protocol held to the front-door limits.

uvicorn parses requests with httptools and has no limit on a request's size or on the time its
head and body take to arrive (its keep-alive timer restarts on every byte; see uvicorn issue 157),
and its ``limit_concurrency`` only answers 503 once a whole head arrived, so idle connections
still hold descriptors. ``FrontDoorProtocol`` adds, per connection (``flockctl.server.limits``
says why each limit exists):

- ``max_connections`` open: the connection idle the longest (kept alive between requests, or
  still trickling its request head, then answered 408) is closed to make room for the new one;
  when every connection has a request under way, the new one is answered 503 and closed at
  once, before anything is read, so it never holds a descriptor that probes and upstreams need;
- request line and headers over ``max_head_size``: 431. Bytes are counted as they arrive, before
  httptools joins a header's pieces (a 50 MB header line used to cost seconds of CPU);
- a ``Content-Length`` over ``max_body_size``: 413 as soon as the head is parsed, before any body
  is read; a chunked body: 413 as soon as it passes the limit;
- a request head not wholly received ``header_timeout`` seconds after its first byte (or after the
  connection opened): 408; its body not received within ``body_timeout``: 408. The deadline is
  armed only when a read ends with a request still incomplete, so a request that arrives in one
  piece (nearly all of them) arms no timer, and it is cancelled once the request is complete:
  an answer, streamed or not, is never cut by it, nor is a client waiting for its answer.

Every refusal is a JSON error (``{"error": {"message", "type", "code"}}``) with
``Connection: close``; what the client still sends is then read and dropped for
``limits.LINGER_SECONDS`` before the connection closes, so the answer is not lost to a reset.

It overrides parser callbacks of uvicorn's ``HttpToolsProtocol`` and replaces its
``data_received`` (the same body, plus the head count and the deadline), read from uvicorn 0.35.
Per request it adds about 1 us of CPU (the balancer spends 80-100 us).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from flockctl.server.limits import FrontDoor, format_size
from flockctl.server.proxy import json_error

log = logging.getLogger("flockctl.limits")

#: Refusals are logged at most once per this many seconds, with counts, so a flood of bad
#: requests cannot flood the log.
LOG_EVERY_SECONDS = 10.0


class _Answered(Exception):
    """Raised in a parser callback to stop parsing once an error answer went out."""


class Refusals:
    """Counts the requests and connections refused, logged in batches."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self._logged_at = float("-inf")

    def note(self, status: int, now: float) -> None:
        self.counts[status] += 1
        if now - self._logged_at >= LOG_EVERY_SECONDS:
            self._logged_at = now
            summary = ", ".join(f"{n} x {status}" for status, n in sorted(self.counts.items()))
            log.warning("refused at the front door since the last report: %s", summary)
            self.counts.clear()


#: Told of each refusal: status, method and path (None where the head never came), client host.
OnRefused = Callable[[int, "str | None", "str | None", "str | None"], None]


class FrontDoorProtocol(HttpToolsProtocol):
    """One client connection; ``protocol_class`` binds the limits it applies."""

    front_door: FrontDoor
    refusals: Refusals
    #: Where refusals are counted and logged (the balancer's ``/metrics`` and request log).
    on_refused: OnRefused | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The request deadline (or, after an error answer, the end of the linger).
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = 0.0
        #: Bytes read now belong to a request head (or to nothing yet), and how many did since
        #: the last head ended: more than zero after a read means a head is incomplete.
        self._reading_head = True
        self._head_bytes = 0
        self._body_bytes = 0
        #: An error answer went out: what arrives now is dropped.
        self._answered = False
        #: When this connection last had no request under way (opened, or finished one).
        self._idle_since = 0.0

    # Connection events

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.front_door.max_connections and not self._make_room():
            # Closed at once, without reading: a connection over the cap must not hold a
            # descriptor (lingering here would let a flood of them do exactly that).
            self.transport = transport
            self._answered = True
            door = self.front_door
            transport.write(
                self._error_bytes(
                    503,
                    f"the balancer holds its limit of {door.max_connections} open connections;"
                    " retry shortly",
                    "service_unavailable",
                    b"retry-after: 1\r\n",
                )
            )
            transport.close()
            self._refused(503, transport)
            return
        super().connection_made(transport)
        self._idle_since = self.loop.time()
        self._arm(self._idle_since)

    def _make_room(self) -> bool:
        """At the cap, close a connection with no request under way, so that slow or idle
        clients cannot hold the door shut: first one that never sent a whole request or is
        trickling its head (answered 408), then one kept alive between requests; the oldest of
        each first, so a flood of new connections evicts the flood's own before anyone's.
        False when every connection has a request under way."""
        idle = [c for c in self.connections if isinstance(c, FrontDoorProtocol) and c._idle()]
        if not idle:
            return False
        victim = min(idle, key=lambda conn: (conn._kept_alive(), conn._idle_since))
        victim._evict()
        return True

    def _idle(self) -> bool:
        """No request under way: nothing read of one yet, or only part of its head."""
        if self._answered or not self._reading_head or self.transport.is_closing():
            return False
        return self.cycle is None or self.cycle.response_complete

    def _kept_alive(self) -> bool:
        """Between two requests, after a whole one: the last to go, since such a client is
        likely to send the next one on it (a silent or trickling one goes first)."""
        return self.cycle is not None and not self._head_bytes

    def _evict(self) -> None:
        self._answered = True
        self._disarm()
        if self._head_bytes:
            message = (
                "the request head was still incomplete when the balancer, at its connection"
                " limit, needed the connection for another client"
            )
            self.transport.write(self._error_bytes(408, message, "request_timeout"))
            self._refused(408, self.transport)
        self.transport.close()  # now, without lingering: the descriptor is what is short

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self._answered:
            self.transport.close()
            return
        super().shutdown()

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return
        self._unset_keepalive_if_required()
        if self._reading_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._answered:
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._reading_head and self._head_bytes > self.front_door.max_head_size:
            self._refuse_head()
        elif self._timer is None and (self._head_bytes or not self._reading_head):
            # This read left a request head or body incomplete: it must finish in time.
            self._arm(self.loop.time())

    # Parser callbacks

    def on_headers_complete(self) -> None:
        door = self.front_door
        if self._head_bytes > door.max_head_size and self._head_size() > door.max_head_size:
            self._refuse_head()
            raise _Answered
        self._reading_head = False
        self._head_bytes = 0
        for name, value in self.headers:
            if name == b"content-length":
                if int(value) > door.max_body_size:
                    self._refuse_body()
                    raise _Answered
                break
        HttpToolsProtocol.on_headers_complete(self)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self.front_door.max_body_size:
            if self.cycle.response_started:
                # The request was answered without its body (a 401, say): stop reading it.
                self._answered = True
                self._disarm()
                self.transport.close()
            else:
                self._refuse_body()
            raise _Answered
        HttpToolsProtocol.on_body(self, body)

    def on_message_complete(self) -> None:
        self._idle_since = self.loop.time()
        self._reading_head = True
        self._body_bytes = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        HttpToolsProtocol.on_message_complete(self)

    # Limits

    def _arm(self, now: float) -> None:
        self._armed_at = now
        self._timer = self.loop.call_later(self.front_door.header_timeout, self._deadline_passed)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _deadline_passed(self) -> None:
        self._timer = None
        if self._answered or self.transport.is_closing():
            return
        door = self.front_door
        cycle = self.cycle
        answering = cycle is not None and cycle.response_started and not cycle.response_complete
        if answering or self.flow.read_paused:
            # An answer is going out (a stream may last minutes), or reading waits for the app
            # to take what it has: the client is not the one late.
            self._timer = self.loop.call_later(door.header_timeout, self._deadline_passed)
            return
        if self._reading_head:
            if cycle is not None and not self._head_bytes:
                return  # no request under way: an idle kept-alive connection, uvicorn's to close
            message = (
                f"the request head did not arrive within {door.header_timeout:g}s"
                " (the balancer's --header-timeout)"
            )
        else:
            left = self._armed_at + door.body_timeout - self.loop.time()
            if left > 0:
                self._timer = self.loop.call_later(left, self._deadline_passed)
                return
            if cycle is not None and cycle.response_complete:
                # Answered without its body (a 401, say), which then stopped coming.
                self._answered = True
                self.transport.close()
                return
            message = f"the request body did not arrive within {door.body_timeout:g}s"
        self._answer(408, message, "request_timeout")

    def _head_size(self) -> int:
        """The head's size as parsed: request line and header lines (exact to a few bytes)."""
        return len(self.url) + 16 + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _refuse_head(self) -> None:
        limit = format_size(self.front_door.max_head_size)
        self._answer(
            431, f"request line and headers are larger than {limit}", "request_header_too_large"
        )

    def _refuse_body(self) -> None:
        limit = format_size(self.front_door.max_body_size)
        self._answer(
            413,
            f"request body is larger than {limit} (the balancer's --max-body-size)",
            "request_too_large",
        )

    def _answer(self, status: int, message: str, kind: str) -> None:
        """Send an error answer with ``Connection: close``, drop what follows, close soon."""
        self._answered = True
        self._disarm()
        self._unset_keepalive_if_required()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The app waiting for this request's body sees a disconnect, and anything it
            # sends now is dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        self.flow.resume_reading()
        self.transport.write(self._error_bytes(status, message, kind))
        if self.transport.can_write_eof():  # not under TLS
            self.transport.write_eof()
        self._timer = self.loop.call_later(self.front_door.linger, self.transport.close)
        self._refused(status, self.transport)

    def _refused(self, status: int, transport: asyncio.BaseTransport) -> None:
        """Count a refusal, log it in batches, and tell ``on_refused`` what is known of it."""
        self.refusals.note(status, self.loop.time())
        if self.on_refused is None:
            return
        method = path = None
        url: bytes = getattr(self, "url", b"")
        if url:  # the request line came: its method and path are known
            path = url.split(b"?", 1)[0].decode("latin-1")
            with contextlib.suppress(httptools.HttpParserError):
                method = self.parser.get_method().decode("latin-1")
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else None
        try:
            self.on_refused(status, method, path, client)
        except Exception:  # the refusal itself must go out whatever the log does
            log.exception("recording a refused request failed")

    def _error_bytes(self, status: int, message: str, kind: str, extra: bytes = b"") -> bytes:
        _, body = json_error(status, message, kind)
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n"
            % len(body)
        )
        head += [extra, b"\r\n", body]
        return b"".join(head)


def protocol_class(
    front_door: FrontDoor, on_refused: OnRefused | None = None
) -> type[FrontDoorProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` that applies ``front_door`` and tells
    ``on_refused`` of every request or connection it refuses."""
    return type(
        "FrontDoorProtocol",
        (FrontDoorProtocol,),
        {
            "front_door": front_door,
            "refusals": Refusals(),
            "on_refused": None if on_refused is None else staticmethod(on_refused),
        },
    )

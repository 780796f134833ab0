"""Limits at the daemon's front door: body and head sizes, deadlines, connections, descriptors.

Without them one client could take the daemon down for everyone (measured on the first build):
a 200 MB body was buffered whole (RSS 64 -> 648 MB); a 50 MB header line stalled all traffic for
2.3 s while the parser grew it; a client trickling a request head held its connection for ever
(uvicorn has no deadline for a request head, and its keep-alive timer restarts on every byte);
and 1,100 idle connections used up an open-file limit of 1024, so normal requests failed and
the prober's own connections failed too, marking healthy workers NOT_READY.

This module holds the settings and the arithmetic (pure, tested directly) and raises the
open-file limit at start; ``flockctl.server.http_protocol`` applies them to each connection.
"""

from __future__ import annotations

import logging
import re
import resource
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flockctl.schema import LimitsView

if TYPE_CHECKING:
    from flockctl.server.config import DeploymentConfig

log = logging.getLogger("flockctl.limits")

#: The request line plus the header block; larger is refused with 431 (nginx allows 8 KiB a
#: line and 32 KiB in all by default; nothing an OpenAI client sends comes near either).
MAX_HEAD_BYTES = 64 * 1024
#: Time a request body gets beyond ``--header-timeout``: a 32 MiB upload at 4 Mbit/s fits.
BODY_GRACE_SECONDS = 60.0
#: An idle keep-alive connection is closed after this long (uvicorn's ``timeout_keep_alive``).
KEEP_ALIVE_SECONDS = 30
#: After an error answer, what the client still sends is read and dropped this long before the
#: connection closes: closing with unread bytes makes the kernel send a reset, which can destroy
#: the answer before the client reads it (nginx's lingering close does the same).
LINGER_SECONDS = 2.0
#: Descriptors kept for the daemon itself whatever the workers: the listening socket, logs,
#: state files, worker processes' pipes, the event loop, and the probe session (64 at most).
BASE_RESERVE = 128
#: A client connection cap never goes below this, however low the open-file limit.
MIN_CLIENT_CONNECTIONS = 32

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_SIZE = re.compile(r"\s*(\d+)\s*([KMG]?)\s*", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """A byte count written as ``1048576``, ``512K``, ``32M`` or ``1G`` (binary multiples).

    Raises ValueError, saying what is accepted, for anything else (``1X``, ``-1``, ``1.5M``, 0).
    """
    if isinstance(text, bool):
        raise ValueError("expected a size such as 32M, 512K or a byte count")
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.fullmatch(text)
        if match is None:
            raise ValueError(
                f"{text!r} is not a size: give a byte count or a number with K, M or G"
                " (binary multiples), e.g. 32M"
            )
        value = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if value < 1:
        raise ValueError(f"a size must be at least 1 byte, got {value}")
    return value


def format_size(value: int) -> str:
    """``33554432`` -> ``32 MiB``: the largest unit that divides the size, for messages."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value % factor == 0:
            return f"{value // factor} {unit}"
    return f"{value} bytes"


@dataclass(frozen=True)
class FrontDoor:
    """What every client connection is held to; one per served app."""

    max_body_size: int
    header_timeout: float
    #: Client connections accepted at once: ``--max-connections`` or less, see ``connection_cap``.
    max_connections: int
    max_head_size: int = MAX_HEAD_BYTES
    body_grace: float = BODY_GRACE_SECONDS
    linger: float = LINGER_SECONDS

    @property
    def body_timeout(self) -> float:
        """A request's head and body together must arrive within this (from its first byte)."""
        return self.header_timeout + self.body_grace

    @classmethod
    def for_config(cls, cfg: DeploymentConfig, open_files: int | None = None) -> FrontDoor:
        """The limits ``cfg`` asks for, the connection cap fitted to the open-file limit
        (this process's soft limit unless given)."""
        soft = open_file_limit()[0] if open_files is None else open_files
        return cls(
            max_body_size=cfg.max_body_size,
            header_timeout=cfg.header_timeout,
            max_connections=connection_cap(cfg.max_connections, soft, descriptor_reserve(cfg)),
            body_grace=BODY_GRACE_SECONDS,  # read when called: tests shorten it
        )


#: Upstream connections reserved per worker when its capacity comes from the worker (unknown here).
AUTO_CAPACITY_SLOTS = 30


def descriptor_reserve(cfg: DeploymentConfig) -> int:
    """Descriptors that client connections must never take: the daemon's own, plus for each
    worker it may run one upstream connection per request slot (``worker_capacity``) and a few
    for its probe and process."""
    workers = max(cfg.max_workers, cfg.replicas or 0, len(cfg.endpoints))
    return BASE_RESERVE + workers * ((cfg.worker_capacity or AUTO_CAPACITY_SLOTS) + 4)


def connection_cap(max_connections: int, open_files: int, reserve: int) -> int:
    """Client connections accepted at once: ``max_connections``, or fewer when the open-file
    limit minus the reserve is lower (never below ``MIN_CLIENT_CONNECTIONS``)."""
    if open_files == resource.RLIM_INFINITY:
        return max_connections
    floor = min(max_connections, MIN_CLIENT_CONNECTIONS)
    return max(min(max_connections, open_files - reserve), floor)


def open_file_limit() -> tuple[int, int]:
    """This process's (soft, hard) RLIMIT_NOFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


def raise_open_file_limit(cfg: DeploymentConfig) -> None:
    """Raise the soft open-file limit to the hard one, and log both with the client connection
    cap that leaves once probes and upstream connections have their reserve.

    The common soft limit of 1024 is far below what a balancer holding thousands of client
    connections needs, and any process may raise it up to the hard limit. An unlimited hard
    limit (macOS) is not a value setrlimit takes for the soft one, so the soft one stays.
    """
    before, hard = open_file_limit()
    if hard != resource.RLIM_INFINITY and before != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", before, hard, exc)
    soft = open_file_limit()[0]
    log.info(
        "open files: soft limit %s (was %s), hard limit %s; client connections capped at %d"
        " (--max-connections %d; %d descriptors kept for probes and workers)",
        _number(soft) or "unlimited",
        _number(before) or "unlimited",
        _number(hard) or "unlimited",
        FrontDoor.for_config(cfg, soft).max_connections,
        cfg.max_connections,
        descriptor_reserve(cfg),
    )


def describe(cfg: DeploymentConfig) -> LimitsView:
    """The front-door limits as ``status --json`` shows them."""
    soft, hard = open_file_limit()
    door = FrontDoor.for_config(cfg, soft)
    return {
        "max_body_size": door.max_body_size,
        "max_head_size": door.max_head_size,
        "header_timeout": door.header_timeout,
        "body_timeout": door.body_timeout,
        "keep_alive_timeout": KEEP_ALIVE_SECONDS,
        "max_connections": cfg.max_connections,
        "connection_cap": door.max_connections,
        "open_files": {"soft": _number(soft), "hard": _number(hard)},
    }


def _number(limit: int) -> int | None:
    """An rlimit for JSON: None when unlimited."""
    return None if limit == resource.RLIM_INFINITY else limit

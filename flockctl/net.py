"""Listening sockets, shared by the daemon and the engine (neither imports the other)."""

from __future__ import annotations

import socket


def bind(host: str, port: int) -> socket.socket:
    """Bind before any slow start-up work, so a taken port fails at once: raises OSError
    (errno EADDRINUSE when the port is in use)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock

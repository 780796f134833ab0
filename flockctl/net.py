"""Listening sockets and the URLs clients reach them at, shared by the CLI, the daemon and the
engine (neither of the last two imports the other)."""

from __future__ import annotations

import ipaddress
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


def client_url(host: str, port: int) -> str:
    """The ``http://`` URL a client on this machine uses to reach a server bound to ``host``.

    A bind address is not always an address to connect to: ``0.0.0.0`` (and an empty host) is
    reached at ``127.0.0.1`` and ``::`` at ``[::1]``; other IPv6 literals are bracketed (a zone
    such as ``%eth0`` is escaped); host names and IPv4 addresses are kept as they are.
    """
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        return f"http://127.0.0.1:{port}"
    address, _, zone = host.partition("%")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"http://{host}:{port}"  # a host name
    if ip.version == 4:
        return f"http://{'127.0.0.1' if ip.is_unspecified else host}:{port}"
    if ip.is_unspecified:
        return f"http://[::1]:{port}"
    return f"http://[{address}{'%25' + zone if zone else ''}]:{port}"

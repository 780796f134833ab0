"""The command line of a local worker: flockctl's engine serving a model, or the user's own
command, which must listen on the port the local provisioner gives it.

The config turns a model into a command only through ``engine_command``, so the daemon, its
dry run and ``POST /-/workers {"model"}`` start the same engine the same way.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Sequence

from flockctl.cores import torch_threads

#: ``$PORT`` or ``${PORT}``, not ``$PORTS``: how a shell command line reads the worker's port from
#: its environment (the local provisioner sets ``PORT`` and runs such a command through a shell).
_PORT_VAR = re.compile(r"\$(?:PORT\b|\{PORT\})")


def takes_port(command: str) -> bool:
    """Whether a worker command listens where it is told: ``{port}`` filled in, or ``$PORT``."""
    return "{port}" in command or _PORT_VAR.search(command) is not None


def engine_command(
    model: str,
    engine_args: Sequence[str] = (),
    draft_models: Sequence[str] = (),
    threads: int | None = None,
    *,
    fused_threads: int = 1,
    otel_collector_endpoint: str | None = None,
) -> str:
    """The worker command that runs flockctl's engine serving ``model`` on ``{port}``.

    It runs with this interpreter (``sys.executable``), so the engine comes from the same
    installation as the daemon, and every part is quoted so a model path with spaces survives.
    Each draft model becomes ``--draft-model``; ``threads`` becomes ``--threads`` unless
    ``engine_args`` already sets it (the user's own choice wins), and with it ``fused_threads``
    above 1 becomes ``--fused-threads`` (an engine given ``--threads`` keeps its fused forward
    to one thread unless told: it may share the cores); the same holds for
    ``--otel-collector-endpoint``, so the engine's traces go where the daemon's do.
    """
    args = list(engine_args)
    for draft in draft_models:
        args += ["--draft-model", draft]
    if threads is not None and not _has_flag(args, "--threads"):
        args += ["--threads", str(threads)]
        # with --threads given, the engine's fused forward keeps to one thread unless told
        if fused_threads > 1 and not _has_flag(args, "--fused-threads"):
            args += ["--fused-threads", str(fused_threads)]
    if otel_collector_endpoint is not None and not _has_flag(args, "--otel-collector-endpoint"):
        args += ["--otel-collector-endpoint", otel_collector_endpoint]
    parts = [sys.executable, "-m", "flockctl", "engine", "serve", "--model", model]
    quoted = [shlex.quote(part) for part in parts]
    quoted += ["--host", "127.0.0.1", "--port", "{port}"]
    quoted += [shlex.quote(arg) for arg in args]
    return " ".join(quoted)


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(f"{flag}=") for a in args)


def engine_threads(engines: int) -> int:
    """CPU threads for each of ``engines`` local engines running at once: this machine's cores
    split between them, less the core of each share that the engine's serving side keeps (see
    :mod:`flockctl.cores`); ``--engine-args '--threads N'`` overrides it."""
    return torch_threads(engines)

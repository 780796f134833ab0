"""How many torch threads an engine takes from the cores this process may run on.

One rule for an engine started alone (``flockctl engine serve`` without ``--threads``) and for
the engines ``flockctl up`` starts side by side: each engine's share of the cores, less the one
core its serving side keeps (the event loop answering HTTP and streaming tokens, the model
loop's own Python between forwards), at least 1. With torch on every core its threads spin
against those two: on a 2-core machine, 8 concurrent streams made half the tokens per second
they made with one torch thread. Oversubscribed torch threads (engines sharing cores) spin
against each other, and a CPU decode step can take 50 times longer.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def torch_threads(engines: int = 1) -> int:
    """Torch threads for each of ``engines`` engines running at once on this machine."""
    return max(1, usable_cores() // max(1, engines) - 1)


def default_threads() -> int | None:
    """An engine's torch CPU threads when ``--threads`` is not given: :func:`torch_threads` for
    an engine alone. None where ``OMP_NUM_THREADS`` is set: torch has taken the user's number
    from it."""
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return None
    return torch_threads()


def fused_threads(engines: int = 1) -> int:
    """Threads the fused forward of each of ``engines`` engines running at once splits a step
    over: 2 where an engine's share of the cores is two and torch gets one of them (the fused
    forward runs only with one torch thread; the second thread takes the serving side's core
    while the model computes), else 1."""
    share = usable_cores() // max(1, engines)
    return 2 if share >= 2 and torch_threads(engines) == 1 else 1

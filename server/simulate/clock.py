"""An asyncio event loop that runs in simulated time.

The daemon's controller, worker pool and policies are asyncio code that reads time from its loop
(and from the clocks it is given). On this loop ``time()`` is a number the loop moves itself: when
nothing is ready to run, it jumps straight to the next timer instead of sleeping. Everything
scheduled runs in the same order as on a real loop, so the daemon's own code runs unchanged, an
hour of traffic passes in seconds, and a run is repeatable to the last digit.

A loop that has nothing ready and no timer left is waiting for something that cannot happen in a
simulation (a socket, another thread): that is an error, not a hang.
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any


class SimulationStalled(RuntimeError):
    """Nothing is scheduled, yet the simulation is not finished."""


class _Selector(selectors.SelectSelector):
    """Never waits: a wait of ``timeout`` seconds moves simulated time forward by as much."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            raise SimulationStalled("the simulation waits on nothing scheduled")
        if timeout > 0:
            self.now += timeout
        return []


class SimulatedLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` is simulated seconds from 0 (see the module docstring)."""

    def __init__(self) -> None:
        self._sim = _Selector()
        super().__init__(self._sim)

    def time(self) -> float:
        return self._sim.now

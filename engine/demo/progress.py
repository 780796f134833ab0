"""Progress of the demo build, told three ways: a bar, plain lines, and one short phase text.

A person at a terminal gets a rich bar per phase. A log file gets a plain line every few seconds
(rich does not animate into a file: a worker log would get every bar at once when the build ends).
And ``report`` receives one line such as ``building demo model: target 62%, about 40 s left`` on
every step, which the engine answers while it starts and which processes waiting for this build
read from a file; the time left comes from the rate of the phase running now and the relative
cost of the phases still to come.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: Seconds between two plain progress lines.
PLAIN_EVERY = 5.0


@dataclass(frozen=True)
class Phase:
    name: str
    steps: int
    cost: float  # of one step, in any unit shared by all phases; 0 where a phase is negligible


class BuildProgress:
    """One build's progress; ``mode`` is ``"auto"`` (a bar on a terminal, plain lines elsewhere),
    ``"bar"``, ``"plain"`` or ``None`` (silent)."""

    def __init__(
        self,
        plan: list[Phase],
        mode: str | None = "auto",
        report: Callable[[str], None] | None = None,
        title: str = "demo model",
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "plain"
        self._plan = {phase.name: phase for phase in plan}
        self._order = [phase.name for phase in plan]
        self._mode = mode
        self._report = report
        self._title = title
        self._clock = clock
        self._bar: Any = None
        self._task: Any = None
        self._phase: Phase | None = None
        self._done = 0
        self._phase_started = 0.0
        self._first_step_done = 0.0
        self._unit_seconds: float | None = None
        self._printed_at = float("-inf")
        self.seconds: dict[str, float] = {}  # wall time of each finished phase, for the manifest
        if mode == "bar":
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bar = Progress(
                TextColumn(f"{title}: {{task.description:<12}}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(stderr=True),
            )

    def __enter__(self) -> BuildProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def start(self, name: str) -> None:
        self.finish()
        self._phase, self._done, self._phase_started = self._plan[name], 0, self._clock()
        if self._bar is not None:
            self._task = self._bar.add_task(name, total=self._phase.steps, info="")
        self._tell("")

    def finish(self) -> None:
        if self._phase is not None:
            self.seconds[self._phase.name] = round(self._clock() - self._phase_started, 1)

    def advance(self, info: str = "") -> None:
        phase = self._phase
        if phase is None:
            raise RuntimeError("advance() before start()")
        self._done += 1
        now = self._clock()
        if self._done == 1:
            self._first_step_done = now
        elif phase.cost > 0:  # timed from the second step: the first one also warms up
            self._unit_seconds = (now - self._first_step_done) / ((self._done - 1) * phase.cost)
        if self._bar is not None:
            self._bar.update(self._task, advance=1, info=info)
        self._tell(info)

    def left_seconds(self) -> float | None:
        """Estimated seconds until the build ends; None before any costly step was timed."""
        if self._unit_seconds is None or self._phase is None:
            return None
        units = (self._phase.steps - self._done) * self._phase.cost
        for name in self._order[self._order.index(self._phase.name) + 1 :]:
            units += self._plan[name].steps * self._plan[name].cost
        return units * self._unit_seconds

    def text(self) -> str:
        """``building demo model: target 62%, about 40 s left``."""
        phase = self._phase
        if phase is None:
            return f"building {self._title}"
        text = f"building {self._title}: {phase.name} {100 * self._done // max(1, phase.steps)}%"
        left = self.left_seconds()
        if left is not None and left >= 2.5:
            text += f", about {_round_seconds(left)} s left"
        return text

    def _tell(self, info: str) -> None:
        text = self.text()
        if self._report is not None:
            self._report(text)
        if self._mode != "plain":
            return
        now = time.monotonic()
        last = self._phase is not None and self._done == self._phase.steps
        if last or now - self._printed_at >= PLAIN_EVERY:
            self._printed_at = now
            print(text + (f" ({info})" if info else ""), file=sys.stderr, flush=True)


def _round_seconds(seconds: float) -> int:
    """Coarse enough not to flicker: to 5 s under two minutes, to 10 s above."""
    step = 5 if seconds < 120 else 10
    return max(step, round(seconds / step) * step)

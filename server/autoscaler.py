"""Autoscaling policies: pure classes, ``decide(observation, now) -> Decision``, no I/O.

``qlrm`` follows FlockServe: a time-weighted running mean of the queue length over
``queue_tracking_window`` seconds, compared against ``autoscale_up`` / ``autoscale_down``. It
repairs what FlockServe gets wrong:

- requests waiting in the balancer for a worker count as load, so a deployment with no worker
  (``min_workers: 0``) scales up from zero on its first request;
- the queue length is per live worker (outstanding requests / live workers), so a threshold keeps
  its meaning as the deployment grows (FlockServe compares the whole deployment's total);
- a worker that is still starting does not freeze scaling (FlockServe holds while any worker is not
  live, so one worker stuck in launch blocks every decision);
- a threshold must hold for ``upscale_delay`` / ``downscale_delay`` seconds before the target
  moves, so one burst does not flap the deployment;
- it never scales below what the requests in flight and waiting need (``demand_floor``, which
  ``request-rate`` honours too): a mean that says "scale down" while the only worker is still
  starting for a waiting request would stop that worker, launch another for the same request,
  and never serve it. The downscale delay starts once that demand is gone.

Every decision carries a reason a user can read.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from itertools import pairwise
from typing import ClassVar


@dataclass(frozen=True)
class Observation:
    """What the controller saw at one instant."""

    in_flight: int
    queued: int
    live: int
    ready: int
    target: int
    #: Requests that have reached the balancer since the daemon started (a running count).
    arrived: int = 0
    #: Requests one worker takes at once (``worker_capacity``), for the demand floor; 0 when not
    #: known (then any request in flight or waiting needs one worker).
    worker_capacity: int = 0

    @property
    def outstanding(self) -> int:
        return self.in_flight + self.queued


@dataclass(frozen=True)
class Decision:
    target: int
    reason: str
    #: Workers kept that the policy would have let go, because requests need them (the demand
    #: floor), and what they are kept for (``1 request waiting needs a worker``).
    held: int = 0
    held_for: str = ""


def demand_floor(obs: Observation) -> int:
    """The workers the requests in flight and waiting need now: ``ceil((in_flight + queued) /
    worker_capacity)``, and one at least while any request is in flight or waiting.

    No policy that follows demand scales below it. Requests on a draining worker still count
    until they finish: the floor is at most the current target, so this can only delay a
    scale-down, never cause a launch.
    """
    outstanding = max(obs.outstanding, 0)
    if outstanding == 0:
        return 0
    if obs.worker_capacity <= 0:
        return 1
    return max(1, math.ceil(outstanding / obs.worker_capacity))


def describe_demand(obs: Observation) -> str:
    """What the demand floor holds workers for, as a user reads it: ``1 request waiting needs a
    worker``, ``3 requests in flight and 2 waiting need 2 workers``."""
    floor = demand_floor(obs)
    first = obs.in_flight or obs.queued
    where = "in flight" if obs.in_flight else "waiting"
    said = f"{first} request{'' if first == 1 else 's'} {where}"
    if obs.in_flight and obs.queued:
        said += f" and {obs.queued} waiting"
    verb = "needs" if obs.outstanding == 1 else "need"
    return f"{said} {verb} {'a worker' if floor == 1 else f'{floor} workers'}"


class AutoscalerPolicy:
    name: ClassVar[str]

    def __init__(self, min_workers: int, max_workers: int) -> None:
        self.min_workers = min_workers
        self.max_workers = max_workers

    def decide(self, obs: Observation, now: float) -> Decision:
        raise NotImplementedError

    @property
    def qlrm(self) -> float | None:
        return None

    def history(self) -> list[tuple[float, float]]:
        return []

    @property
    def qps(self) -> float | None:
        """The request rate the policy scales on, where it scales on one."""
        return None

    def operator_target(self, target: int) -> None:
        """An operator set the number of workers by hand (added or removed one)."""

    def set_bounds(self, min_workers: int, max_workers: int) -> None:
        """An operator changed min/max at run time; the next decision keeps within them."""
        if not 0 <= min_workers <= max_workers or max_workers < 1:
            raise ValueError(
                f"bounds need 0 <= min_workers <= max_workers and max_workers >= 1;"
                f" got min_workers {min_workers}, max_workers {max_workers}"
            )
        self.min_workers = min_workers
        self.max_workers = max_workers

    def thresholds(self) -> dict[str, float]:
        """The policy's settings, as the status snapshot shows them."""
        return {}

    def bounds(self, target: int) -> Decision | None:
        """A decision forced by min/max alone, if the target is out of bounds."""
        if target < self.min_workers:
            return Decision(self.min_workers, f"below min_workers: scaling to {self.min_workers}")
        if target > self.max_workers:
            return Decision(self.max_workers, f"above max_workers: scaling to {self.max_workers}")
        return None

    def lowest(self, obs: Observation) -> int:
        """The lowest target a scale-down may reach now: ``min_workers``, or the demand floor
        where that is higher (never above ``max_workers``: the operator's bound wins)."""
        return max(self.min_workers, min(demand_floor(obs), self.max_workers))


class Hysteresis:
    """How long a wish to move the target one way has held (SkyServe's upscale and downscale
    counters, in seconds): the target moves only once the wish held for that way's delay."""

    def __init__(self) -> None:
        self._up_since: float | None = None
        self._down_since: float | None = None

    def reset(self) -> None:
        self._up_since = self._down_since = None

    def move(self, target: int, new: int, why: str, delay: float, now: float) -> Decision:
        """``new`` once ``why`` has held ``delay`` seconds, else ``target`` and how long to go."""
        up = new > target
        if up:
            self._down_since = None
            self._up_since = now if self._up_since is None else self._up_since
            since = self._up_since
        else:
            self._up_since = None
            self._down_since = now if self._down_since is None else self._down_since
            since = self._down_since
        held = now - since
        way = "up" if up else "down"
        if held >= delay:
            self.reset()
            return Decision(new, f"{why} for {held:.0f}s: scaling {way} to {new}")
        return Decision(target, f"{why}; scaling {way} in {delay - held:.0f}s if it holds")


class FixedPolicy(AutoscalerPolicy):
    """Always ``replicas`` workers (SkyServe's ``replicas: N``)."""

    name = "fixed"

    def __init__(self, replicas: int, min_workers: int = 0, max_workers: int | None = None):
        super().__init__(min_workers, max(replicas, max_workers or replicas))
        self.replicas = replicas

    def thresholds(self) -> dict[str, float]:
        return {"replicas": self.replicas}

    def operator_target(self, target: int) -> None:
        self.replicas = target
        self.max_workers = max(self.max_workers, target)

    def set_bounds(self, min_workers: int, max_workers: int) -> None:
        """min/max bound the fixed number: ``replicas`` moves into them and stays fixed there."""
        super().set_bounds(min_workers, max_workers)
        self.replicas = min(max(self.replicas, min_workers), max_workers)

    def decide(self, obs: Observation, now: float) -> Decision:
        if obs.target == self.replicas:
            return Decision(self.replicas, f"fixed at {self.replicas} workers")
        return Decision(self.replicas, f"fixed policy: scaling to {self.replicas} workers")


class QueueLengthRunningMean(AutoscalerPolicy):
    """FlockServe's queue-length running mean, with the repairs listed in the module docstring."""

    name = "qlrm"

    def __init__(
        self,
        min_workers: int,
        max_workers: int,
        autoscale_up: float = 7.0,
        autoscale_down: float = 4.0,
        window: float = 600.0,
        upscale_delay: float = 30.0,
        downscale_delay: float = 120.0,
        history_points: int = 120,
    ) -> None:
        super().__init__(min_workers, max_workers)
        self.autoscale_up = autoscale_up
        self.autoscale_down = autoscale_down
        self.window = window
        self.upscale_delay = upscale_delay
        self.downscale_delay = downscale_delay
        self._samples: deque[tuple[float, float]] = deque()
        self._mean: float | None = None
        self._hold = Hysteresis()
        self._history: deque[tuple[float, float]] = deque(maxlen=history_points)

    @property
    def qlrm(self) -> float | None:
        return self._mean

    def thresholds(self) -> dict[str, float]:
        return {
            "autoscale_up": self.autoscale_up,
            "autoscale_down": self.autoscale_down,
            "queue_tracking_window": self.window,
            "upscale_delay": self.upscale_delay,
            "downscale_delay": self.downscale_delay,
        }

    def history(self) -> list[tuple[float, float]]:
        return list(self._history)

    def _record(self, value: float, now: float) -> float:
        """Add a sample and return the time-weighted mean over the window.

        Each sample holds until the next one, so a value weighs as long as it lasted; the newest
        sample has no duration yet and counts only when it is the only one.
        """
        self._samples.append((now, value))
        start = now - self.window
        while len(self._samples) > 1 and self._samples[1][0] <= start:
            self._samples.popleft()
        total = 0.0
        weighted = 0.0
        items = list(self._samples)
        for (t0, v0), (t1, _v1) in pairwise(items):
            span = t1 - max(t0, start)
            if span > 0:
                weighted += v0 * span
                total += span
        mean = weighted / total if total > 0 else value
        self._mean = mean
        self._history.append((now, mean))
        return mean

    def decide(self, obs: Observation, now: float) -> Decision:
        load = obs.outstanding / max(obs.live, 1)
        mean = self._record(load, now)
        forced = self.bounds(obs.target)
        if forced is not None:
            return forced
        target = obs.target
        if target == 0 and obs.queued > 0:
            new = max(1, self.min_workers)
            self._hold.reset()
            return Decision(
                new, f"{obs.queued} requests waiting and no worker: scaling from zero to {new}"
            )
        if mean > self.autoscale_up and target < self.max_workers:
            why = f"qlrm {mean:.2f} > autoscale_up {self.autoscale_up:g}"
            return self._hold.move(target, target + 1, why, self.upscale_delay, now)
        lowest = self.lowest(obs)
        if mean < self.autoscale_down and target > lowest:
            why = f"qlrm {mean:.2f} < autoscale_down {self.autoscale_down:g}"
            return self._hold.move(target, target - 1, why, self.downscale_delay, now)
        self._hold.reset()
        if mean < self.autoscale_down and target > self.min_workers:
            why = f"qlrm {mean:.2f} < autoscale_down {self.autoscale_down:g}"
            needs = describe_demand(obs)
            return Decision(target, f"holding {target}: {needs} ({why})", 1, needs)
        if mean > self.autoscale_up:
            why = f"qlrm {mean:.2f} > autoscale_up {self.autoscale_up:g} but at max_workers"
        elif mean < self.autoscale_down:
            why = f"qlrm {mean:.2f} < autoscale_down {self.autoscale_down:g} but at min_workers"
        else:
            why = f"qlrm {mean:.2f} within [{self.autoscale_down:g}, {self.autoscale_up:g}]"
        return Decision(target, f"{why}: holding {target}")


class RequestRate(AutoscalerPolicy):
    """SkyServe's request-rate autoscaler: ``ceil(qps / target_qps_per_replica)`` workers.

    As in SkyServe, the rate is the number of requests that arrived in the last ``window`` seconds
    divided by ``window``, the wanted number is kept within min/max, and it must stay above (below)
    the current target for ``upscale_delay`` (``downscale_delay``) seconds before the target moves
    to it in one step. A deployment at zero workers scales up at once when requests arrive.
    """

    name = "request-rate"

    def __init__(
        self,
        min_workers: int,
        max_workers: int,
        target_qps_per_replica: float,
        upscale_delay: float = 300.0,
        downscale_delay: float = 1200.0,
        window: float = 60.0,
    ) -> None:
        if target_qps_per_replica <= 0:
            raise ValueError("target_qps_per_replica must be above 0")
        super().__init__(min_workers, max_workers)
        self.target_qps_per_replica = target_qps_per_replica
        self.upscale_delay = upscale_delay
        self.downscale_delay = downscale_delay
        self.window = window
        self._arrivals: deque[tuple[float, int]] = deque()
        self._qps: float | None = None
        self._hold = Hysteresis()

    @property
    def qps(self) -> float | None:
        return self._qps

    def thresholds(self) -> dict[str, float]:
        return {
            "target_qps_per_replica": self.target_qps_per_replica,
            "upscale_delay": self.upscale_delay,
            "downscale_delay": self.downscale_delay,
            "qps_window": self.window,
        }

    def _rate(self, arrived: int, now: float) -> float:
        """Requests per second over the last ``window`` seconds (SkyServe divides by the whole
        window, so a burst right after start weighs as little as it would in SkyServe)."""
        self._arrivals.append((now, arrived))
        start = now - self.window
        while len(self._arrivals) > 1 and self._arrivals[1][0] <= start:
            self._arrivals.popleft()
        # The oldest sample kept is the last one at or before the window's start.
        self._qps = max(arrived - self._arrivals[0][1], 0) / self.window
        return self._qps

    def wanted(self, qps: float) -> int:
        """The number of workers ``qps`` calls for, within min/max."""
        raw = math.ceil(round(qps / self.target_qps_per_replica, 9))
        return min(max(raw, self.min_workers), self.max_workers)

    def decide(self, obs: Observation, now: float) -> Decision:
        qps = self._rate(obs.arrived, now)
        forced = self.bounds(obs.target)
        if forced is not None:
            self._hold.reset()
            return forced
        target = obs.target
        wanted = self.wanted(qps)
        rate = f"{qps:.2f} req/s over {self.window:g}s"
        per = f"target_qps_per_replica {self.target_qps_per_replica:g}"
        if target == 0 and (wanted > 0 or obs.queued > 0) and self.max_workers > 0:
            new = max(wanted, 1)
            self._hold.reset()
            return Decision(new, f"{rate} and no worker: scaling from zero to {new}")
        why = f"{rate} wants {wanted} workers ({per})"
        if wanted < target:
            floor = min(self.lowest(obs), target)
            if floor > wanted:
                needs = describe_demand(obs)
                if floor == target:
                    self._hold.reset()
                    reason = f"holding {target}: {needs} ({why})"
                    return Decision(target, reason, target - wanted, needs)
                wanted, why = floor, f"{why}, {needs}"
        if wanted != target:
            delay = self.upscale_delay if wanted > target else self.downscale_delay
            return self._hold.move(target, wanted, why, delay, now)
        self._hold.reset()
        return Decision(target, f"{why}: holding {target}")


@dataclass(frozen=True)
class SpotPlan:
    """SkyServe's spot placement with on-demand fallback, as pure arithmetic.

    Of ``target`` workers, ``base_ondemand`` are on-demand and the rest spot. With ``dynamic``,
    every spot worker the target wants but that is not READY (still launching, or preempted and
    being replaced) is covered by one more on-demand worker, and those go again once the spot
    ones are READY. On-demand workers never exceed the target.
    """

    base_ondemand: int = 0
    dynamic: bool = False

    def split(self, target: int, ready_spot: int) -> tuple[int, int]:
        """How many (spot, on-demand) workers to keep for ``target``."""
        spot = max(target - self.base_ondemand, 0)
        ondemand = self.base_ondemand
        if self.dynamic:
            ondemand += max(spot - ready_spot, 0)
        return spot, min(ondemand, target)

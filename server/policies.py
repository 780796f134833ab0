"""Load-balancing policies, registered by name.

A policy only chooses among candidates the pool already filtered (READY, under capacity, not yet
tried for this request); it never sees I/O, so it is cheap enough for every request.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import ClassVar

from flockctl.server.request_meta import NO_META, RequestMeta
from flockctl.server.workers import Worker


class BalancingPolicy:
    """Pick one worker out of a non-empty list of candidates.

    ``needs_meta`` says whether ``choose`` reads the request's ``RequestMeta``; when it is False
    (and nothing else needs it) the balancer never parses request bodies and passes ``NO_META``.
    The ``observe_*`` hooks and ``worker_changed`` let a policy learn from relayed traffic and
    from workers leaving READY; by default they do nothing.
    """

    name: ClassVar[str]
    registry: ClassVar[dict[str, type[BalancingPolicy]]] = {}
    needs_meta: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        BalancingPolicy.registry[cls.name] = cls

    def choose(self, candidates: Sequence[Worker], meta: RequestMeta = NO_META) -> Worker:
        raise NotImplementedError

    def observe_first_byte(self, worker: Worker, seconds: float) -> None:
        """A relayed answer's first byte came ``seconds`` after the request was sent."""

    def observe_end(self, worker: Worker, seconds: float, chunks: int) -> None:
        """A relayed answer ended ``seconds`` after its first byte, in ``chunks`` reads."""

    def worker_changed(self, worker: Worker, old: object) -> None:
        """A worker changed state (a pool transition listener)."""


class LeastConnection(BalancingPolicy):
    """The worker with the fewest requests in flight; ties go to the one that served fewer."""

    name = "least-connection"

    def choose(self, candidates: Sequence[Worker], meta: RequestMeta = NO_META) -> Worker:
        best = candidates[0]
        for w in candidates[1:]:
            if w.in_flight < best.in_flight or (
                w.in_flight == best.in_flight and w.served < best.served
            ):
                best = w
        return best


class RoundRobin(BalancingPolicy):
    """Each worker in turn, skipping those that cannot take the request."""

    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates: Sequence[Worker], meta: RequestMeta = NO_META) -> Worker:
        w = candidates[self._next % len(candidates)]
        self._next += 1
        return w


class PowerOfTwo(BalancingPolicy):
    """Two workers at random, the less loaded of them: near least-connection with no global scan."""

    name = "power-of-two"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[Worker], meta: RequestMeta = NO_META) -> Worker:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(range(len(candidates)), 2)
        wa, wb = candidates[a], candidates[b]
        return wa if wa.in_flight <= wb.in_flight else wb


def make_policy(name: str) -> BalancingPolicy:
    """The policy registered as ``name``; ValueError names the known ones."""
    try:
        return BalancingPolicy.registry[name]()
    except KeyError:
        known = ", ".join(sorted(BalancingPolicy.registry))
        raise ValueError(f"unknown balancing policy {name!r} (known: {known})") from None

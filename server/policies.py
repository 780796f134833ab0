"""Load-balancing policies, registered by name.

A policy only chooses among candidates the pool already filtered (READY, under capacity, not yet
tried for this request); it never sees I/O, so it is cheap enough for every request.

- ``least-connection`` (the default), ``round-robin``, ``power-of-two``: load only.
- ``latency``: the expected completion time of each of two random workers, from moving
  estimates of their time to first byte and per streamed chunk (Finagle's peak EWMA: a slow
  answer counts at once, fast ones pull the estimate down over ``decay`` seconds). A sample is
  taken per request the worker had in flight: a batching engine answering four requests at once
  in 0.4 s is faster than one answering one alone in 0.3 s, and counting its answer whole and
  then its queue again made the policy send work to the slower one. A worker the policy avoids
  gets no answers to learn from, so the daemon probes it (``probe_due_in``, the prober's latency
  loop): a one-token completion, at most one at a time, no sooner than ``probe_interval`` after
  its last sample. A probe still waiting counts as that slow already (its elapsed time is a
  lower bound of its answer's; Envoy's and Linkerd's peak EWMA only weigh pending requests by
  their number, which says nothing while a worker is avoided). Without probes (the
  simulator) an idle worker's estimate decays towards zero instead, so that a real request
  tries it again: on a busy worker that request waited behind its queue for seconds.
- ``prefix``: the worker that was already sent the longest part of the prompt (its KV cache
  likely holds it), unless that match is short or the worker is much busier than the least
  loaded one; sessions stick to their worker (SGLang's cache-aware router as the model).
"""

from __future__ import annotations

import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from flockctl.server.radix import PrefixTree
from flockctl.server.request_meta import NO_META, RequestMeta
from flockctl.server.workers import Worker, WorkerState


@dataclass(frozen=True)
class PolicySettings:
    """The tunables of the policies that have any (``flockctl up --prefix-...``)."""

    #: Shortest match, as a share of the prompt, that routes by prefix.
    prefix_min_match: float = 0.5
    #: A matched worker is taken only while its (in flight + 1) is within this factor of the
    #: least loaded candidate's.
    prefix_balance: float = 2.0
    #: Characters of prompt text remembered per worker.
    prefix_tree_chars: int = 1_000_000
    #: Sessions remembered (least recently used forgotten first).
    sessions: int = 65_536
    #: Seconds over which faster latency samples pull an estimate down by a factor e.
    latency_decay: float = 10.0
    #: Seconds a READY worker goes without a latency sample before it is probed (None: never;
    #: then an idle worker's estimate decays towards zero instead).
    latency_probe_interval: float | None = 1.0


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

    @classmethod
    def from_settings(cls, settings: PolicySettings) -> BalancingPolicy:
        return cls()

    def choose(self, candidates: Sequence[Worker], meta: RequestMeta = NO_META) -> Worker:
        raise NotImplementedError

    def observe_first_byte(self, worker: Worker, seconds: float) -> None:
        """A relayed answer's first byte came ``seconds`` after the request was sent."""

    def observe_end(self, worker: Worker, seconds: float, chunks: int) -> None:
        """A relayed answer ended ``seconds`` after its first byte, in ``chunks`` reads."""

    def worker_changed(self, worker: Worker, old: object) -> None:
        """A worker changed state (a pool transition listener)."""

    def probe_due_in(self, worker: Worker) -> float | None:
        """Seconds until ``worker`` should get a latency probe (0: now); None: this policy
        sends none (the prober asks again later)."""
        return None

    def probe_started(self, worker: Worker) -> None:
        """A latency probe was sent to ``worker``."""

    def observe_probe(self, worker: Worker, seconds: float | None) -> None:
        """A latency probe to ``worker`` answered after ``seconds``; None: it failed (an error
        status, or no connection), which says nothing of the worker's speed."""


def least_loaded(candidates: Sequence[Worker]) -> Worker:
    """The worker with the fewest requests in flight; ties go to the one that served fewer."""
    best = candidates[0]
    for w in candidates[1:]:
        if w.in_flight < best.in_flight or (
            w.in_flight == best.in_flight and w.served < best.served
        ):
            best = w
    return best


class LeastConnection(BalancingPolicy):
    """The worker with the fewest requests in flight; ties go to the one that served fewer."""

    name = "least-connection"

    def choose(self, candidates: Sequence[Worker], meta: RequestMeta = NO_META) -> Worker:
        return least_loaded(candidates)


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


class _PeakEwma:
    """A moving estimate that takes a higher sample at once and moves towards lower ones over
    ``tau`` seconds (weighted by the time since the last sample)."""

    __slots__ = ("stamp", "value")

    def __init__(self, now: float) -> None:
        self.value = 0.0
        self.stamp = now

    def get(self, now: float | None, tau: float) -> float:
        """The estimate at ``now``, decayed towards zero since the last sample; None: as last
        measured."""
        if now is None:
            return self.value
        return self.value * math.exp(-max(now - self.stamp, 0.0) / tau)

    def observe(self, sample: float, now: float, tau: float, idle_decay: bool) -> None:
        """Take ``sample``; with ``idle_decay`` it is compared with the estimate decayed
        towards zero since the last sample, else with the estimate as last measured."""
        current = self.get(now if idle_decay else None, tau)
        self.value = _peak(self.value, current, sample, now - self.stamp, tau)
        self.stamp = now


def _peak(value: float, current: float, sample: float, elapsed: float, tau: float) -> float:
    """Peak EWMA's step: ``sample`` at once when it is above ``current``, else ``value`` moved
    towards it by the ``elapsed`` seconds since the last sample over ``tau``."""
    if sample > current:
        return sample
    w = math.exp(-max(elapsed, 0.0) / tau)
    return value * w + sample * (1.0 - w)


class _Estimate:
    __slots__ = ("chunk", "ended", "first_byte", "last", "probe_since", "unprobed")

    def __init__(self, now: float) -> None:
        self.first_byte = _PeakEwma(now)
        self.chunk = _PeakEwma(now)
        #: Whether an answer ended: a first byte alone (a stream's head, sent at once) says
        #: nothing of how long the answer takes.
        self.ended = False
        #: When the last whole sample came (an answer's end or a probe's).
        self.last = now
        #: When the latency probe in flight was sent; None: none is.
        self.probe_since: float | None = None
        #: The last probe failed (the worker cannot be probed): its estimate decays when idle.
        self.unprobed = False


class Latency(BalancingPolicy):
    """Of two random workers, the one expected to finish a request first.

    A worker's expected time is its estimated time to first byte plus its time per chunk times
    the chunks an answer has on average, multiplied by (in flight + 1); each sample is divided
    by the requests the worker had in flight when it was taken (itself included), so the load a
    sample was measured under is not counted twice. A worker never measured counts as the mean
    of those measured (zero when none was).

    An estimate stands until a sample moves it: an avoided worker is probed every
    ``probe_interval`` seconds it goes without a sample, and a probe's time moves its whole
    estimate (both parts in proportion) as an answer's would; a probe still waiting counts as
    at least that slow. With ``probe_interval`` None (or for a worker whose probes fail) an
    idle worker's estimate decays towards zero instead, so that a real request measures it.
    """

    name = "latency"

    def __init__(
        self,
        decay: float = 10.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        probe_interval: float | None = None,
    ) -> None:
        self.decay = decay
        self.probe_interval = probe_interval
        self._rng = rng or random.Random()
        self._clock = clock
        self._estimates: dict[str, _Estimate] = {}
        #: Moving mean of relayed reads per answer, over all workers.
        self.chunks = 1.0

    @classmethod
    def from_settings(cls, settings: PolicySettings) -> BalancingPolicy:
        return cls(decay=settings.latency_decay, probe_interval=settings.latency_probe_interval)

    @property
    def _idle_decay(self) -> bool:
        return self.probe_interval is None

    def _estimate(self, worker: Worker) -> _Estimate:
        est = self._estimates.get(worker.id)
        if est is None:
            est = self._estimates[worker.id] = _Estimate(self._clock())
        return est

    def expected(self, worker: Worker) -> float:
        """Seconds a new request on ``worker`` is expected to take, its queue included."""
        now = self._clock()
        est = self._estimates.get(worker.id)
        if est is None or not est.ended:
            # Not measured yet: as fast as the workers that were, until its first answer (taken
            # as zero, a slow new worker drew every request until that answer came).
            at = now if self._idle_decay else None
            known = [self._one(e, at) for e in self._estimates.values() if e.ended]
            one = sum(known) / len(known) if known else 0.0
        else:
            # Only an idle worker's estimate decays, and only without probes: one with requests
            # in flight will report on them, so its last measure stands. (Decaying it too sent
            # more work to a worker whose answers took longer than the decay while they were
            # still running.)
            decays = worker.in_flight == 0 and (self._idle_decay or est.unprobed)
            one = self._one(est, now if decays else None)
        if est is not None and est.probe_since is not None:
            one = max(one, now - est.probe_since)
        return one * (worker.in_flight + 1)

    def _one(self, est: _Estimate, now: float | None) -> float:
        """Seconds one request takes by ``est`` at ``now`` (None: as last measured)."""
        return est.first_byte.get(now, self.decay) + est.chunk.get(now, self.decay) * self.chunks

    def choose(self, candidates: Sequence[Worker], meta: RequestMeta = NO_META) -> Worker:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(range(len(candidates)), 2)
        wa, wb = candidates[a], candidates[b]
        ca, cb = self.expected(wa), self.expected(wb)
        if ca == cb:
            return wa if wa.in_flight <= wb.in_flight else wb
        return wa if ca < cb else wb

    def observe_first_byte(self, worker: Worker, seconds: float) -> None:
        # The balancer still counts this request in flight: 1 when it was the only one.
        share = seconds / max(worker.in_flight, 1)
        est = self._estimate(worker)
        est.first_byte.observe(share, self._clock(), self.decay, self._idle_decay)

    def observe_end(self, worker: Worker, seconds: float, chunks: int) -> None:
        chunks = max(chunks, 1)
        share = seconds / chunks / max(worker.in_flight, 1)
        now = self._clock()
        est = self._estimate(worker)
        est.chunk.observe(share, now, self.decay, self._idle_decay)
        est.ended = True
        est.last = now
        self.chunks += 0.1 * (chunks - self.chunks)

    def probe_due_in(self, worker: Worker) -> float | None:
        interval = self.probe_interval
        if interval is None:
            return None
        est = self._estimates.get(worker.id)
        if est is None:
            return 0.0  # never measured: before user requests find out
        if est.probe_since is not None or worker.in_flight:
            return interval  # one probe at a time; answers in flight will report
        return max(est.last + interval - self._clock(), 0.0)

    def probe_started(self, worker: Worker) -> None:
        self._estimate(worker).probe_since = self._clock()

    def observe_probe(self, worker: Worker, seconds: float | None) -> None:
        est = self._estimates.get(worker.id)
        if est is None or est.probe_since is None:
            return  # it left READY meanwhile: its estimate went with it
        now = self._clock()
        est.probe_since = None
        est.unprobed = seconds is None
        if seconds is not None:
            self._observe_whole(est, seconds, now)
        est.last = now

    def _observe_whole(self, est: _Estimate, sample: float, now: float) -> None:
        """A probe's time as one request's: a higher one is taken at once, a lower one pulls
        the estimate down by the time since the last sample; time to first byte and per chunk
        keep their proportion."""
        first, chunk = est.first_byte, est.chunk
        current = first.value + chunk.value * self.chunks
        if not est.ended or current <= 0.0:
            first.value, chunk.value = sample, 0.0
        else:
            target = _peak(current, current, sample, now - est.last, self.decay)
            first.value *= target / current
            chunk.value *= target / current
        first.stamp = chunk.stamp = now
        est.ended = True

    def worker_changed(self, worker: Worker, old: object) -> None:
        if worker.state != WorkerState.READY:
            self._estimates.pop(worker.id, None)


class Prefix(BalancingPolicy):
    """The worker already sent the longest part of the prompt, within a load bound; sessions stick.

    A request with a session (``x-session-id``, or OpenAI's ``user``) goes to its session's
    worker while that worker is READY with a free slot. Otherwise the worker whose remembered
    prompts match the longest prefix of this one is taken when the match covers at least
    ``min_match`` of the prompt and its (in flight + 1) is within ``balance`` times the least
    loaded candidate's; else the least loaded one. The prompt is then remembered for the
    worker taken.
    """

    name = "prefix"
    needs_meta = True

    def __init__(
        self,
        min_match: float = 0.5,
        balance: float = 2.0,
        tree_chars: int = 1_000_000,
        sessions: int = 65_536,
    ) -> None:
        self.min_match = min_match
        self.balance = balance
        self.tree = PrefixTree(tree_chars)
        self.max_sessions = sessions
        self._sessions: OrderedDict[str, str] = OrderedDict()
        #: Decisions so far by reason: session, prefix, load.
        self.decisions = {"session": 0, "prefix": 0, "load": 0}

    @classmethod
    def from_settings(cls, settings: PolicySettings) -> BalancingPolicy:
        return cls(
            settings.prefix_min_match,
            settings.prefix_balance,
            settings.prefix_tree_chars,
            settings.sessions,
        )

    def choose(self, candidates: Sequence[Worker], meta: RequestMeta = NO_META) -> Worker:
        worker, why = self._pick(candidates, meta)
        self.decisions[why] += 1
        if meta.prompt_text:
            self.tree.insert(meta.prompt_text, worker.id)
        if meta.session is not None and why != "session":
            self._sessions[meta.session] = worker.id
            self._sessions.move_to_end(meta.session)
            if len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        return worker

    def session_worker(self, session: str) -> str | None:
        """The id of the worker a session sticks to, if any."""
        return self._sessions.get(session)

    def _pick(self, candidates: Sequence[Worker], meta: RequestMeta) -> tuple[Worker, str]:
        if meta.session is not None:
            wid = self._sessions.get(meta.session)
            if wid is not None:
                for w in candidates:
                    if w.id == wid:
                        self._sessions.move_to_end(meta.session)
                        return w, "session"
        least = least_loaded(candidates)
        text = meta.prompt_text
        if not text or len(candidates) == 1:
            return least, "load"
        matched = self.tree.match(text)
        best: Worker | None = None
        best_len = 0
        for w in candidates:
            n = matched.get(w.id, 0)
            if n > best_len or (
                best is not None and n == best_len and w.in_flight < best.in_flight
            ):
                best, best_len = w, n
        if (
            best is not None
            and best_len >= self.min_match * len(text)
            and best.in_flight + 1 <= self.balance * (least.in_flight + 1)
        ):
            return best, "prefix"
        return least, "load"

    def worker_changed(self, worker: Worker, old: object) -> None:
        """A worker out of READY is forgotten: its cache and sessions can no longer be relied on."""
        if worker.state == WorkerState.READY:
            return
        self.tree.remove(worker.id)
        gone = [s for s, wid in self._sessions.items() if wid == worker.id]
        for s in gone:
            del self._sessions[s]


def make_policy(name: str, settings: PolicySettings | None = None) -> BalancingPolicy:
    """The policy registered as ``name``; ValueError names the known ones."""
    try:
        cls = BalancingPolicy.registry[name]
    except KeyError:
        known = ", ".join(sorted(BalancingPolicy.registry))
        raise ValueError(f"unknown balancing policy {name!r} (known: {known})") from None
    return cls.from_settings(settings or PolicySettings())

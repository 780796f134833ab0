"""What a request holds while its job runs (a :class:`JobHandle`), and the pieces of output the
model loop sends it (each a :class:`Delta`).

The handle lives on both threads: the API awaits its queue on the event loop; the model loop
keeps the job's text stream and random generator on it and fills the queue through
``call_soon_threadsafe``.

A handle may be held back (:meth:`JobHandle.follow`): the ``n`` choices of one prompt start only
once the first choice's prompt is prefilled, so they share its KV blocks instead of computing the
prompt again each. The first delta a job gets comes after its prefill, whose full blocks are in
the prefix cache by then, so that delta is the signal.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch

from flockctl.engine.job import FinishReason, Job, JobState, TokenLogprob
from flockctl.engine.text import TextStream


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    error: str | None = None
    # one per token of ``token_ids`` when the job's params ask for log-probabilities
    logprobs: list[TokenLogprob] | None = None


class JobHandle:
    """An async stream of a job's deltas, and a cancel."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop, abort: Callable[[str], None]):
        self.job = job
        self.loop = loop  # the event loop the deltas go to
        self._abort = abort  # asks the model loop to abort a job
        self.queue: asyncio.Queue[Delta] = asyncio.Queue()
        self.done = False
        self.delivered = False  # the model loop has sent it a delta (its prefill is done)
        self.held = False  # waiting for its leader's first delta, not yet in the model loop
        # jobs held until this one's first delta, each with what starts it
        self.followers: list[tuple[JobHandle, Callable[[JobHandle], None]]] = []
        # model-loop side
        self.stream: TextStream | None = None
        self.generator: torch.Generator | None = None

    async def __aiter__(self) -> AsyncIterator[Delta]:
        while True:
            delta = await self.queue.get()
            if delta.finish_reason is not None:
                self.done = True
            yield delta
            if self.done:
                return

    def cancel(self) -> None:
        """Abort the job (its client went away) and free its cache; safe to call twice."""
        if not self.done:
            self.done = True
            if self.held:  # the model loop never saw it: it ends here
                self.fail(None)
            else:
                self._abort(self.job.id)

    def follow(self, leader: JobHandle, start: Callable[[JobHandle], None]) -> None:
        """Start this job with ``start(self)`` once ``leader`` has had its first delta (at once
        if it has): by then the leader's prompt blocks are cached, and this job shares them."""
        if leader.delivered:
            start(self)
            return
        self.held = True
        leader.followers.append((self, start))

    def fail(self, error: str | None) -> None:
        """End a held job that never reached the model loop: aborted, with ``error`` if any."""
        self.held = False
        self.done = True
        self.job.state = JobState.FINISHED
        self.job.finish_reason = FinishReason.ABORT
        self.queue.put_nowait(Delta("", [], FinishReason.ABORT, error))

    def deliver(self, delta: Delta) -> None:
        """On the event loop: queue ``delta``; the first one starts the jobs held behind it, or
        ends them too when it aborts this job (their request fails with it)."""
        self.queue.put_nowait(delta)
        if self.delivered:
            return
        self.delivered = True
        followers, self.followers = self.followers, []
        for follower, start in followers:
            if not follower.held:  # cancelled meanwhile
                continue
            if delta.finish_reason is FinishReason.ABORT:
                follower.fail(delta.error or f"job {self.job.id} was aborted")
            else:
                follower.held = False
                start(follower)


def put_all(items: list[tuple[JobHandle, Delta]]) -> None:
    """Runs on the event loop: hand each delta to its handle."""
    for handle, delta in items:
        handle.deliver(delta)

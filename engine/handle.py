"""What a request holds while its job runs (a :class:`JobHandle`), and the pieces of output the
model loop sends it (each a :class:`Delta`).

The handle lives on both threads: the API awaits its queue on the event loop; the model loop
keeps the job's text stream and random generator on it and fills the queue through
``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch

from flockctl.engine.job import FinishReason, Job, TokenLogprob
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
            self._abort(self.job.id)


def put_all(items: list[tuple[JobHandle, Delta]]) -> None:
    """Runs on the event loop: hand each delta to its handle's queue."""
    for handle, delta in items:
        handle.queue.put_nowait(delta)

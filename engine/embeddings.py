"""Embeddings: a model's pooled, L2-normalized last hidden state for each input.

An :class:`Embedder` holds the inputs asked for and runs them on the thread that owns the model:
for a causal LM that is the engine's model loop, which calls :meth:`Embedder.drain` between two
decode iterations (the loop runs whatever is posted to its inbox), so embedding forwards share
the device with generation without a lock and never count as decode jobs. Each drain runs one
batched forward of up to :data:`BATCH_TOKENS` padded tokens and posts itself again while inputs
are left, so a large request never holds the decoding jobs back for more than one such forward.

The forward is the model's base (``model.base_model``: the transformer without its LM head), with
right padding and a 2D attention mask, and no KV cache: it never touches the jobs' caches.
Pooling is ``last`` (the last token's hidden state: what a causal LM has seen the whole input by),
``mean`` (over the input's tokens) or ``cls`` (the first token: BERT's). Torch is imported here:
the engine side only.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from flockctl.engine.job import InvalidRequest
from flockctl.schema import EmbeddingStats

log = logging.getLogger("flockctl.engine")

POOLINGS = ("last", "mean", "cls")
#: Inputs one request may carry (OpenAI's bound for its embeddings API).
MAX_INPUTS = 2048
#: Padded tokens of one embedding forward: bounds its memory and how long decoding waits on it.
BATCH_TOKENS = 8192


class EmbedderClosed(RuntimeError):
    """The engine stopped (or its model loop died) before these inputs ran; the API answers 503."""


def is_encoder(model_config: Any) -> bool:
    """Whether a checkpoint's config names an encoder (BERT-style ``AutoModel``) rather than a
    generative model: its declared architectures, none of which generates text."""
    architectures = list(getattr(model_config, "architectures", None) or [])
    generative = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
    if not architectures or getattr(model_config, "is_decoder", False):
        return False
    return not any(a.endswith(generative) for a in architectures)


def matryoshka_dimensions(model_config: Any) -> tuple[int, ...] | None:
    """The output sizes a model was trained to be cut to (its config's ``matryoshka_dimensions``,
    or any size when it says ``is_matryoshka``: an empty tuple); None when it was not."""
    dims = getattr(model_config, "matryoshka_dimensions", None)
    if isinstance(dims, (list, tuple)) and all(isinstance(d, int) and d > 0 for d in dims):
        return tuple(dims)
    return () if getattr(model_config, "is_matryoshka", False) else None


class _Request:
    """One request's inputs, the vectors done so far, and the future its caller awaits."""

    def __init__(self, inputs: list[list[int]], loop: asyncio.AbstractEventLoop):
        self.inputs = inputs
        self.vectors: list[list[float] | None] = [None] * len(inputs)
        self.left = len(inputs)
        self.loop = loop
        self.future: asyncio.Future[list[list[float]]] = loop.create_future()


class Embedder:
    """Pools and normalizes hidden states of inputs (token ids), batched on the model's thread.

    ``run_soon(call)`` runs ``call`` on the thread that owns the model; ``pooling`` is one of
    :data:`POOLINGS`; ``max_len`` bounds an input's tokens; ``dimensions`` is what
    :func:`matryoshka_dimensions` found (None: the output size is fixed).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        *,
        pooling: str,
        max_len: int,
        vocab_size: int,
        run_soon: Callable[[Callable[[], None]], None],
        dimensions: tuple[int, ...] | None = None,
    ):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.base = getattr(model, "base_model", model)
        self.device = device
        self.pooling = pooling
        self.max_len = max_len
        self.vocab_size = vocab_size
        self.size = int(getattr(model.config, "hidden_size", 0)) or None
        self.dimensions = dimensions
        self._run_soon = run_soon
        self._lock = threading.Lock()
        self._queue: collections.deque[tuple[_Request, int]] = collections.deque()
        self._posted = False  # a drain is posted and has not run yet
        self._closed: str | None = None
        self.requests = 0
        self.inputs = 0
        self.tokens = 0
        self.forwards = 0

    # -- the API side (event loop thread) -------------------------------------------------------

    def check(self, inputs: Sequence[Sequence[int]], field: str = "input") -> None:
        """Refuse what cannot be embedded, naming ``field`` (raises ``InvalidRequest``)."""
        if not inputs:
            raise InvalidRequest(f"{field} is empty; send at least one text or token list", field)
        if len(inputs) > MAX_INPUTS:
            raise InvalidRequest(
                f"{field} holds {len(inputs)} inputs; at most {MAX_INPUTS} per request", field
            )
        for i, ids in enumerate(inputs):
            where = f"{field}[{i}]" if len(inputs) > 1 else field
            if not ids:
                raise InvalidRequest(f"{where} is empty (no tokens to embed)", where)
            if len(ids) > self.max_len:
                raise InvalidRequest(
                    f"{where} has {len(ids)} tokens; this model takes at most {self.max_len}",
                    where,
                )
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise InvalidRequest(
                    f"{where}: token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})",
                    where,
                )

    def check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is None:
            return
        if self.dimensions is None:
            raise InvalidRequest(
                "dimensions is not supported: this model's embeddings have a fixed size"
                f" ({self.size}); it was not trained to be shortened (no matryoshka_dimensions"
                " in its config)",
                "dimensions",
            )
        allowed = self.dimensions or range(1, (self.size or 0) + 1)
        if dimensions not in allowed:
            shown = ", ".join(map(str, self.dimensions)) if self.dimensions else f"1..{self.size}"
            raise InvalidRequest(
                f"dimensions must be one of {shown}, got {dimensions}", "dimensions"
            )

    async def embed(
        self, inputs: list[list[int]], dimensions: int | None = None
    ) -> list[list[float]]:
        """Embed ``inputs`` (checked first); one normalized vector per input, in order."""
        self.check(inputs)
        self.check_dimensions(dimensions)
        request = _Request(inputs, asyncio.get_running_loop())
        with self._lock:
            if self._closed:
                raise EmbedderClosed(self._closed)
            self._queue.extend((request, i) for i in range(len(inputs)))
            self.requests += 1
            post = not self._posted
            self._posted = True
        if post:
            self._run_soon(self.drain)
        vectors = await request.future
        if dimensions is not None:
            vectors = [_normalized(v[:dimensions]) for v in vectors]
        return vectors

    def close(self, reason: str) -> None:
        """Fail every input still waiting: nothing will run them."""
        with self._lock:
            self._closed = reason
            waiting = {id(r): r for r, _i in self._queue}.values()
            self._queue.clear()
        for request in waiting:
            request.loop.call_soon_threadsafe(_fail, request.future, EmbedderClosed(reason))

    def stats(self) -> EmbeddingStats:
        return {
            "pooling": self.pooling,
            "requests": self.requests,
            "inputs": self.inputs,
            "tokens": self.tokens,
            "forwards": self.forwards,
            "waiting": len(self._queue),
        }

    # -- the model's thread ---------------------------------------------------------------------

    def drain(self) -> None:
        """Run one batch of waiting inputs; post another drain if some are left."""
        batch = self._take()
        if batch:
            try:
                vectors = self._forward([r.inputs[i] for r, i in batch])
            except Exception as exc:  # e.g. out of memory: fail these, keep the engine serving
                log.exception("embedding forward failed for %d inputs", len(batch))
                failed = {id(r): r for r, _i in batch}.values()
                for request in failed:
                    request.loop.call_soon_threadsafe(_fail, request.future, exc)
            else:
                for (request, i), vector in zip(batch, vectors, strict=True):
                    request.vectors[i] = vector
                    request.left -= 1
                    if request.left == 0:
                        request.loop.call_soon_threadsafe(_settle, request.future, request.vectors)
        with self._lock:
            again = bool(self._queue) and not self._closed
            self._posted = again
        if again:
            self._run_soon(self.drain)

    def _take(self) -> list[tuple[_Request, int]]:
        """The next inputs in arrival order whose padded batch fits ``BATCH_TOKENS`` (at least
        one); inputs of requests whose caller is gone are dropped."""
        batch: list[tuple[_Request, int]] = []
        longest = 0
        with self._lock:
            while self._queue:
                request, i = self._queue[0]
                if request.future.done():  # cancelled: its client went away
                    self._queue.popleft()
                    continue
                n = len(request.inputs[i])
                if batch and max(longest, n) * (len(batch) + 1) > BATCH_TOKENS:
                    break
                longest = max(longest, n)
                batch.append(self._queue.popleft())
        return batch

    def _forward(self, inputs: list[list[int]]) -> list[list[float]]:
        width = max(len(ids) for ids in inputs)
        ids = torch.zeros((len(inputs), width), dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for row, tokens in enumerate(inputs):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        with torch.inference_mode():
            hidden = self.base(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
            ).last_hidden_state.float()
        lengths = mask.sum(dim=1).to(hidden.device)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "last":
            pooled = hidden[torch.arange(len(inputs), device=hidden.device), lengths - 1]
        else:
            weights = mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weights).sum(dim=1) / lengths.unsqueeze(-1)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        self.forwards += 1
        self.inputs += len(inputs)
        self.tokens += int(lengths.sum())
        return pooled.cpu().tolist()


def _normalized(vector: list[float]) -> list[float]:
    norm = sum(x * x for x in vector) ** 0.5 or 1.0
    return [x / norm for x in vector]


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)

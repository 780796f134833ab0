"""TGI's token stream: one server-sent event per generated token, each with its own ``token.id``
and ``token.text``, the last one also carrying the whole text and the details.

The model loop delivers what one iteration produced as one piece: with speculative decoding that
is every token the verification accepted, several at once, with their text joined. TGI clients
expect one event per token, so :class:`TokenTexts` splits each piece's text over its tokens: it
decodes the tokens one by one with its own :class:`~.text.TextStream` (same tokenizer, same prompt
context, no stop strings) and gives each token the text its decoding added, as far as the job has
released it. Joined, the events' texts are exactly the job's text: text the job held back (a
possible stop string, an unfinished character) goes with the token that released it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

from flockctl.engine.text import TextStream

if TYPE_CHECKING:
    from flockctl.engine.handle import JobHandle


class TokenTexts:
    """Splits the text of each piece of a job's output over the piece's tokens."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] | None = None):
        self._stream = TextStream(tokenizer, prompt_ids)
        self._decoded = 0  # characters the tokens so far decode to
        self._released = 0  # characters of the job's text handed out so far

    def split(self, text: str, token_ids: Sequence[int]) -> list[str]:
        """One text per token of ``token_ids`` (one for none); joined, they are ``text``."""
        start = self._released
        self._released += len(text)
        if len(token_ids) <= 1:
            if token_ids:
                self._decoded += len(self._stream.push(token_ids))
            return [text]
        out: list[str] = []
        used = 0
        for n, token in enumerate(token_ids, 1):
            self._decoded += len(self._stream.push([token]))
            end = (
                len(text)
                if n == len(token_ids)
                else min(max(self._decoded - start, used), len(text))
            )
            out.append(text[used:end])
            used = end
        return out


async def tgi_events(
    handle: JobHandle,
    tokenizer: Any,
    special_ids: Collection[int],
    final: Callable[[str], dict[str, Any]],
) -> AsyncIterator[dict[str, Any]]:
    """TGI's stream events for ``handle``'s job: one per token; ``final(text)`` gives what the
    last event adds (``generated_text``, ``details`` and any figures). A failed job ends with
    TGI's error event."""
    texts = TokenTexts(tokenizer, handle.job.prompt_ids)
    parts: list[str] = []
    index = 0
    async for delta in handle:
        if delta.error:
            yield {"error": delta.error, "error_type": "generation"}
            return
        parts.append(delta.text)
        ids: list[int | None] = list(delta.token_ids) or [None]
        pieces = texts.split(delta.text, delta.token_ids)
        scores = getattr(delta, "logprobs", None)  # when the request asked for them
        for n, (token_id, text) in enumerate(zip(ids, pieces, strict=True), 1):
            index += 1
            event: dict[str, Any] = {
                "index": index,
                "token": {
                    "id": token_id,
                    "text": text,
                    "logprob": scores[n - 1].logprob if scores else None,
                    "special": token_id in special_ids,
                },
                "generated_text": None,
                "details": None,
            }
            if delta.finish_reason is not None and n == len(pieces):
                event.update(final("".join(parts)))
            yield event

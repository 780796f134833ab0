"""Log-probabilities in OpenAI's two shapes.

Completions: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``, one entry per token,
``top_logprobs`` a map from token text to log-probability holding the ``logprobs`` most likely
tokens and the chosen one (vLLM's and OpenAI's legacy shape; a prompt's first token has ``null``
in both lists, having nothing before it). Chat: ``{"content": [{"token", "logprob", "bytes",
"top_logprobs": [...]}]}`` with exactly ``top_logprobs`` alternatives.

A token's text is what it decodes to on its own; a token that holds part of a character (byte-level
BPE) decodes to U+FFFD, and its ``bytes`` are those of that text, as vLLM reports them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from flockctl.engine.job import TokenLogprob


class LogprobFormat:
    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self.text = functools.lru_cache(maxsize=65536)(self._text)

    def _text(self, token: int) -> str:
        return self._tokenizer.decode([token], skip_special_tokens=False)

    def completion(
        self, ids: Sequence[int], entries: Sequence[TokenLogprob | None], offset: int
    ) -> dict[str, Any]:
        """Completions' ``logprobs`` for tokens ``ids`` with ``entries`` (one each, or fewer:
        the missing ones are null), the first token's text starting at ``offset``."""
        tokens = [self.text(t) for t in ids]
        token_logprobs: list[float | None] = []
        top: list[dict[str, float] | None] = []
        offsets = []
        for n, token in enumerate(tokens):
            entry = entries[n] if n < len(entries) else None
            offsets.append(offset)
            offset += len(token)
            if entry is None:
                token_logprobs.append(None)
                top.append(None)
                continue
            token_logprobs.append(entry.logprob)
            best = {self.text(t): lp for t, lp in entry.top}
            best.setdefault(token, entry.logprob)
            top.append(best)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top,
            "text_offset": offsets,
        }

    def chat(self, ids: Sequence[int], entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        """Chat's ``logprobs`` for generated tokens ``ids`` with their ``entries``."""
        content = []
        for token, entry in zip(ids, entries, strict=False):
            text = self.text(token)
            content.append(
                {
                    "token": text,
                    "logprob": entry.logprob,
                    "bytes": list(text.encode()),
                    "top_logprobs": [
                        {"token": (t := self.text(i)), "logprob": lp, "bytes": list(t.encode())}
                        for i, lp in entry.top
                    ],
                }
            )
        return {"content": content}

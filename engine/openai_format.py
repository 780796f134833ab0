"""Log-probabilities in OpenAI's two shapes.

Completions: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``, one entry per token,
``top_logprobs`` a map from token text to log-probability holding the ``logprobs`` most likely
tokens and the chosen one (vLLM's and OpenAI's legacy shape; a prompt's first token has ``null``
in both lists, having nothing before it). Chat: ``{"content": [{"token", "logprob", "bytes",
"top_logprobs": [...]}]}`` with exactly ``top_logprobs`` alternatives.

A token's text is what it decodes to on its own. A token that holds only part of a character
(byte-level BPE, SentencePiece byte fallback) cannot be text: as OpenAI does, it is written
``bytes:\\xe2\\x80``, so no two tokens share a key of ``top_logprobs``, and chat's ``bytes`` are
its own bytes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

from flockctl.engine.job import TokenLogprob

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: how byte-level BPE spells raw bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class LogprobFormat:
    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self.text = functools.lru_cache(maxsize=65536)(self._text)
        self.raw = functools.lru_cache(maxsize=65536)(self._raw)

    def _text(self, token: int) -> str:
        text = self._tokenizer.decode([token], skip_special_tokens=False)
        if "\ufffd" in text:
            raw = self.raw(token)
            if raw is not None and b"\xef\xbf\xbd" not in raw:
                return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text

    def _raw(self, token: int) -> bytes | None:
        """The bytes a token stands for, when its vocabulary spells them out; else None."""
        piece = self._tokenizer.convert_ids_to_tokens(token)
        if not isinstance(piece, str):
            return None
        byte = _BYTE_TOKEN.fullmatch(piece)
        if byte:
            return bytes([int(byte.group(1), 16)])
        table = _byte_level_decoder()
        if piece and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return None

    def token_bytes(self, token: int) -> list[int]:
        text = self.text(token)
        if text.startswith("bytes:"):
            raw = self.raw(token)
            assert raw is not None
            return list(raw)
        return list(text.encode())

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
            offset += 0 if token.startswith("bytes:") else len(token)
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
            content.append(
                {
                    "token": self.text(token),
                    "logprob": entry.logprob,
                    "bytes": self.token_bytes(token),
                    "top_logprobs": [
                        {"token": self.text(i), "logprob": lp, "bytes": self.token_bytes(i)}
                        for i, lp in entry.top
                    ],
                }
            )
        return {"content": content}

"""Incremental detokenization: a job's generated token ids become text pieces as they arrive.

Decoding token by token does not work: byte-level BPE splits one character over several tokens
(a lone piece decodes to U+FFFD), and SentencePiece-style decoders drop the leading space of the
first token of whatever they are given, so a token's text depends on what came before it. Decoding
everything again on every token is right but costs O(length) per token. ``TextStream`` does what
vLLM and TGI do: it decodes a short window of recent tokens and returns the text the newest tokens
added to it, holding back a trailing U+FFFD until the rest of its character arrives. The window
slides forward every few tokens, so each ``push`` costs one small decode.

Stop strings are matched on the text that is final. A tail that could be the start of a stop string
is held back, so a piece once returned never has to be taken back.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .job import InvalidRequest

REPLACEMENT = "\ufffd"
#: C0 controls and DEL, but not the whitespace ones text is made of (tab, newline, return).
_CONTROLS = frozenset(chr(c) for c in [*range(32), 127]) - frozenset("\t\n\r")

# Tokens kept in front of the newest ones when the window slides: the context a decoder needs to
# give a token its leading space. One is enough for the decoders we know; two leaves a margin.
_CONTEXT = 2
# How far the window grows past _CONTEXT before it slides. Sliding costs one extra decode and a
# longer window makes every decode dearer (about 0.25 µs a token); four measured fastest.
_SLACK = 4


def _decoder(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """The cheapest call that decodes exactly like ``tokenizer.decode(..., cleanup off)``.

    A transformers fast tokenizer spends about 6 µs in Python around its Rust decoder; when the
    class does not override decoding, calling the Rust tokenizer directly gives the same text.
    """
    transformers = sys.modules.get("transformers")
    fast = getattr(transformers, "PreTrainedTokenizerFast", None) if transformers else None
    cls = type(tokenizer)
    if (
        fast is not None
        and isinstance(tokenizer, fast)
        and cls.decode is fast.decode
        and cls._decode is fast._decode
    ):
        return functools.partial(
            tokenizer.backend_tokenizer.decode, skip_special_tokens=skip_special_tokens
        )
    tokenizers = sys.modules.get("tokenizers")
    if tokenizers is not None and isinstance(tokenizer, tokenizers.Tokenizer):
        return functools.partial(tokenizer.decode, skip_special_tokens=skip_special_tokens)
    return functools.partial(
        tokenizer.decode,
        skip_special_tokens=skip_special_tokens,
        clean_up_tokenization_spaces=False,
    )


class TextStream:
    """Turns a job's generated token ids into text pieces as they arrive.

    Joined, the pieces ``push`` and ``finish`` return are exactly ``tokenizer.decode(output_ids)``
    (special tokens skipped unless asked, no clean-up of spaces), cut before the first stop string.
    With ``prompt_ids`` the last prompt tokens serve as context, so the first piece carries the
    leading space a SentencePiece tokenizer gives a word that follows the prompt; the text is then
    ``decode(prompt + output)`` less ``decode(prompt)``. A prompt that ends inside a character
    gives no context (the output decodes on its own).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int] | None = None,
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._decode = _decoder(tokenizer, skip_special_tokens)
        # The window: token ids from a character boundary on, and how many characters of its
        # decoded text have been passed on as final (to the stop matching, then the caller).
        self._window: list[int] = []
        self._done = 0
        if prompt_ids:
            self._window, self._done = self._context(list(prompt_ids))
        if any(not s for s in stop):
            raise InvalidRequest("stop strings must not be empty", "stop")
        self._stops = tuple(dict.fromkeys(stop))
        self._heads = tuple({s[0] for s in self._stops})
        self._held = ""  # final text that may be the start of a stop string
        self._controls = ""  # final text made only of control characters, held for the next
        self._pieces: list[str] = []
        self._stopped = False
        self._finished = False

    @property
    def cuts(self) -> bool:
        """It has stop strings: the token that completes one ends the text, so its caller
        pushes one token at a time to know which (without any, a push of several tokens gives
        the text their pushes one by one would)."""
        return bool(self._stops)

    @property
    def stopped(self) -> bool:
        """A stop string appeared: the text ends just before it and nothing more will come."""
        return self._stopped

    @property
    def text(self) -> str:
        """All text returned so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def push(self, token_ids: Sequence[int]) -> str:
        """Take newly generated ids; return the text now final (often "", never taken back)."""
        if self._finished:
            raise RuntimeError("push() after finish(): a TextStream serves one generation")
        if self._stopped or not token_ids:
            return ""
        window = self._window
        window.extend(token_ids)
        text = self._decode(window)
        end = len(text)
        if text.endswith(REPLACEMENT):
            # The last character's bytes may still be arriving; what precedes them is final.
            end = len(text.rstrip(REPLACEMENT))
        if end <= self._done:
            return ""
        new = text[self._done : end]
        self._done = end
        if end == len(text) and len(window) > _CONTEXT + _SLACK:
            self._slide()
        new = self._join_controls(new)
        if not new:
            return ""
        if self._stops:
            return self._release(new, final=False)
        self._pieces.append(new)
        return new

    def finish(self) -> str:
        """Return everything not yet returned: held-back text and unfinished characters."""
        if self._finished or self._stopped:
            self._finished = True
            return ""
        self._finished = True
        rest = self._decode(self._window)[self._done :] if self._window else ""
        rest, self._controls = self._controls + rest, ""
        return self._release(rest, final=True)

    def _join_controls(self, new: str) -> str:
        """Hold a piece made only of control characters (a token that decodes to a lone BEL or
        form feed, say) and pass it on with the next piece, so no streamed chunk is an invisible
        control character on its own. The joined text is unchanged."""
        new, self._controls = self._controls + new, ""
        if new and all(c in _CONTROLS for c in new):
            self._controls = new
            return ""
        return new

    def _slide(self) -> None:
        """Restart the window a few tokens back, at a token that begins a character.

        A window must not start inside a character: SentencePiece byte fallback decodes a run of
        byte tokens as a whole and turns all of it into U+FFFD when the run starts mid-character.
        Such a start shows as a leading U+FFFD; then the window stays as it is and slides later.
        Only a clean end slides it, so output that keeps ending in invalid bytes makes the window,
        and each decode, longer until a character completes.
        """
        tail = self._window[-_CONTEXT:]
        text = self._decode(tail)
        if not text.startswith(REPLACEMENT):
            self._window = tail
            self._done = len(text)

    def _context(self, prompt_ids: list[int]) -> tuple[list[int], int]:
        """The prompt's last tokens as a starting window, when they begin and end on characters."""
        # A character is at most four bytes, so at most three steps back reach its first one.
        for n in range(_CONTEXT, _CONTEXT + 4):
            tail = prompt_ids[-n:]
            text = self._decode(tail)
            if text.startswith(REPLACEMENT) and len(tail) < len(prompt_ids):
                continue  # starts inside a character: reach one token further back
            if text.endswith(REPLACEMENT):
                break  # the prompt ends inside a character
            return tail, len(text)
        return [], 0

    def _release(self, new: str, final: bool) -> str:
        """Pass final text through the stop strings; return what can be shown now."""
        buf = self._held + new if self._held else new
        keep = 0
        # A stop string can neither be in buf nor start in it without its first character.
        if any(head in buf for head in self._heads):
            cut = self._first_stop(buf)
            if cut >= 0:
                self._stopped = True
                self._held = ""
                buf = buf[:cut]
            elif not final:
                keep = self._partial_stop(buf)
        if keep:
            self._held = buf[-keep:]
            buf = buf[:-keep]
        else:
            self._held = ""
        if buf:
            self._pieces.append(buf)
        return buf

    def _first_stop(self, buf: str) -> int:
        """Where the stop string that appears first in ``buf`` starts, or -1.

        First to appear means first to end: had the text come one character at a time, that is
        the one that would have stopped it, so the result does not depend on how ids were pushed.
        Of two ending together the longer one cuts more.
        """
        best: tuple[int, int] | None = None
        for s in self._stops:
            i = buf.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best):
                best = (i + len(s), i)
        return -1 if best is None else best[1]

    def _partial_stop(self, buf: str) -> int:
        """Length of the longest end of ``buf`` that a stop string starts with.

        Every stop string that starts before the held-back text would have been found whole, so
        holding this much is enough to catch one that spans pieces, and no more is held.
        """
        longest = 0
        n = len(buf)
        for s in self._stops:
            head = s[0]
            i = buf.find(head, max(0, n - len(s) + 1), n - longest)
            while i >= 0:
                if s.startswith(buf[i:]):
                    longest = n - i
                    break
                i = buf.find(head, i + 1, n - longest)
        return longest

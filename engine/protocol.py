"""Request bodies of the engine's API, as pydantic models, and how each becomes SamplingParams.

Validation is strict (``"16"`` is not a number, ``true`` is not an integer), and every range is
checked here (``n`` 1-16, ``logprobs`` 0-20, penalties in [-2, 2], ...), so a client's mistake is
a 400 naming the field rather than a guess. Fields that clients send but the engine cannot honour
(``suffix``, ``tools``, ...) are accepted by the model and refused by ``unsupported()`` with a
message naming them: silently ignoring them would change the output. Unknown fields are ignored,
as OpenAI's and TGI's client libraries send many optional ones.

Before a body reaches a model, two checks refuse what would otherwise fail deep inside the server:
``too_deep`` (json.loads recurses once per level of nesting) and ``first_surrogate`` (JSON's
``"\\ud800"`` decodes to a str that no tokenizer or JSON encoder takes). The models' JSON Schemas
are what ``/openapi.json`` publishes for the routes' bodies.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
)

from flockctl.engine.job import MAX_LOGPROBS, InvalidRequest, SamplingParams, lone_surrogate_at

# The range torch.Generator.manual_seed takes.
Seed = Annotated[int, Field(ge=-(2**63), lt=2**64)]


def field_path(loc: Sequence[int | str]) -> str:
    """``("body", "messages", 0, "content")`` -> ``messages[0].content``."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


#: Levels of arrays and objects a body may nest; ours nest four at most (messages, content parts).
MAX_DEPTH = 64

# A JSON string from its opening quote to its closing one, or to the end of a body cut short; it
# always matches from a quote without backtracking, so stripping strings stays linear.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def too_deep(raw: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON text nests arrays and objects deeper than ``limit``, found without parsing it.

    A body with fewer brackets than the limit is answered by two counts (3 µs for a 4 KB chat
    body, json.loads takes 9). Otherwise strings are cut out, as brackets in a prompt nest
    nothing, and counted again (28 µs for 4 KB of prompts full of brackets, 74 µs for 100
    messages); only then is the depth followed, at C speed.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if brackets.count(b"[") + brackets.count(b"{") <= limit:
        return False
    # Each opener one level down, each closer one up (255 read as a signed byte is -1).
    steps = memoryview(brackets.translate(_STEPS)).cast("b")
    return max(itertools.accumulate(steps)) > limit


def first_surrogate(value: Any, loc: tuple[int | str, ...] = ()) -> tuple[str, str] | None:
    """The first string of decoded JSON that holds a lone UTF-16 surrogate: its field path
    (``messages[0].content``, empty for the body itself) and what is wrong with it.

    JSON may escape one half of a surrogate pair alone (a client that cut an emoji in two sends
    ``"\\ud83d"``); Python decodes it to a str that is not Unicode text, which tokenizers refuse
    with a TypeError and UTF-8 cannot encode. Keys are checked too. ``value`` nests at most
    ``MAX_DEPTH`` levels (``too_deep`` ran first), so recursion is safe.
    """
    if isinstance(value, str):
        at = lone_surrogate_at(value)
        if at is None:
            return None
        return field_path(("body", *loc)), _surrogate_problem(value, at)
    if isinstance(value, dict):
        for key, item in value.items():
            at = lone_surrogate_at(key)
            if at is not None:
                return field_path(("body", *loc)), f"has a key that {_surrogate_problem(key, at)}"
            found = first_surrogate(item, (*loc, key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = first_surrogate(item, (*loc, index))
            if found is not None:
                return found
    return None


def _surrogate_problem(text: str, at: int) -> str:
    return (
        f"holds a lone UTF-16 surrogate (\\u{ord(text[at]):04x}) at character {at}, which is"
        " not text; send the whole character, as UTF-8 or as both halves of its surrogate pair"
        " (\\ud83d\\ude00)"
    )


def _stop_list(value: Any) -> Any:
    """OpenAI and TGI take one stop string or a list of them."""
    if isinstance(value, str):
        return [value]
    return value


StopList = Annotated[
    list[str] | None,
    BeforeValidator(_stop_list),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}},
                {"type": "null"},
            ],
            "description": "one stop string or a list of them",
        }
    ),
]


class Body(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(Body):
    include_usage: bool = False


#: Choices one request may ask for (``n``), and prompts times choices in one completion request.
MAX_N = 16
MAX_CHOICES = 64

Penalty = Annotated[float, Field(ge=-2, le=2)]
LogprobCount = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]


class OpenAIRequest(Body):
    """What completions and chat completions share (vLLM's extensions included)."""

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # vLLM's; -1 or 0: off
    seed: Seed | None = None
    stop: StopList = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None  # vLLM's
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's, for benchmarks
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    best_of: int | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=2)] | None = None  # vLLM's
    min_tokens: Annotated[int, Field(ge=0)] | None = None  # vLLM's
    user: str | None = None

    # field -> why it is refused when set to anything truthy
    REFUSED: ClassVar[dict[str, str]] = {}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def max_tokens_field(self) -> str:
        """The field the client set the length with, for errors about it."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def unsupported(self) -> tuple[str, str] | None:
        """The first field set to something this engine cannot do: (field, message)."""
        if self.best_of not in (None, 1, self.n):
            return "best_of", f"best_of must equal n ({self.n}) or be left out, got {self.best_of}"
        for name, message in self.REFUSED.items():
            if getattr(self, name):
                return name, message
        return None

    def wanted_logprobs(self) -> int | None:
        """Alternatives per generated token, or None for no log-probabilities."""
        return None

    def logit_bias_items(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as (token id, bias); a key that is not a token id is a 400."""
        items = []
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise InvalidRequest(
                    f'logit_bias keys are token ids as strings ("50256"), got {key!r}',
                    "logit_bias",
                )
            items.append((int(key), bias))
        return tuple(items)

    def sampling_params(
        self, default_max_tokens: int, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        """Raises InvalidRequest (param names the field) for out-of-range values."""
        max_tokens = self.requested_max_tokens()
        return SamplingParams(
            max_tokens=default_max_tokens if max_tokens is None else max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k in (None, -1) else self.top_k,
            seed=self.seed,
            stop=tuple(self.stop or ()),
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            min_tokens=self.min_tokens or 0,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            logit_bias=self.logit_bias_items(),
            logprobs=self.wanted_logprobs(),
            prompt_logprobs=prompt_logprobs,
        )


# An empty prompt is refused (the engine has nothing to start from), so the schemas say so.
_TEXT = {"type": "string", "minLength": 1}
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}

# What ``_prompts`` takes: a string or token ids, alone or as a batch.
PromptSchema = WithJsonSchema(
    {
        "anyOf": [
            _TEXT,
            _TOKEN_IDS,
            {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": MAX_CHOICES},
            {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": MAX_CHOICES},
        ],
        "description": "text or token ids, or a batch of either (one choice per prompt)",
    }
)


class CompletionRequest(OpenAIRequest):
    prompt: Annotated[list[str | list[int]], PromptSchema]
    echo: bool = False
    logprobs: LogprobCount | None = None
    suffix: Any = None

    REFUSED: ClassVar[dict[str, str]] = {
        "suffix": "suffix (insertion) is not supported by this engine",
    }

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, value: Any) -> Any:
        """OpenAI's four forms, as a list of prompts: a string, a list of strings, a list of
        token ids, a list of lists of token ids."""
        if isinstance(value, str) or (
            isinstance(value, list) and value and all(_is_id(t) for t in value)
        ):
            return [value]
        if isinstance(value, list) and value:
            if len(value) > MAX_CHOICES:
                raise ValueError(f"at most {MAX_CHOICES} prompts per request, got {len(value)}")
            for item in value:
                if not (
                    isinstance(item, str)
                    or (isinstance(item, list) and item and all(_is_id(t) for t in item))
                ):
                    break
            else:
                return value
        raise ValueError(
            "prompt must be a string, a list of strings, a list of token ids or a list of lists"
            " of token ids, none of them empty"
        )

    def unsupported(self) -> tuple[str, str] | None:
        if len(self.prompt) * self.n > MAX_CHOICES:
            return "n", (
                f"{len(self.prompt)} prompts times n={self.n} is {len(self.prompt) * self.n}"
                f" choices; at most {MAX_CHOICES} per request"
            )
        return super().unsupported()

    def wanted_logprobs(self) -> int | None:
        return self.logprobs

    def prompt_logprobs(self) -> int | None:
        """Echoed prompts are scored when log-probabilities are asked, or when nothing is to be
        generated (``max_tokens: 0``: the job's whole work is its prompt's prefill)."""
        if not self.echo or (self.logprobs is None and self.requested_max_tokens() != 0):
            return None
        return self.logprobs or 0


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# What ``_text_parts`` takes besides a string: text parts, joined.
ContentSchema = WithJsonSchema(
    {
        "anyOf": [
            {"type": "string"},
            {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                    "required": ["type", "text"],
                },
            },
            {"type": "null"},
        ]
    }
)


class ChatMessage(Body):
    role: str
    content: Annotated[str | None, ContentSchema] = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        """Content given as parts (``[{"type": "text", "text": ...}]``) is joined into text."""
        if not isinstance(value, list):
            return value
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"only text content parts are supported, got {kind!r}")
            if not isinstance(part.get("text"), str):
                raise ValueError("a text content part needs a string 'text'")
            texts.append(part["text"])
        return "".join(texts)


class ChatRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: LogprobCount | None = None
    tools: Any = None
    functions: Any = None
    response_format: dict[str, Any] | None = None

    REFUSED: ClassVar[dict[str, str]] = {
        "tools": "tools (function calling) are not supported by this engine",
        "functions": "functions (function calling) are not supported by this engine",
    }

    def unsupported(self) -> tuple[str, str] | None:
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", 'only response_format {"type": "text"} is supported'
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        return super().unsupported()

    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

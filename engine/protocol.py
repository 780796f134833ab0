"""Request bodies of the engine's API, as pydantic models, and how each becomes SamplingParams.

Validation is strict (``"16"`` is not a number, ``true`` is not an integer), so a client's mistake
is a 400 naming the field rather than a guess. Fields that clients send but the engine cannot
honour (``logprobs``, ``n`` > 1, penalties, ...) are accepted by the model and refused by
``unsupported()`` with a message naming them: silently ignoring them would change the output.
Unknown fields are ignored, as OpenAI's and TGI's client libraries send many optional ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from flockctl.engine.job import SamplingParams

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


def _stop_list(value: Any) -> Any:
    """OpenAI and TGI take one stop string or a list of them."""
    if isinstance(value, str):
        return [value]
    return value


StopList = Annotated[list[str] | None, BeforeValidator(_stop_list)]


class Body(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(Body):
    include_usage: bool = False


class OpenAIRequest(Body):
    """What completions and chat completions share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # an extension (vLLM's); -1 or 0: off
    seed: Seed | None = None
    stop: StopList = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # an extension (vLLM's), for benchmarks
    n: int | None = None
    best_of: int | None = None
    logprobs: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None

    # field -> why it is refused when set to anything truthy
    REFUSED: ClassVar[dict[str, str]] = {
        "logprobs": "logprobs are not supported by this engine",
        "logit_bias": "logit_bias is not supported by this engine",
        "presence_penalty": "presence_penalty is not supported by this engine",
        "frequency_penalty": "frequency_penalty is not supported by this engine",
    }

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def unsupported(self) -> tuple[str, str] | None:
        """The first field set to something this engine cannot do: (field, message)."""
        if self.n not in (None, 1):
            return "n", f"n must be 1 (one choice per request), got {self.n}"
        if self.best_of not in (None, 1):
            return "best_of", f"best_of must be 1, got {self.best_of}"
        for name, message in self.REFUSED.items():
            if getattr(self, name):
                return name, message
        return None

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
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
        )


class CompletionRequest(OpenAIRequest):
    prompt: str | list[int]
    echo: Any = None
    suffix: Any = None

    REFUSED: ClassVar[dict[str, str]] = {
        **OpenAIRequest.REFUSED,
        "echo": "echo is not supported by this engine",
        "suffix": "suffix (insertion) is not supported by this engine",
    }

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        """One prompt per request: a string or a list of token ids, alone or in a list of one."""
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
            value = value[0]  # ["text"] or [[ids]]: a batch of one
        elif isinstance(value, list) and len(value) > 1 and all(isinstance(v, str) for v in value):
            raise ValueError(f"one prompt per request, got a list of {len(value)}")
        if isinstance(value, str) or (isinstance(value, list) and all(_is_id(t) for t in value)):
            return value
        raise ValueError("prompt must be a string, a list of one string, or a list of token ids")


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ChatMessage(Body):
    role: str
    content: str | None = None
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
    max_completion_tokens: int | None = None
    top_logprobs: Any = None
    tools: Any = None
    functions: Any = None
    response_format: dict[str, Any] | None = None

    REFUSED: ClassVar[dict[str, str]] = {
        **OpenAIRequest.REFUSED,
        "top_logprobs": "top_logprobs are not supported by this engine",
        "tools": "tools (function calling) are not supported by this engine",
        "functions": "functions (function calling) are not supported by this engine",
    }

    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def unsupported(self) -> tuple[str, str] | None:
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", 'only response_format {"type": "text"} is supported'
        return super().unsupported()


class TGIParameters(Body):
    """TGI's ``parameters``; huggingface_hub's client sends every field, mostly null."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: Seed | None = None
    stop: StopList = None
    do_sample: bool | None = None
    details: bool | None = None
    return_full_text: bool | None = None
    best_of: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    typical_p: float | None = None
    watermark: bool | None = None
    top_n_tokens: int | None = None
    decoder_input_details: bool | None = None
    grammar: Any = None
    truncate: Any = None

    def unsupported(self) -> tuple[str, str] | None:
        checks = (
            ("best_of", self.best_of not in (None, 1), "best_of must be 1"),
            ("repetition_penalty", self.repetition_penalty not in (None, 1.0), "not supported"),
            ("frequency_penalty", bool(self.frequency_penalty), "not supported"),
            ("typical_p", self.typical_p not in (None, 1.0), "not supported"),
            ("watermark", bool(self.watermark), "not supported"),
            ("top_n_tokens", bool(self.top_n_tokens), "not supported"),
            ("decoder_input_details", bool(self.decoder_input_details), "not supported"),
            ("grammar", bool(self.grammar), "not supported"),
            ("truncate", bool(self.truncate), "not supported"),
        )
        for name, refused, why in checks:
            if refused:
                return f"parameters.{name}", f"parameters.{name}: {why} by this engine"
        return None


class GenerateRequest(Body):
    """``/generate``'s two bodies: TGI's ``{"inputs", "parameters"}`` or FastServe's flat one."""

    inputs: str | None = None
    parameters: TGIParameters | None = None
    prompt: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: Seed | None = None
    stop: StopList = None
    ignore_eos: bool = False

    @property
    def tgi(self) -> bool:
        return self.inputs is not None

    @property
    def text(self) -> str:
        text = self.inputs if self.inputs is not None else self.prompt
        assert text is not None  # unsupported() refuses a body with neither
        return text

    @property
    def wants_details(self) -> bool:
        return bool(self.parameters and self.parameters.details)

    def full_text(self, generated: str) -> str:
        """TGI's ``return_full_text`` puts the prompt in front of the generated text."""
        if self.parameters and self.parameters.return_full_text:
            return self.text + generated
        return generated

    def unsupported(self) -> tuple[str, str] | None:
        if self.inputs is None and self.prompt is None:
            return "inputs", (
                'the body needs "inputs" (TGI: {"inputs": "...", "parameters": {...}}) or'
                ' "prompt" (FastServe: {"prompt": "...", "max_new_tokens": 16})'
            )
        if self.inputs is not None and self.prompt is not None:
            return "prompt", 'give "inputs" (TGI) or "prompt" (FastServe), not both'
        if self.parameters is not None:
            return self.parameters.unsupported()
        return None

    def fields(self) -> dict[str, str]:
        """The engine's parameter names as this body spells them, for error messages."""
        if not self.tgi:
            return {"max_tokens": "max_new_tokens"}
        names = ("temperature", "top_p", "top_k", "seed", "stop")
        return {
            "prompt": "inputs",
            "max_tokens": "parameters.max_new_tokens",
            **{name: f"parameters.{name}" for name in names},
        }

    def sampling_params(self) -> SamplingParams:
        """TGI samples only when asked (``do_sample``) or when a sampling parameter is set, as
        TGI itself does; FastServe's body samples at temperature 1 unless told otherwise."""
        if not self.tgi:
            return SamplingParams(
                max_tokens=16 if self.max_new_tokens is None else self.max_new_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=0 if self.top_k in (None, -1) else self.top_k,
                seed=self.seed,
                stop=tuple(self.stop or ()),
                ignore_eos=self.ignore_eos,
            )
        p = self.parameters or TGIParameters()
        sample = (
            bool(p.do_sample)
            or p.temperature not in (None, 1.0)
            or bool(p.top_k)
            or p.top_p not in (None, 1.0)
        )
        return SamplingParams(
            max_tokens=16 if p.max_new_tokens is None else p.max_new_tokens,
            temperature=(1.0 if p.temperature is None else p.temperature) if sample else 0.0,
            top_p=1.0 if p.top_p is None else p.top_p,
            top_k=p.top_k or 0,
            seed=p.seed,
            stop=tuple(p.stop or ()),
            ignore_eos=self.ignore_eos,
        )

"""TGI's and FastServe's ``/generate`` bodies, as pydantic models, and how each becomes
SamplingParams. Validation follows :mod:`flockctl.engine.protocol` (strict types, a 400 naming
the field), which also holds OpenAI's bodies.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, WithJsonSchema

from flockctl.engine.job import SamplingParams
from flockctl.engine.protocol import _TEXT, Body, Seed, StopList


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

    # One of the two, as unsupported() checks.
    model_config = ConfigDict(
        json_schema_extra={"oneOf": [{"required": ["inputs"]}, {"required": ["prompt"]}]}
    )

    inputs: Annotated[str | None, WithJsonSchema(_TEXT)] = None
    parameters: TGIParameters | None = None
    prompt: Annotated[str | None, WithJsonSchema(_TEXT)] = None
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

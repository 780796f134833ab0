"""The engine as a Python library, in FlexFlow Serve's shape::

    from flockctl.engine import LLM, SSM, GenerationConfig

    llm = LLM("path/or/hub-id")
    llm.compile(GenerationConfig(do_sample=False, max_new_tokens=64), ssms=[SSM("small/draft")])
    result = llm.generate("def fib(n):")
    print(result.output_text, result.output_tokens)
    llm.stop_server()

``compile`` fixes the settings, ``start_server`` loads the models and starts the engine's model loop
(``generate`` starts it when needed), ``stop_server`` stops it; ``with llm:`` does both. Prompts
given together run as one batch through the same scheduler, KV manager and speculative decoding
as ``flockctl engine serve``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from flockctl.engine.config import EngineConfig
from flockctl.engine.engine import Engine
from flockctl.engine.job import SamplingParams
from flockctl.engine.loader import load_engine


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick tokens. ``do_sample=False`` is greedy; otherwise ``temperature``, ``topp``
    (nucleus) and ``topk`` (0: off) shape the distribution, and ``seed`` makes it repeatable."""

    do_sample: bool = False
    temperature: float = 1.0
    topp: float = 1.0
    topk: int = 0
    max_new_tokens: int = 128
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def params(self, max_new_tokens: int | None = None) -> SamplingParams:
        """The engine's sampling parameters (validated: a bad value raises ``InvalidRequest``)."""
        return SamplingParams(
            max_tokens=max_new_tokens if max_new_tokens is not None else self.max_new_tokens,
            temperature=self.temperature if self.do_sample else 0.0,
            top_p=self.topp,
            top_k=self.topk,
            seed=self.seed,
            stop=tuple(self.stop),
            ignore_eos=self.ignore_eos,
        )


@dataclass
class SSM:
    """A small speculative model that drafts token trees for an :class:`LLM` to verify. It must
    use the LLM's tokenizer; ``"demo"`` is the demo's distilled draft."""

    model: str
    generation_config: GenerationConfig | None = None

    def compile(self, generation_config: GenerationConfig | None = None, **_: Any) -> None:
        """Accepted so FlexFlow Serve scripts run unchanged: an SSM drafts with the settings of
        each request it speculates for, so its own configuration only documents intent."""
        self.generation_config = generation_config


@dataclass
class GenerationResult:
    input_text: str
    input_tokens: list[int]
    output_text: str
    output_tokens: list[int]
    finish_reason: str
    speculation: dict[str, Any] | None = field(default=None)


class LLM:
    """A served model in this process. ``model``: a hub id, a local directory, or ``"demo"``.

    ``device`` (auto, cuda, mps, cpu), ``dtype`` and ``threads`` are fixed here; batch size,
    context and speculation in :meth:`compile`.
    """

    def __init__(
        self, model: str, *, device: str = "auto", dtype: str = "auto", threads: int | None = None
    ):
        self.model = model
        self._base = {"device": device, "dtype": dtype, "threads": threads}
        self.generation_config = GenerationConfig()
        self._config: EngineConfig | None = None
        self.engine: Engine | None = None

    def compile(
        self,
        generation_config: GenerationConfig | None = None,
        *,
        max_requests_per_batch: int = 8,
        max_seq_length: int | None = None,
        ssms: Sequence[SSM] = (),
        spec_tree: Sequence[int] | None = None,
        spec: str = "auto",
        scheduler: str = "mlfq",
        kv_budget: int | None = None,
    ) -> None:
        """Fix the serving settings; ``max_requests_per_batch`` is the engine's batch size and
        ``max_seq_length`` its longest prompt plus output (default: the model's context);
        ``spec_tree`` the token-tree expansion (default: the device's, as ``--spec-tree auto``)."""
        if self.engine is not None:
            raise RuntimeError("the engine is running; call stop_server() before compile()")
        self.generation_config = generation_config or GenerationConfig()
        self.generation_config.params()  # refuse bad settings now, not at the first prompt
        self._config = EngineConfig(
            model=self.model,
            max_batch_size=max_requests_per_batch,
            max_model_len=max_seq_length,
            draft_models=tuple(s.model for s in ssms),
            spec_tree=tuple(spec_tree) if spec_tree else None,
            spec=spec if ssms else "off",
            scheduler=scheduler,
            kv_budget=kv_budget,
            **self._base,
        )

    def start_server(self) -> None:
        """Load the model (and SSMs) and start the model loop; compiles with defaults if needed."""
        if self.engine is not None:
            return
        if self._config is None:
            self.compile()
        assert self._config is not None
        self.engine = load_engine(self._config, progress=False)

    def stop_server(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def __enter__(self) -> LLM:
        self.start_server()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_server()

    @overload
    def generate(
        self,
        prompts: str,
        max_new_tokens: int | None = None,
        generation_config: GenerationConfig | None = None,
    ) -> GenerationResult: ...

    @overload
    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int | None = None,
        generation_config: GenerationConfig | None = None,
    ) -> list[GenerationResult]: ...

    def generate(
        self,
        prompts: str | Sequence[str],
        max_new_tokens: int | None = None,
        generation_config: GenerationConfig | None = None,
    ) -> GenerationResult | list[GenerationResult]:
        """Complete one prompt (returns one result) or several together (a list, in order)."""
        single = isinstance(prompts, str)
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        self.start_server()
        params = (generation_config or self.generation_config).params(max_new_tokens)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            results = asyncio.run(self.agenerate(texts, params))
        else:  # called from async code (a notebook): run on a thread of its own
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                results = pool.submit(asyncio.run, self.agenerate(texts, params)).result()
        return results[0] if single else results

    async def agenerate(
        self, prompts: Sequence[str], params: SamplingParams
    ) -> list[GenerationResult]:
        """``generate`` for async callers: every prompt is submitted at once."""
        engine = self.engine
        if engine is None:
            raise RuntimeError("call start_server() first")
        encoded = [engine.tokenizer.encode(p) for p in prompts]
        handles = [engine.submit(ids, params) for ids in encoded]

        async def collect(index: int) -> GenerationResult:
            handle = handles[index]
            pieces: list[str] = []
            tokens: list[int] = []
            reason = "abort"
            async for delta in handle:
                if delta.error:
                    raise RuntimeError(delta.error)
                pieces.append(delta.text)
                tokens.extend(delta.token_ids)
                if delta.finish_reason is not None:
                    reason = delta.finish_reason.value
            spec = handle.job.spec
            return GenerationResult(
                prompts[index],
                encoded[index],
                "".join(pieces),
                tokens,
                reason,
                spec.summary() if spec else None,
            )

        try:
            return list(await asyncio.gather(*(collect(i) for i in range(len(handles)))))
        finally:
            for handle in handles:
                handle.cancel()

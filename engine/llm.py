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
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from flockctl.engine.config import EngineConfig
from flockctl.engine.engine import Engine
from flockctl.engine.job import InvalidRequest, SamplingParams
from flockctl.engine.loader import load_engine

log = logging.getLogger("flockctl.engine")


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
        self,
        model: str,
        *,
        device: str | None = None,
        dtype: str = "auto",
        threads: int | None = None,
    ):
        self.model = model
        self._device: str = device or RUNTIME.get("device", "auto")
        self._dtype = dtype
        self._threads: int | None = threads if threads is not None else RUNTIME.get("threads")
        self.generation_config = GenerationConfig()
        self._config: EngineConfig | None = None
        self.engine: Engine | None = None

    def compile(
        self,
        generation_config: GenerationConfig | None = None,
        max_requests_per_batch: int = 8,
        max_seq_length: int | None = None,
        max_tokens_per_batch: int | None = None,
        model_specific_data_parallelism_degree: int | None = None,
        model_specific_tensor_parallelism_degree: int | None = None,
        model_specific_pipeline_parallelism_degree: int | None = None,
        ssms: Sequence[SSM] = (),
        *,
        spec_tree: Sequence[int] | None = None,
        spec: str = "auto",
        scheduler: str = "mlfq",
        kv_budget: int | None = None,
        attention: str = "fast",
    ) -> None:
        """Fix the serving settings, with FlexFlow Serve's names and positions:
        ``max_requests_per_batch`` is the engine's batch size, ``max_seq_length`` its longest
        prompt plus output (default: the model's context), ``max_tokens_per_batch`` the most
        tokens one iteration feeds the model (default: no cap; the highest-priority job always
        runs); the ``model_specific_*_parallelism_degree`` may only be 1 (one device per engine:
        run more workers with ``flockctl up`` instead). ``spec_tree`` is the token-tree expansion
        (default: the device's, as ``--spec-tree auto``); ``attention`` is ``--attention``
        (``exact``: transformers' logits bit for bit)."""
        if self.engine is not None:
            raise RuntimeError("the engine is running; call stop_server() before compile()")
        for name, degree in (
            ("model_specific_data_parallelism_degree", model_specific_data_parallelism_degree),
            ("model_specific_tensor_parallelism_degree", model_specific_tensor_parallelism_degree),
            (
                "model_specific_pipeline_parallelism_degree",
                model_specific_pipeline_parallelism_degree,
            ),
        ):
            _one_device(name, degree)
        self.generation_config = generation_config or GenerationConfig()
        self.generation_config.params()  # refuse bad settings now, not at the first prompt
        self._config = EngineConfig(
            model=self.model,
            max_batch_size=max_requests_per_batch,
            max_model_len=max_seq_length,
            max_tokens_per_batch=max_tokens_per_batch,
            draft_models=tuple(s.model for s in ssms),
            spec_tree=tuple(spec_tree) if spec_tree else None,
            spec=spec if ssms else "off",
            scheduler=scheduler,
            kv_budget=kv_budget,
            attention=attention,
            device=self._device,
            dtype=self._dtype,
            threads=self._threads,
        )

    def start_server(self) -> None:
        """Load the model (and SSMs) and start the model loop; compiles with defaults if needed."""
        if self.engine is not None:
            return
        if self._config is None:
            self.compile()
        assert self._config is not None
        engine = load_engine(self._config, progress=False)
        if not isinstance(engine, Engine):
            engine.close()
            raise ValueError(
                f"{self.model} is an embedding model: LLM generates text; serve it with"
                " `flockctl engine serve` for /v1/embeddings"
            )
        self.engine = engine

    def stop_server(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def __enter__(self) -> LLM:
        self.start_server()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_server()

    # a str is also a Sequence[str]; this overload, listed first, is the one that applies to it
    @overload
    def generate(  # type: ignore[overload-overlap]
        self,
        prompts: str,
        max_new_tokens: int | None = None,
        generation_config: GenerationConfig | None = None,
        *,
        max_length: int | None = None,
    ) -> GenerationResult: ...

    @overload
    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int | None = None,
        generation_config: GenerationConfig | None = None,
        *,
        max_length: int | None = None,
    ) -> list[GenerationResult]: ...

    def generate(
        self,
        prompts: str | Sequence[str],
        max_new_tokens: int | None = None,
        generation_config: GenerationConfig | None = None,
        *,
        max_length: int | None = None,
    ) -> GenerationResult | list[GenerationResult]:
        """Complete one prompt (returns one result) or several together (a list, in order).

        ``max_length`` is FlexFlow Serve's bound: prompt and output together, in tokens (so each
        prompt gets ``max_length`` less its own length); ``max_new_tokens`` bounds the output
        alone. Give one of them, or neither for the generation config's ``max_new_tokens``."""
        if max_length is not None and max_new_tokens is not None:
            raise ValueError("give max_length (prompt + output) or max_new_tokens, not both")
        single = isinstance(prompts, str)
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        self.start_server()
        config = generation_config or self.generation_config
        engine = self.engine
        assert engine is not None
        encoded = [engine.tokenizer.encode(p) for p in texts]
        params = [config.params(_new_tokens(ids, max_new_tokens, max_length)) for ids in encoded]
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            results = asyncio.run(self._generate(texts, encoded, params))
        else:  # called from async code (a notebook): run on a thread of its own
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                results = pool.submit(asyncio.run, self._generate(texts, encoded, params)).result()
        return results[0] if single else results

    async def agenerate(
        self, prompts: Sequence[str], params: SamplingParams
    ) -> list[GenerationResult]:
        """``generate`` for async callers: every prompt is submitted at once."""
        engine = self.engine
        if engine is None:
            raise RuntimeError("call start_server() first")
        encoded = [engine.tokenizer.encode(p) for p in prompts]
        return await self._generate(prompts, encoded, [params] * len(prompts))

    async def _generate(
        self,
        prompts: Sequence[str],
        encoded: list[list[int]],
        params: Sequence[SamplingParams],
    ) -> list[GenerationResult]:
        engine = self.engine
        if engine is None:
            raise RuntimeError("call start_server() first")
        handles = [engine.submit(ids, p) for ids, p in zip(encoded, params, strict=True)]

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


def _new_tokens(
    prompt: list[int], max_new_tokens: int | None, max_length: int | None
) -> int | None:
    """The output bound of one prompt: FlexFlow's ``max_length`` counts the prompt too."""
    if max_length is None:
        return max_new_tokens
    room = max_length - len(prompt)
    if room < 1:
        raise InvalidRequest(
            f"max_length {max_length} leaves no room to generate after a prompt of"
            f" {len(prompt)} tokens (max_length counts the prompt and the output)",
            "max_length",
        )
    return room


def _one_device(name: str, degree: int | None) -> None:
    """A parallelism degree: a whole number; above 1 it is logged, as the model runs on one
    device (FlexFlow's own quick-start asks for 4, and must still run)."""
    if degree is None:
        return
    if not isinstance(degree, int) or isinstance(degree, bool) or degree < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, got {degree!r}")
    if degree > 1:
        log.warning(
            "%s=%d: a flockctl engine runs its model on one device; for more throughput run"
            " more workers (flockctl up --max-workers N)",
            name,
            degree,
        )


# FlexFlow Serve's runtime settings (``ff.init``) that mean something to a flockctl engine.
RUNTIME: dict[str, Any] = {}


def init(
    configs_dict: dict[str, Any] | None = None,
    *,
    num_gpus: int | None = None,
    memory_per_gpu: int | None = None,
    zero_copy_memory_per_node: int | None = None,
    num_cpus: int | None = None,
    legion_utility_processors: int | None = None,
    data_parallelism_degree: int | None = None,
    tensor_parallelism_degree: int | None = None,
    pipeline_parallelism_degree: int | None = None,
    offload: bool | None = None,
    offload_reserve_space_size: int | None = None,
    use_4bit_quantization: bool | None = None,
    use_8bit_quantization: bool | None = None,
    profiling: bool | None = None,
    inference_debugging: bool | None = None,
    fusion: bool | None = None,
) -> None:
    """FlexFlow Serve's ``ff.init``, so its scripts run unchanged: a dictionary or the same names.

    What applies to one flockctl process is taken: ``num_gpus=0`` serves on the CPU (otherwise
    the device is picked as ``--device auto`` does) and ``num_cpus`` is torch's thread count, for
    every :class:`LLM` made afterwards. Parallelism degrees above 1 are logged and the model runs
    on one device. What it cannot do is refused with a ``ValueError`` naming the setting:
    offloading, 4- and 8-bit quantization, an unknown name. Memory sizes, profiling, fusion and
    Legion's processors are accepted and change nothing: the engine sizes its KV cache from the
    device's free memory.
    """
    named = {k: v for k, v in locals().items() if k != "configs_dict" and v is not None}
    if configs_dict is not None and named:
        raise ValueError("pass either configs_dict or named settings, not both")
    settings = dict(configs_dict if configs_dict is not None else named)
    unknown = sorted(set(settings) - set(inspect.signature(init).parameters) - {"configs_dict"})
    if unknown:
        raise ValueError(f"unknown FlexFlow runtime setting {unknown[0]!r}")
    for name in (
        "data_parallelism_degree",
        "tensor_parallelism_degree",
        "pipeline_parallelism_degree",
    ):
        _one_device(name, settings.get(name))
    for name in ("offload", "use_4bit_quantization", "use_8bit_quantization"):
        if settings.get(name):
            raise ValueError(f"{name} is not supported by the flockctl engine")
    for name in ("num_gpus", "num_cpus"):
        value = settings.get(name)
        if value is not None and (
            not isinstance(value, int) or value < (0 if name == "num_gpus" else 1)
        ):
            raise ValueError(f"{name} must be a whole number of devices, got {value!r}")
    RUNTIME.clear()
    if settings.get("num_gpus") == 0:
        RUNTIME["device"] = "cpu"
    if settings.get("num_cpus") is not None:
        RUNTIME["threads"] = settings["num_cpus"]

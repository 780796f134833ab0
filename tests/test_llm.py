"""The Python API in FlexFlow Serve's shape: LLM, SSM, GenerationConfig on a tiny real model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from tinymodel import greedy_continuations
from transformers import AutoTokenizer

import flockctl.engine as engine_pkg
from flockctl.engine import LLM, SSM, GenerationConfig
from flockctl.engine.job import InvalidRequest

PROMPTS = ["the quick brown fox", "hello world how are you"]


def greedy_reference(path: Path, prompt: str, n: int) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    return greedy_continuations(path, [tokenizer.encode(prompt)], n)[0]


def test_llm_with_ssm_generates_the_greedy_continuation(tiny: Path) -> None:
    llm = LLM(str(tiny), device="cpu")
    ssm = SSM(str(tiny))
    config = GenerationConfig(do_sample=False, max_new_tokens=16, ignore_eos=True)
    ssm.compile(config)
    llm.compile(config, max_requests_per_batch=4, ssms=[ssm], spec="on", spec_tree=(2, 1, 1))
    with llm:
        one = llm.generate(PROMPTS[0])
        both = llm.generate(PROMPTS)
        stats = llm.engine.spec_stats() if llm.engine else None
    assert llm.engine is None  # stopped on leaving the block
    assert one.output_tokens == greedy_reference(tiny, PROMPTS[0], 16)
    assert [r.output_tokens for r in both] == [greedy_reference(tiny, p, 16) for p in PROMPTS]
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    assert one.output_text == tokenizer.decode(one.output_tokens)
    assert one.input_text == PROMPTS[0] and one.finish_reason == "length"
    assert one.speculation is not None and one.speculation["steps"] > 0
    assert stats is not None and stats["num_accepted_tokens"] > 0


def test_generate_starts_the_engine_and_takes_per_call_settings(tiny: Path) -> None:
    llm = LLM(str(tiny), device="cpu")
    try:
        sampled = GenerationConfig(do_sample=True, temperature=0.8, topp=0.9, seed=7)
        a = llm.generate(PROMPTS[1], max_new_tokens=5, generation_config=sampled)
        b = llm.generate(PROMPTS[1], max_new_tokens=5, generation_config=sampled)
        assert len(a.output_tokens) <= 5 and a.output_tokens == b.output_tokens  # seeded
        assert a.speculation is None  # no SSMs: no speculation
        with pytest.raises(RuntimeError, match="stop_server"):
            llm.compile(GenerationConfig())
    finally:
        llm.stop_server()


def test_generate_works_from_async_code(tiny: Path) -> None:
    llm = LLM(str(tiny), device="cpu")

    async def inside_a_loop() -> list[int]:
        return llm.generate(PROMPTS[0], max_new_tokens=4).output_tokens

    try:
        assert len(asyncio.run(inside_a_loop())) <= 4
    finally:
        llm.stop_server()


def test_bad_settings_are_refused_at_compile() -> None:
    llm = LLM("unused")
    with pytest.raises(InvalidRequest, match="top_p"):
        llm.compile(GenerationConfig(do_sample=True, topp=0.0))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        engine_pkg.Nope  # noqa: B018

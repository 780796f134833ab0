"""The Python API in FlexFlow Serve's shape: LLM, SSM, GenerationConfig on a tiny real model."""

from __future__ import annotations

import asyncio
import runpy
from pathlib import Path

import pytest
from tinymodel import build_tiny_bert, greedy_continuations
from transformers import AutoTokenizer

import flockctl.engine as engine_pkg
import flockctl.engine.llm as llm_module
from flockctl.engine import LLM, SSM, GenerationConfig
from flockctl.engine.job import InvalidRequest, Job, SamplingParams
from flockctl.engine.token_budget import within_budget

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
    with pytest.raises(ValueError, match="attention must be fast or exact"):
        llm.compile(attention="flash")
    llm.compile(attention="exact")
    assert llm._config is not None and llm._config.attention == "exact"
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        engine_pkg.Nope  # noqa: B018


# -- FlexFlow Serve's names ------------------------------------------------------------------

QUICKSTART = Path(__file__).parent.parent / "examples" / "flexflow_quickstart.py"


@pytest.fixture(autouse=True)
def fresh_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ff.init`` settles defaults for the process: each test starts without them."""
    monkeypatch.setattr(llm_module, "RUNTIME", {})


def test_flexflows_quickstart_runs_with_only_its_import_changed(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOCKCTL_LLM", str(tiny))
    monkeypatch.setenv("FLOCKCTL_SSM", str(tiny))
    script = runpy.run_path(str(QUICKSTART))
    llm, result = script["llm"], script["result"]
    assert llm.engine is None  # stop_server ran
    assert llm._config.max_batch_size == 16 and llm._config.max_model_len == 256
    assert llm._config.max_tokens_per_batch == 128
    assert llm._config.draft_models == (str(tiny),)
    prompt = "Here are some travel tips for Tokyo:\n"
    greedy = greedy_reference(tiny, prompt, len(result.output_tokens))
    assert result.output_tokens == greedy  # do_sample=False: greedy, speculating or not
    assert result.input_text == prompt and result.output_text


def test_generate_takes_flexflows_max_length_counting_the_prompt(tiny: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    lengths = [len(tokenizer.encode(p)) for p in PROMPTS]
    llm = LLM(str(tiny), device="cpu")
    llm.compile(GenerationConfig(do_sample=False, ignore_eos=True), 4, 64, 16)
    try:
        results = llm.generate(PROMPTS, max_length=12)
        assert [len(r.output_tokens) for r in results] == [12 - n for n in lengths]
        assert [r.output_tokens for r in results] == [
            greedy_reference(tiny, p, 12 - n) for p, n in zip(PROMPTS, lengths, strict=True)
        ]
        with pytest.raises(InvalidRequest, match="max_length") as refused:
            llm.generate(PROMPTS[1], max_length=lengths[1])
        assert refused.value.param == "max_length"
        with pytest.raises(ValueError, match="not both"):
            llm.generate(PROMPTS[0], 4, max_length=12)
    finally:
        llm.stop_server()


def test_a_token_budget_takes_jobs_in_order_while_their_tokens_fit() -> None:
    params = SamplingParams(max_tokens=4)
    long, short, other = Job([1] * 10, params), Job([2] * 3, params), Job([3] * 4, params)
    decoding = Job([4] * 6, params)
    decoding.cached_tokens = 6  # only its next token to feed
    assert within_budget([long, short, other], 8) == [long]  # the first runs whatever it costs
    assert within_budget([short, long, other, decoding], 8) == [short, other, decoding]
    assert within_budget([decoding, short, other], 4) == [decoding, short]


def test_flexflows_init_takes_what_applies_and_refuses_what_cannot_be_done(
    tiny: Path,
) -> None:
    ff_init = llm_module.init
    ff_init(num_gpus=0, memory_per_gpu=1000, zero_copy_memory_per_node=1000, num_cpus=1)
    llm = LLM(str(tiny))
    assert llm._device == "cpu" and llm._threads == 1
    ff_init({"num_gpus": 1, "memory_per_gpu": 1000, "zero_copy_memory_per_node": 1000})
    assert LLM(str(tiny))._device == "auto"
    for bad, match in (
        ({"use_4bit_quantization": True}, "use_4bit_quantization"),
        ({"offload": True}, "offload"),
        ({"num_gpu": 1}, "num_gpu"),
        ({"num_cpus": 0}, "num_cpus"),
    ):
        with pytest.raises(ValueError, match=match):
            ff_init(bad)
    with pytest.raises(ValueError, match="not both"):
        ff_init({"num_gpus": 1}, num_cpus=2)
    with pytest.raises(ValueError, match="tensor_parallelism_degree"):
        ff_init(tensor_parallelism_degree=0)


def test_an_embedding_model_is_refused_at_start_naming_what_to_use(
    tiny: Path, tmp_path: Path
) -> None:
    llm = LLM(str(build_tiny_bert(tiny, tmp_path / "bert")), device="cpu")
    with pytest.raises(ValueError, match=r"embedding model: .*flockctl engine serve"):
        llm.start_server()
    assert llm.engine is None

"""OpenAI's parameters on the engine, through the official ``openai`` client against a real engine
server on 127.0.0.1: prompt forms, ``n``, log-probabilities, ``echo`` scoring (checked against a
direct transformers forward pass), penalties, ``min_tokens``, ``stop_token_ids``, ``logit_bias``,
``seed``, ``user``, streamed and not; bad values are 400s naming the field, and the engine serves
on afterwards. Jobs whose params a speculative step cannot honour decode incrementally."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import TINY

from flockctl.engine.api import create_app
from flockctl.engine.config import EngineConfig
from flockctl.engine.engine import Engine
from flockctl.engine.loader import load_engine

PROMPT = "the quick brown fox"
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 8, "extra_body": {"ignore_eos": True}}


@pytest.fixture
async def oai(served: str) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
    yield client
    await client.close()


async def complete(oai: openai.AsyncOpenAI, **kw: Any) -> Any:
    return await oai.completions.create(model=TINY, **kw)


async def streamed_completion(oai: openai.AsyncOpenAI, **kw: Any) -> list[Any]:
    stream = await oai.completions.create(model=TINY, stream=True, **kw)
    return [chunk async for chunk in stream]


def texts_by_index(chunks: list[Any]) -> dict[int, str]:
    out: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            out[choice.index] = out.get(choice.index, "") + choice.text
    return out


# -- prompts and choices ------------------------------------------------------------------------


async def test_every_prompt_form_gives_one_choice_per_prompt_in_order(
    oai: openai.AsyncOpenAI, engine: Engine
) -> None:
    prompts = [PROMPT, "hello world", "memory holds keys"]
    singles = [(await complete(oai, prompt=p, **GREEDY)).choices[0].text for p in prompts]
    assert len(set(singles)) == 3  # the prompts lead to different text
    ids = [engine.tokenizer.encode(p) for p in prompts]
    for form in (prompts, ids):
        batch = await complete(oai, prompt=form, **GREEDY)
        assert [c.index for c in batch.choices] == [0, 1, 2]
        assert [c.text for c in batch.choices] == singles
        assert batch.usage.prompt_tokens == sum(len(i) for i in ids)
        assert batch.usage.completion_tokens == 3 * 8
    one = await complete(oai, prompt=ids[0], **GREEDY)
    assert one.choices[0].text == singles[0]
    streamed = texts_by_index(await streamed_completion(oai, prompt=prompts, **GREEDY))
    assert streamed == dict(enumerate(singles))


async def test_n_choices_are_indexed_differ_and_reproduce_with_a_seed(
    oai: openai.AsyncOpenAI,
) -> None:
    sampled = {"max_tokens": 12, "temperature": 1.0, "seed": 11, "extra_body": {"ignore_eos": True}}
    first = await complete(oai, prompt=PROMPT, n=4, **sampled)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    texts = [c.text for c in first.choices]
    assert len(set(texts)) > 1  # siblings draw from their own seeds
    again = await complete(oai, prompt=PROMPT, n=4, **sampled)
    assert [c.text for c in again.choices] == texts
    # choice 0 is what the seed gives alone
    alone = await complete(oai, prompt=PROMPT, **sampled)
    assert alone.choices[0].text == texts[0]
    chunks = await streamed_completion(oai, prompt=PROMPT, n=4, **sampled)
    assert texts_by_index(chunks) == dict(enumerate(texts))
    assert len({c.id for c in chunks}) == 1
    # a batch of prompts times n: index is prompt * n + choice
    batch = await complete(oai, prompt=[PROMPT, "hello"], n=2, **sampled)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices[:2]] == texts[:2]


async def test_chat_n_streams_each_choice_under_its_index(oai: openai.AsyncOpenAI) -> None:
    messages = [{"role": "user", "content": "hello"}]
    kw: dict[str, Any] = {"model": TINY, "messages": messages, "n": 3, "max_tokens": 6}
    kw |= {"seed": 5, "extra_body": {"ignore_eos": True}}
    plain = await oai.chat.completions.create(**kw)
    assert [c.index for c in plain.choices] == [0, 1, 2]
    assert plain.usage.completion_tokens == 18
    stream = await oai.chat.completions.create(stream=True, **kw)
    got: dict[int, str] = {}
    async for chunk in stream:
        for choice in chunk.choices:
            got[choice.index] = got.get(choice.index, "") + (choice.delta.content or "")
    assert got == {c.index: c.message.content for c in plain.choices}


# -- log-probabilities and echo -----------------------------------------------------------------


async def test_completion_logprobs_in_openais_shape_streamed_and_not(
    oai: openai.AsyncOpenAI,
) -> None:
    r = await complete(oai, prompt=PROMPT, logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    whole = [t for t in lp.tokens if not t.startswith("bytes:")]  # a part of a character
    assert "".join(whole) == r.choices[0].text.replace("\ufffd", "")
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i] if t in whole) for i in range(8)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0
        assert 3 <= len(top) <= 4 and top[token] == logprob
        assert logprob == pytest.approx(max(top.values()))  # greedy takes the most likely
    chunks = await streamed_completion(oai, prompt=PROMPT, logprobs=3, **GREEDY)
    streamed = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens]
    assert streamed == lp.tokens
    values = [
        v for c in chunks for ch in c.choices if ch.logprobs for v in ch.logprobs.token_logprobs
    ]
    assert values == pytest.approx(lp.token_logprobs, abs=1e-5)


async def test_logprobs_are_the_models_before_temperature(oai: openai.AsyncOpenAI) -> None:
    greedy = await complete(oai, prompt=PROMPT, logprobs=0, **GREEDY)
    tokens = greedy.choices[0].logprobs.token_logprobs
    # the same first token scored at another temperature: the log-prob does not move
    hot = {"temperature": 1.7, "max_tokens": 1, "seed": 3, "logprobs": 5}
    for _ in range(3):
        r = await complete(oai, prompt=PROMPT, **hot)
        top = r.choices[0].logprobs.top_logprobs[0]
        first = greedy.choices[0].logprobs.tokens[0]
        if first in top:
            assert top[first] == pytest.approx(tokens[0], abs=1e-5)
            return
    raise AssertionError("the greedy token was never among the top 5")


async def test_chat_logprobs_in_openais_shape(oai: openai.AsyncOpenAI) -> None:
    messages = [{"role": "user", "content": "hello"}]
    kw: dict[str, Any] = {"model": TINY, "messages": messages, "temperature": 0, "max_tokens": 6}
    kw["extra_body"] = {"ignore_eos": True}
    r = await oai.chat.completions.create(logprobs=True, top_logprobs=2, **kw)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    raw = bytes(b for c in content for b in c.bytes)
    assert raw.decode(errors="replace") == r.choices[0].message.content
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)
        if not item.token.startswith("bytes:"):
            assert item.bytes == list(item.token.encode())
    without = await oai.chat.completions.create(**kw)
    assert without.choices[0].logprobs is None
    stream = await oai.chat.completions.create(logprobs=True, top_logprobs=2, stream=True, **kw)
    streamed = []
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.logprobs:
                streamed += [c.token for c in choice.logprobs.content]
    assert streamed == [c.token for c in content]


def transformers_logprobs(model_path: Path, ids: list[int]) -> list[float]:
    """Each token's log-probability after the ones before it, by transformers on its own."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]


async def test_echo_scores_the_prompt_as_transformers_does(
    oai: openai.AsyncOpenAI, engine: Engine, tiny: Path
) -> None:
    text = "the scheduler picks jobs from queues that never starve"
    ids = engine.tokenizer.encode(text)
    expected = transformers_logprobs(tiny, ids)
    r = await complete(oai, prompt=text, echo=True, max_tokens=0, logprobs=1)
    [choice] = r.choices
    assert choice.text == text
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids)
    assert "".join(lp.tokens) == text  # an English prompt: every token is whole characters
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=2e-3)
    # scores of a batch of prompts, streamed, agree with the plain answer
    chunks = await streamed_completion(
        oai, prompt=[text, text], echo=True, max_tokens=0, logprobs=1
    )
    for index in (0, 1):
        values = [
            v
            for c in chunks
            for ch in c.choices
            if ch.index == index and ch.logprobs
            for v in ch.logprobs.token_logprobs
        ]
        assert values[0] is None and values[1:] == pytest.approx(expected, abs=2e-3)
    # echo with generation: the prompt, then the new text, with log-probs for both
    both = await complete(oai, prompt=text, echo=True, logprobs=0, **GREEDY)
    alone = await complete(oai, prompt=text, **GREEDY)
    assert both.choices[0].text == text + alone.choices[0].text
    assert len(both.choices[0].logprobs.tokens) == len(ids) + 8


# -- what changes the logits ----------------------------------------------------------------------


async def test_logit_bias_min_tokens_and_stop_token_ids(
    oai: openai.AsyncOpenAI, engine: Engine
) -> None:
    first = engine.tokenizer.encode("fox")[0]
    biased = await complete(oai, prompt=PROMPT, logit_bias={str(first): 100}, **GREEDY)
    assert engine.tokenizer.encode(biased.choices[0].text) == [first] * 8

    plain = await complete(oai, prompt=PROMPT, logprobs=0, **GREEDY)
    t0 = engine.tokenizer.convert_tokens_to_ids(
        engine.tokenizer.convert_ids_to_tokens(engine.tokenizer.encode(plain.choices[0].text)[0])
    )
    stop = {"temperature": 0, "max_tokens": 8}
    stopped = await complete(oai, prompt=PROMPT, extra_body={"stop_token_ids": [t0]}, **stop)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == "" and stopped.usage.completion_tokens == 1
    held = await complete(
        oai, prompt=PROMPT, extra_body={"stop_token_ids": [t0], "min_tokens": 3}, **stop
    )
    assert held.usage.completion_tokens >= 3
    assert engine.tokenizer.encode(held.choices[0].text)[0] != t0


async def test_penalties_change_greedy_text_and_are_in_the_job(oai: openai.AsyncOpenAI) -> None:
    base = {"prompt": PROMPT, "temperature": 0, "max_tokens": 24}
    base["extra_body"] = {"ignore_eos": True}
    plain = (await complete(oai, **base)).choices[0].text
    for penalty in (
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0},
        {"extra_body": {"ignore_eos": True, "repetition_penalty": 2.0}},
    ):
        r = await complete(oai, **{**base, **penalty})
        assert r.choices[0].text != plain, penalty
    r = await complete(oai, **base, frequency_penalty=1.5, user="alice")
    async with httpx.AsyncClient(base_url=str(oai.base_url).removesuffix("/v1/")) as http:
        job = (await http.get(f"/jobs/{r.id}")).json()
    assert job["user"] == "alice"
    assert job["params"]["frequency_penalty"] == 1.5


async def test_max_completion_tokens_and_user_on_completions(oai: openai.AsyncOpenAI) -> None:
    r = await complete(
        oai,
        prompt=PROMPT,
        temperature=0,
        max_tokens=9,
        extra_body={"max_completion_tokens": 3, "ignore_eos": True},
    )
    assert r.usage.completion_tokens == 3


async def test_a_seed_reproduces_text_whatever_runs_beside_it(oai: openai.AsyncOpenAI) -> None:
    sampled = {"max_tokens": 16, "temperature": 1.0, "top_p": 0.95, "seed": 1234}
    sampled["extra_body"] = {"ignore_eos": True}
    alone = (await complete(oai, prompt=PROMPT, **sampled)).choices[0].text
    noise = {"max_tokens": 16, "temperature": 1.0, "extra_body": {"ignore_eos": True}}
    for others in (1, 3, 6):
        crowd = [complete(oai, prompt=f"hello world {i}", **noise) for i in range(others)]
        results = await asyncio.gather(complete(oai, prompt=PROMPT, **sampled), *crowd)
        assert results[0].choices[0].text == alone


# -- refusals -------------------------------------------------------------------------------------

BAD: list[tuple[dict[str, Any], str]] = [
    ({"n": 17}, "n"),
    ({"logprobs": 21}, "logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"extra_body": {"repetition_penalty": -1}}, "repetition_penalty"),
    ({"logit_bias": {"x": 3}}, "logit_bias"),
    ({"extra_body": {"min_tokens": 40}}, "min_tokens"),
    ({"extra_body": {"stop_token_ids": [10**6]}}, "stop_token_ids"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"suffix": "!"}, "suffix"),
    ({"best_of": 4}, "best_of"),
]


@pytest.mark.parametrize(("extra", "param"), BAD, ids=[p for _, p in BAD])
async def test_bad_values_are_400s_naming_the_field_and_serving_goes_on(
    oai: openai.AsyncOpenAI, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await complete(oai, prompt=PROMPT, **extra)
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == param, error
    assert param.split("[")[0] in error["message"] or error["message"]
    r = await complete(oai, prompt=PROMPT, **GREEDY)
    assert r.usage.completion_tokens == 8


async def test_chat_top_logprobs_needs_logprobs(oai: openai.AsyncOpenAI) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as caught:
        await oai.chat.completions.create(model=TINY, messages=messages, top_logprobs=3)
    assert caught.value.body["param"] == "top_logprobs"  # type: ignore[index]


# -- speculation falls back where it cannot honour a request -------------------------------------


@pytest.fixture(scope="module")
def speculating(tiny: Path) -> Iterator[Engine]:
    """The tiny model drafting for itself, speculating on every step it can."""
    config = EngineConfig(
        model=str(tiny), device="cpu", served_model_name=TINY, draft_models=(str(tiny),), spec="on"
    )
    engine = load_engine(config, progress=False)
    try:
        yield engine
    finally:
        engine.close()


@pytest.mark.parametrize(
    "extra",
    [
        {"frequency_penalty": 1.0},
        {"logprobs": 2},
        {"extra_body": {"repetition_penalty": 1.3, "ignore_eos": True}},
        {"logit_bias": {"7": 5}},
    ],
    ids=["frequency", "logprobs", "repetition", "logit_bias"],
)
async def test_what_speculation_cannot_honour_decodes_incrementally(
    speculating: Engine, oai: openai.AsyncOpenAI, extra: dict[str, Any]
) -> None:
    transport = httpx.ASGITransport(app=create_app(speculating))
    async with httpx.AsyncClient(transport=transport, base_url="http://engine/v1") as http:
        client = openai.AsyncOpenAI(
            base_url="http://engine/v1", api_key="unused", http_client=http, max_retries=0
        )
        body: dict[str, Any] = {"prompt": PROMPT, "temperature": 0, "max_tokens": 12}
        body["extra_body"] = {"ignore_eos": True}
        spec_plain = await client.completions.create(model=TINY, **body)
        spec_job = speculating.job_info(spec_plain.id.removeprefix("cmpl-"))
        assert spec_job is not None and spec_job["speculation"]["steps"] > 0
        r = await client.completions.create(model=TINY, **{**body, **extra})
        job = speculating.job_info(r.id.removeprefix("cmpl-"))
        assert job is not None and job["speculation"]["steps"] == 0
    reference = await complete(oai, **{**body, **extra})  # the engine without drafts
    assert r.choices[0].text == reference.choices[0].text
    if "logprobs" in extra:
        assert r.choices[0].logprobs.token_logprobs == pytest.approx(
            reference.choices[0].logprobs.token_logprobs, abs=1e-4
        )

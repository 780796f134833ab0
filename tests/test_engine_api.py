"""The engine's HTTP API on a tiny real model: OpenAI, TGI and FastServe bodies, SSE framing,
errors in OpenAI's shape, jobs cancelled when their client hangs up, and ``flockctl engine``.

Routes are driven in-process through httpx's ASGITransport; what needs a real connection
(a client that disconnects, the serve command) runs on 127.0.0.1 with a free port.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import TINY, before_forwards, error_of, free_port, free_socket, until, until_sync
from tinymodel import build_tiny_model

from flockctl.engine.api import create_app
from flockctl.engine.config import EngineConfig
from flockctl.engine.engine import Engine, QueueFull
from flockctl.engine.handle import JobHandle
from flockctl.engine.job import INSTANCE, Job, JobState, SamplingParams
from flockctl.engine.loader import load_engine
from flockctl.exitcodes import ExitCode

NAME = TINY
PROMPT = "the quick brown fox"
GREEDY = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}


def sse(response: httpx.Response) -> list[str]:
    """The ``data:`` payloads of an event stream, checking its framing on the way."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    body = response.text
    assert body.endswith("\n\n"), body[-200:]
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e.removeprefix("data: ") for e in events]


async def finished_job(client: httpx.AsyncClient, job_id: str) -> dict:
    async def finished() -> dict | None:
        r = await client.get(f"/jobs/{job_id}")
        return r.json() if r.status_code == 200 and r.json()["state"] == "finished" else None

    return await until(finished, f"job {job_id} to finish")


# -- OpenAI --------------------------------------------------------------------------------------


async def test_models_and_health_name_the_served_model(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    [entry] = models["data"]
    assert entry["id"] == NAME
    assert entry["object"] == "model"
    assert entry["owned_by"] == "flockctl"
    assert entry["max_model_len"] == engine.max_model_len == 256
    assert isinstance(entry["created"], int)
    health = await client.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "model": NAME, "instance": INSTANCE}


async def test_completion_answers_in_openais_shape_with_usage(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    r = await client.post("/v1/completions", json={"model": NAME, "prompt": PROMPT, **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert re.fullmatch(f"cmpl-{INSTANCE}[A-Za-z0-9]{{16}}", body["id"]), body["id"]
    assert body["object"] == "text_completion"
    assert body["model"] == NAME
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"] is None
    assert choice["text"]
    prompt_tokens = len(engine.tokenizer.encode(PROMPT))
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 12,
        "total_tokens": prompt_tokens + 12,
    }


async def test_a_prompt_may_be_a_string_a_list_of_one_or_token_ids(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    ids = engine.tokenizer.encode(PROMPT)
    texts = []
    for prompt in (PROMPT, [PROMPT], ids, [ids]):
        r = await client.post("/v1/completions", json={"prompt": prompt, **GREEDY})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(ids)
        texts.append(r.json()["choices"][0]["text"])
    assert len(set(texts)) == 1


@pytest.mark.parametrize(
    "sampling",
    [GREEDY, {"temperature": 1.0, "top_k": 50, "seed": 7, "max_tokens": 20, "ignore_eos": True}],
    ids=["greedy", "seeded"],
)
async def test_streamed_completion_concatenates_to_the_plain_one(
    client: httpx.AsyncClient, sampling: dict[str, Any]
) -> None:
    plain = (await client.post("/v1/completions", json={"prompt": PROMPT, **sampling})).json()
    body = {"prompt": PROMPT, "stream": True, "stream_options": {"include_usage": True}}
    events = sse(await client.post("/v1/completions", json={**body, **sampling}))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    *pieces, usage = chunks
    assert all(c["object"] == "text_completion" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["usage"] is None for c in pieces)
    reasons = [c["choices"][0]["finish_reason"] for c in pieces]
    assert reasons[-1] == "length"
    assert all(r is None for r in reasons[:-1])
    assert "".join(c["choices"][0]["text"] for c in pieces) == plain["choices"][0]["text"]
    assert usage["choices"] == []
    assert usage["usage"] == plain["usage"]


async def test_a_stream_without_include_usage_has_no_usage(client: httpx.AsyncClient) -> None:
    events = sse(await client.post("/v1/completions", json={"prompt": PROMPT, "stream": True}))
    assert events[-1] == "[DONE]"
    assert all("usage" not in json.loads(e) for e in events[:-1])


async def test_stop_strings_end_the_text_before_them(client: httpx.AsyncClient) -> None:
    base = {"prompt": PROMPT, **GREEDY, "max_tokens": 24}
    text = (await client.post("/v1/completions", json=base)).json()["choices"][0]["text"]
    stop = text[6:9]
    assert stop.strip(), f"pick another slice of {text!r}"
    for given in (stop, [stop, "never appears"]):
        r = (await client.post("/v1/completions", json={**base, "stop": given})).json()
        assert r["choices"][0]["finish_reason"] == "stop"
        assert r["choices"][0]["text"] == text[: text.index(stop)]


async def test_chat_completion_and_its_stream_agree(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]},  # noqa: E501
    ]  # fmt: skip
    request = {"model": NAME, "messages": messages, **GREEDY}
    r = await client.post("/v1/chat/completions", json=request)
    assert r.status_code == 200, r.text
    body = r.json()
    assert re.fullmatch(f"chatcmpl-{INSTANCE}[A-Za-z0-9]{{16}}", body["id"]), body["id"]
    assert body["object"] == "chat.completion"
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "length"
    flat = [messages[0], {"role": "user", "content": "hello world"}]
    ids = engine.tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["usage"]["completion_tokens"] == 12

    events = sse(await client.post("/v1/chat/completions", json={**request, "stream": True}))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == choice["message"]["content"]


async def test_max_completion_tokens_wins_over_max_tokens(client: httpx.AsyncClient) -> None:
    messages = [{"role": "user", "content": "hi"}]
    request = {
        "messages": messages,
        "max_tokens": 3,
        "max_completion_tokens": 5,
        "ignore_eos": True,
    }
    r = await client.post("/v1/chat/completions", json=request)
    assert r.json()["usage"]["completion_tokens"] == 5


async def test_chat_without_a_template_is_refused(
    client: httpx.AsyncClient, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine.tokenizer, "chat_template", None)
    body = {"messages": [{"role": "user", "content": "hi"}]}
    error = error_of(await client.post("/v1/chat/completions", json=body), 400)
    assert "no chat template" in error["message"]
    assert error["param"] == "messages"


async def test_a_template_that_refuses_the_messages_is_a_400(
    client: httpx.AsyncClient, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    template = "{{ raise_exception('roles must alternate') }}"
    monkeypatch.setattr(engine.tokenizer, "chat_template", template)
    body = {"messages": [{"role": "user", "content": "hi"}]}
    error = error_of(await client.post("/v1/chat/completions", json=body), 400)
    assert "roles must alternate" in error["message"]
    assert error["param"] == "messages"


# -- TGI and FastServe ---------------------------------------------------------------------------

FIGURES = {
    "generated_text", "job_id", "total_tokens", "completion_time", "queue_time",
    "execution_time", "preemption_count", "finish_reason", "prompt_tokens", "generated_tokens",
}  # fmt: skip


async def test_generate_takes_tgis_body_greedy_by_default(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    tgi = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "details": True}}
    r = await client.post("/generate", json=tgi)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == FIGURES | {"details"}
    assert body["prompt_tokens"] == len(engine.tokenizer.encode(PROMPT))
    assert body["total_tokens"] == body["prompt_tokens"] + body["generated_tokens"]
    assert body["details"]["generated_tokens"] == body["generated_tokens"]
    assert body["details"]["finish_reason"] in ("length", "eos_token")
    for key in ("completion_time", "queue_time", "execution_time"):
        assert body[key] >= 0
    assert body["completion_time"] >= body["queue_time"]
    greedy = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    openai = (await client.post("/v1/completions", json=greedy)).json()
    assert body["generated_text"] == openai["choices"][0]["text"]

    full = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "return_full_text": True}}
    again = (await client.post("/generate", json=full)).json()
    assert again["generated_text"] == PROMPT + body["generated_text"]


async def test_generate_takes_fastserves_body(client: httpx.AsyncClient) -> None:
    fastserve = {"prompt": PROMPT, "max_new_tokens": 10, "seed": 3, "ignore_eos": True}
    first = (await client.post("/generate", json=fastserve)).json()
    assert set(first) == FIGURES
    assert first["generated_tokens"] == 10
    assert first["finish_reason"] == "length"
    assert first["preemption_count"] == 0
    second = (await client.post("/generate", json=fastserve)).json()
    assert second["generated_text"] == first["generated_text"]
    assert second["job_id"] != first["job_id"]


@pytest.mark.parametrize("path", ["/generate_stream", "/generate/stream"])
async def test_generate_stream_sends_tgi_token_events(client: httpx.AsyncClient, path: str) -> None:
    tgi = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8}}
    plain = (await client.post("/generate", json=tgi)).json()
    events = [json.loads(e) for e in sse(await client.post(path, json=tgi))]
    assert all("token" in e for e in events)  # no [DONE]: TGI sends none
    *pieces, last = events
    assert all(e["generated_text"] is None and e["details"] is None for e in pieces)
    assert all(isinstance(e["token"]["id"], int) for e in events)
    assert all(e["token"]["special"] is False for e in pieces)
    assert "".join(e["token"]["text"] for e in events) == plain["generated_text"]
    assert last["generated_text"] == plain["generated_text"]
    assert set(last) >= FIGURES
    assert last["generated_tokens"] == plain["generated_tokens"]


# -- state ---------------------------------------------------------------------------------------


async def test_jobs_answer_for_both_id_forms(client: httpx.AsyncClient) -> None:
    r = (await client.post("/v1/completions", json={"prompt": PROMPT, **GREEDY})).json()
    job_id = r["id"].removeprefix("cmpl-")
    for asked in (r["id"], job_id):
        info = (await client.get(f"/jobs/{asked}")).json()
        assert info["id"] == job_id
        assert info["state"] == "finished"
        assert info["finish_reason"] == "length"
        assert info["generated_tokens"] == 12
        assert info["preemptions_by_kind"] == {"descheduled": 0, "swapped": 0, "recomputed": 0}
    error = error_of(await client.get(f"/jobs/cmpl-{INSTANCE}0000000000000000"), 404)
    assert error["code"] == "job_not_found"
    assert f"cmpl-{INSTANCE}0000000000000000" in error["message"]


async def test_stats_are_the_engines(client: httpx.AsyncClient, engine: Engine) -> None:
    stats = (await client.get("/stats")).json()
    for key in ("model", "scheduler", "device", "queue_lengths", "running", "waiting", "swapped"):
        assert key in stats
    assert stats["model"] == NAME
    assert set(stats["preemptions_total"]) == {"descheduled", "swapped", "recomputed"}
    assert {"budget_tokens", "used_tokens", "host_tokens"} <= set(stats["kv"])
    assert isinstance(stats["jobs"], list)
    detailed = (await client.get("/stats/detailed")).json()
    assert set(stats) < set(detailed)
    assert set(detailed) == {*engine.stats(detailed=True), "instance"}
    assert stats["instance"] == detailed["instance"] == INSTANCE


async def test_stats_leave_out_a_job_that_ends_while_they_are_read(engine: Engine) -> None:
    # The model loop's thread marks a job finished before it leaves the live table: a snapshot
    # taken between the two must not list it (or count it) as live.
    loop = asyncio.get_running_loop()
    ending = Job([1, 2, 3], SamplingParams(max_tokens=4), state=JobState.FINISHED)
    waiting = Job([1, 2, 3, 4], SamplingParams(max_tokens=4))
    live = engine.model_loop.live
    live[ending.id] = JobHandle(ending, loop, lambda _: None)
    live[waiting.id] = JobHandle(waiting, loop, lambda _: None)
    try:
        for detailed in (False, True):
            stats = engine.stats(detailed=detailed)
            assert [j["id"] for j in stats["jobs"]] == [waiting.id]
            assert (stats["running"], stats["waiting"]) == (0, 1)
    finally:
        live.pop(ending.id)
        live.pop(waiting.id)


async def test_metrics_expose_vllm_style_names(client: httpx.AsyncClient) -> None:
    await client.post("/v1/completions", json={"prompt": PROMPT, **GREEDY})
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        "flockctl_num_requests_running",
        "flockctl_num_requests_waiting",
        "flockctl_num_requests_swapped",
        'flockctl_queue_length{level="0"}',
        "flockctl_kv_cache_usage_perc",
        "flockctl_device_memory_used_bytes",
        'flockctl_num_preemptions_total{kind="swapped"}',
        'flockctl_request_success_total{finished_reason="length"}',
        "flockctl_prompt_tokens_total",
        "flockctl_generation_tokens_total",
        "flockctl_time_to_first_token_seconds_bucket",
        "flockctl_e2e_request_latency_seconds_count",
        "flockctl_request_queue_time_seconds_sum",
    ):
        assert name in text, name
    line = next(x for x in text.splitlines() if x.startswith("flockctl_generation_tokens_total"))
    assert float(line.split()[-1]) >= 12


# -- bad input -----------------------------------------------------------------------------------

LONG = "the quick brown fox jumps over lazy dogs " * 60  # far beyond 256 tokens

BAD = [
    # route, body, status, param
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": 123}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["one", ""]}, 400, "prompt[1]"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [3, 99999]]}, 400, "prompt[1]"),
    ("/v1/completions", {"prompt": ["a"] * 65}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[["deep"]]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": LONG}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 255}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "4"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_k": -5}, 400, "top_k"),
    ("/v1/completions", {"prompt": "hi", "stop": ["ok", 3]}, 400, "stop[1]"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "hi", "n": 17}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": ["a"] * 5, "n": 16}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": "hi", "suffix": "!"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "hi", "echo": "yes"}, 400, "echo"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"1": 101}}, 400, "logit_bias.1"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 9, "max_tokens": 4}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [-1]}, 400, "stop_token_ids[0]"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [99999]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "user": 7}, 400, "user"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),  # noqa: E501
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs"),  # noqa: E501
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 17}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages[0].content",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
        400,
        "max_completion_tokens",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "x"}, 404, "model"),  # noqa: E501
    ("/generate", {"parameters": {"max_new_tokens": 4}}, 400, "inputs"),
    ("/generate", {"inputs": "hi", "prompt": "hi"}, 400, "prompt"),
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 0}}, 400, "parameters.max_new_tokens"),  # noqa: E501
    ("/generate", {"inputs": "hi", "parameters": {"top_p": 2.0}}, 400, "parameters.top_p"),
    ("/generate", {"inputs": "hi", "parameters": {"repetition_penalty": 1.2}}, 400, "parameters.repetition_penalty"),  # noqa: E501
    ("/generate", {"inputs": LONG}, 400, "inputs"),
    ("/generate", {"prompt": "hi", "max_new_tokens": 0}, 400, "max_new_tokens"),
    ("/generate_stream", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
]  # fmt: skip


@pytest.mark.parametrize(("route", "body", "status", "param"), BAD)
async def test_bad_input_is_refused_naming_the_field(
    client: httpx.AsyncClient, route: str, body: dict[str, Any], status: int, param: str
) -> None:
    error = error_of(await client.post(route, json=body), status)
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    if status == 404:
        assert error["code"] == "model_not_found"
        assert repr(body["model"]) in error["message"] and repr(NAME) in error["message"]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b'{"prompt": "hi",', "not valid JSON"),
        (b"", "no body"),
        (b'["hi"]', "JSON object"),
        (b"\xff\xfe", "not valid JSON"),
    ],
    ids=["truncated", "empty", "array", "not-utf8"],
)
async def test_a_body_that_is_not_a_json_object_is_a_400(
    client: httpx.AsyncClient, content: bytes, says: str
) -> None:
    headers = {"content-type": "application/json"}
    r = await client.post("/v1/completions", content=content, headers=headers)
    error = error_of(r, 400)
    assert says in error["message"]
    assert error["param"] is None


async def test_a_body_that_is_not_json_by_content_type_is_a_415(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post(
        "/generate", content=b'{"inputs": "hi"}', headers={"content-type": "text/plain"}
    )
    assert "application/json" in error_of(r, 415)["message"]
    r = await client.post(
        "/generate", content=b'{"inputs": "hi", "parameters": {"max_new_tokens": 2}}'
    )
    assert r.status_code == 200, r.text  # no content-type at all is fine


async def test_unknown_routes_answer_in_the_same_shape(client: httpx.AsyncClient) -> None:
    assert error_of(await client.get("/v2/nothing"), 404)["code"] == "not_found"
    assert error_of(await client.get("/v1/completions"), 405)["code"] == "method_not_allowed"


async def test_a_full_queue_is_a_429(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = EngineConfig(
        model=str(tiny), served_model_name=NAME, device="cpu", max_batch_size=1, max_waiting=1
    )
    engine = load_engine(config, progress=False)
    long = SamplingParams(max_tokens=250, temperature=0, ignore_eos=True)
    blockers = []
    # the running job stays at its first decode step until the test is done, however fast
    done = threading.Event()
    before_forwards(engine, lambda jobs: done.wait(30) if jobs[0].output_ids else None, monkeypatch)
    try:
        prompt = engine.tokenizer.encode(PROMPT)
        blockers.append(engine.submit(prompt, long))
        await until(lambda: engine.stats()["running"] == 1, "the first job running")
        blockers.append(engine.submit(prompt, long))  # one running, one waiting: full
        with pytest.raises(QueueFull):
            engine.submit(prompt, long)
        transport = httpx.ASGITransport(app=create_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:
            for route, body in (
                ("/v1/completions", {"prompt": "hi"}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                ("/generate", {"inputs": "hi"}),
            ):
                r = await client.post(route, json=body)
                error = error_of(r, 429)
                assert error["code"] == "queue_full"
                assert "--max-waiting 1" in error["message"]
                assert r.headers["retry-after"] == "1"
    finally:
        done.set()
        for handle in blockers:
            handle.cancel()
        engine.close()


# -- clients that hang up ------------------------------------------------------------------------

LONG_JOB = {"prompt": "hi", "max_tokens": 250, "ignore_eos": True, "temperature": 0}


def hold_until_cancelled(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hold the model loop before a job's second decode call until something reaches its inbox
    (the cancel of a client that hung up): by then the job's first tokens went out and it has
    made at most one run of decode steps, however fast the model (250 tokens in runs of up to
    16 steps can be done before a client closes its connection)."""
    loop = engine.model_loop

    def held(jobs: list[Job]) -> None:
        if any(len(j.output_ids) > 1 for j in jobs):
            until_sync(lambda: loop._inbox, "the cancel of a client that hung up")

    before_forwards(engine, held, monkeypatch)


async def test_a_streaming_client_that_hangs_up_cancels_its_job(
    served: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    hold_until_cancelled(engine, monkeypatch)
    async with httpx.AsyncClient(base_url=served, timeout=30) as c:
        body = {**LONG_JOB, "stream": True}
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            first = await anext(r.aiter_lines())
        job_id = json.loads(first.removeprefix("data: "))["id"]
        info = await finished_job(c, job_id)
    assert info["finish_reason"] == "abort"
    assert info["generated_tokens"] < LONG_JOB["max_tokens"]


async def test_a_waiting_client_that_hangs_up_cancels_its_job(
    served: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    hold_until_cancelled(engine, monkeypatch)
    port = int(served.rsplit(":", 1)[1])
    payload = json.dumps(LONG_JOB).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nhost: engine\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    await writer.drain()
    async with httpx.AsyncClient(base_url=served, timeout=30) as c:

        async def listed() -> list[dict]:
            return (await c.get("/stats")).json()["jobs"]

        jobs = await until(listed, "the request's job")
        writer.close()
        await writer.wait_closed()
        info = await finished_job(c, jobs[0]["id"])
    assert info["finish_reason"] == "abort"
    assert info["generated_tokens"] < LONG_JOB["max_tokens"]
    assert await reader.read() == b""  # nothing was sent back


# -- flockctl engine -----------------------------------------------------------------------------


def engine_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flockctl.engine.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_once_loaded_the_engine_freezes_what_loading_built_and_collects_again() -> None:
    from flockctl.engine.cli import settle_heap

    built = [[] for _ in range(1000)]  # long-lived objects, as loading makes
    gc.disable()  # as serve does while it loads
    try:
        settle_heap()
        assert gc.isenabled()
        assert gc.get_freeze_count() >= len(built)
    finally:
        gc.unfreeze()
        gc.enable()


@pytest.mark.e2e
def test_the_engine_cli_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, flockctl.engine.cli; "
        "print(','.join(m for m in ('torch', 'transformers', 'textual') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.e2e
def test_serve_help_explains_every_flag() -> None:
    r = engine_cli("serve", "--help")
    assert r.returncode == 0
    for flag in ("--model", "--served-model-name", "--device", "--dtype", "--host", "--port",
                 "--scheduler", "--max-batch-size", "--kv-budget", "--max-model-len",
                 "--max-waiting", "--seed", "--log-level", "--draft-model", "--spec-tree",
                 "--spec", "Example"):  # fmt: skip
        assert flag in r.stdout, flag
    commands = engine_cli("--help")
    assert commands.returncode == 0
    assert "serve" in commands.stdout and "demo" in commands.stdout


@pytest.mark.e2e
@pytest.mark.parametrize(
    "flags",
    [
        ["--device", "gpu"],
        ["--scheduler", "lifo"],
        ["--dtype", "int8"],
        ["--port", "-1"],
        ["--spec-tree", "1,0,2"],
        ["--spec", "on"],
        ["--fused-threads", "3"],
        ["--fused-threads", "many"],
        ["--num-scheduler-steps", "0"],
    ],
)
def test_serve_refuses_bad_flag_values_as_usage_errors(flags: list[str]) -> None:
    r = engine_cli("serve", *flags)
    assert r.returncode == ExitCode.USAGE, r.stderr
    assert flags[0] in r.stderr


@pytest.mark.e2e
def test_serve_on_a_taken_port_is_one_line_and_exit_7() -> None:
    with free_socket() as taken:
        taken.listen()
        port = taken.getsockname()[1]
        r = engine_cli("serve", "--model", "/nonexistent", "--port", str(port))
    assert r.returncode == ExitCode.ADDRESS_IN_USE
    assert r.stderr.strip() == (
        f"flockctl: port {port} on 127.0.0.1 is already in use; choose another with --port"
    )


@pytest.mark.e2e
def test_serve_a_model_that_cannot_load_is_one_line_and_exit_1(tmp_path: Path) -> None:
    r = engine_cli("serve", "--model", str(tmp_path), "--port", "0", "--log-level", "warning")
    assert r.returncode == ExitCode.ERROR
    lines = [line for line in r.stderr.splitlines() if line.startswith("flockctl:")]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"flockctl: cannot load model {str(tmp_path)!r}: ")


@pytest.mark.e2e
def test_serve_answers_then_stops_on_sigterm(tiny: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flockctl.engine.cli", "serve", "--model", str(tiny),
         "--served-model-name", NAME, "--device", "cpu", "--port", str(port),
         "--scheduler", "fcfs"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    try:

        def healthy() -> bool:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.TransportError:
                return False

        until_sync(healthy, "the engine to answer /health", 120)
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": NAME, "prompt": PROMPT, "max_tokens": 4},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert (
        f"flockctl engine: serving {NAME} on http://127.0.0.1:{port} (device cpu, scheduler fcfs)"
        in err
    )


async def test_a_closed_engine_fails_health_and_refuses_work_with_503(tiny: Path) -> None:
    engine = load_engine(
        EngineConfig(model=str(tiny), served_model_name=NAME, device="cpu"), progress=False
    )
    transport = httpx.ASGITransport(app=create_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:
        assert (await client.get("/health")).status_code == 200
        engine.close()
        error = error_of(await client.get("/health"), 503)
        assert error["code"] == "engine_unavailable"
        assert "shutting down" in error["message"]
        for route, body in (
            ("/v1/completions", {"prompt": "hi"}),
            ("/generate", {"inputs": "hi"}),
        ):
            assert error_of(await client.post(route, json=body), 503)["code"] == (
                "engine_unavailable"
            )


@pytest.mark.e2e
def test_serve_refuses_a_draft_with_another_tokenizer_in_one_line(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "model")
    draft = build_tiny_model(tmp_path / "draft", vocab_size=300)
    r = engine_cli(
        "serve", "--model", str(model), "--draft-model", str(draft), "--port", "0",
        "--device", "cpu", "--log-level", "warning",
    )  # fmt: skip
    assert r.returncode == ExitCode.ERROR
    lines = [line for line in r.stderr.splitlines() if line.startswith("flockctl:")]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"flockctl: draft model {str(draft)!r} cannot speculate for")
    assert "same tokenizer" in lines[0]


async def test_speculation_shows_in_stats_jobs_and_metrics(tiny: Path) -> None:
    config = EngineConfig(
        model=str(tiny), device="cpu", draft_models=(str(tiny),), spec="on", spec_tree=(1, 2)
    )
    engine = load_engine(config, progress=False)
    try:
        transport = httpx.ASGITransport(app=create_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:
            r = (await client.post("/v1/completions", json={"prompt": PROMPT, **GREEDY})).json()
            job = await finished_job(client, r["id"])
            assert job["speculation"]["steps"] > 0
            assert job["speculation"]["mean_accepted_length"] > 1  # its own model as draft
            spec = (await client.get("/stats")).json()["speculation"]
            assert spec["mode"] == "on" and spec["tree"] == [1, 2]
            assert spec["draft_models"] == [str(tiny)]
            assert spec["num_accepted_tokens"] == job["speculation"]["accepted_tokens"]
            metrics = (await client.get("/metrics")).text
            accepted = spec["num_accepted_tokens"]
            assert f"flockctl_spec_decode_num_accepted_tokens_total {accepted:.1f}" in metrics
            assert "flockctl_spec_decode_active 1.0" in metrics
    finally:
        engine.close()

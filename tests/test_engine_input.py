"""Bad input never gets a 5xx from the engine's API, and never costs the client its connection.

Bodies are sent as raw bytes, so a JSON escape like ``\\ud800`` reaches the server as a client
wrote it. What needs a real keep-alive connection runs against uvicorn on 127.0.0.1 through
``http.client``, which reuses one connection until the server says ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import schemathesis

# What schemathesis otherwise imports on first use, inside the engine_schema fixture: there, with
# the engine's thread running, that import once failed with CPython 3.11's "AST constructor
# recursion depth mismatch" (CPython's AST recursion bookkeeping, gh-106905, seen in threaded
# programs). Imported here, at collection, before any engine thread exists.
import schemathesis.specs.openapi.schemas
from conftest import TINY, error_of
from hypothesis import HealthCheck, settings

from flockctl.engine import api, openai_routes
from flockctl.engine.engine import Engine
from flockctl.engine.job import InvalidRequest, SamplingParams

JSON = {"content-type": "application/json"}
SHORT = '"max_tokens": 2, "temperature": 0'


async def post(client: httpx.AsyncClient, path: str, raw: str) -> httpx.Response:
    return await client.post(path, content=raw.encode(), headers=JSON)


def nested(depth: int) -> str:
    """A body whose ``pad`` field (unknown, so ignored) makes it ``depth`` levels deep, the
    body itself the first."""
    return '{"prompt": "hi", ' + SHORT + ', "pad": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


# -- strings that are not Unicode -----------------------------------------------------------------


SURROGATES = [
    ("/v1/completions", '{"prompt": "fox \\ud800", ' + SHORT + "}", "prompt"),
    ("/v1/completions", '{"prompt": ["\\udfff"], ' + SHORT + "}", "prompt[0]"),
    ("/v1/completions", '{"prompt": "hi", "stop": ["x", "\\udc00"], ' + SHORT + "}", "stop[1]"),
    ("/v1/completions", '{"prompt": "hi", "model": "\\ud800", ' + SHORT + "}", "model"),
    ("/v1/completions", '{"prompt": "hi", "user": "\\ud83d", ' + SHORT + "}", "user"),
    (
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": "a\\ud800b"}], ' + SHORT + "}",
        "messages[0].content",
    ),
    (
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
        "messages[0].content[0].text",
    ),
    (
        "/generate",
        '{"inputs": "hi", "parameters": {"stop": ["\\udbff"]}}',
        "parameters.stop[0]",
    ),
    ("/generate_stream", '{"prompt": "\\ud800", "max_new_tokens": 2}', "prompt"),
    ("/v1/completions", '{"prompt": "hi", "metadata": {"\\ud800": 1}}', "metadata"),
]


@pytest.mark.parametrize(
    ("path", "raw", "param"), SURROGATES, ids=[f"{path} {param}" for path, _, param in SURROGATES]
)
async def test_a_lone_surrogate_in_any_field_is_a_400_naming_it(
    client: httpx.AsyncClient, path: str, raw: str, param: str
) -> None:
    error = error_of(await post(client, path, raw), 400)
    assert error["param"] == param
    assert error["message"].startswith(param)
    assert "lone UTF-16 surrogate" in error["message"]
    assert error["type"] == "invalid_request_error"


async def test_a_surrogate_in_a_key_of_the_body_itself_is_a_400(client: httpx.AsyncClient) -> None:
    error = error_of(await post(client, "/v1/completions", '{"prompt": "hi", "\\ud800": 1}'), 400)
    assert error["param"] is None
    assert error["message"].startswith("the body has a key that holds a lone UTF-16 surrogate")


async def test_a_whole_surrogate_pair_is_text_and_is_served(client: httpx.AsyncClient) -> None:
    # Both halves escaped, as JSON encoders write characters outside the BMP.
    r = await post(client, "/v1/completions", '{"prompt": "fox \\ud83d\\ude00", ' + SHORT + "}")
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


# -- nesting --------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [65, 100_000])
async def test_a_body_nested_past_64_levels_is_a_400(client: httpx.AsyncClient, depth: int) -> None:
    error = error_of(await post(client, "/v1/completions", nested(depth)), 400)
    assert error["message"].startswith("the body nests deeper than 64 levels")


async def test_64_levels_and_brackets_inside_strings_are_not_refused(
    client: httpx.AsyncClient,
) -> None:
    r = await post(client, "/v1/completions", nested(64))
    assert r.status_code == 200, r.text
    prompt = json.dumps({"prompt": "[{" * 40, "max_tokens": 2, "temperature": 0})
    r = await post(client, "/v1/completions", prompt)
    assert r.status_code == 200, r.text


# -- connections ----------------------------------------------------------------------------------


def two_requests(
    base: str, method: str, path: str, body: bytes | None, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes, int]:
    """One request and then ``GET /health`` on one kept-alive connection (blocking: run it in a
    thread). http.client opens a new connection only when the first answer said close."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=60)
    try:
        conn.request(method, path, body, headers)
        first = conn.getresponse()
        first_body = first.read()
        first_headers = {k.lower(): v for k, v in first.getheaders()}
        conn.request("GET", "/health")
        second = conn.getresponse()
        second.read()
        return first.status, first_headers, first_body, second.status
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status"),
    [
        ("POST", "/v1/completions", b'{"prompt": "\\ud800"}', JSON, 400),
        ("POST", "/v1/completions", b"[" * 100_000, JSON, 400),
        ("POST", "/v1/completions", b'{"prompt": "hi"', JSON, 400),
        ("POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": 999}', JSON, 400),
        ("POST", "/v1/completions", b"prompt=hi", {"content-type": "text/plain"}, 415),
        ("POST", "/v1/models", b"{}", JSON, 405),
        ("GET", "/nowhere", None, {}, 404),
    ],
    ids=["surrogate", "deep", "not-json", "too-long", "not-json-type", "method", "no-route"],
)
async def test_a_4xx_keeps_the_connection_for_the_next_request(
    served: str,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    status: int,
) -> None:
    first, first_headers, _body, second = await asyncio.to_thread(
        two_requests, served, method, path, body, headers
    )
    assert first == status
    assert first_headers.get("connection") != "close"
    assert second == 200


async def test_a_500_says_connection_close_so_the_next_request_gets_through(
    served: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(detailed: bool = False) -> dict[str, Any]:
        raise RuntimeError("a bug in the listing")

    monkeypatch.setattr(engine, "stats", broken)
    first, headers, body, second = await asyncio.to_thread(
        two_requests, served, "GET", "/stats", None, {}
    )
    assert first == 500
    assert headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["type"] == "server_error"
    assert "RuntimeError: a bug in the listing" in error["message"]
    assert second == 200


async def test_a_stream_that_fails_ends_with_an_error_event_and_keeps_the_connection(
    served: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(handle: Any) -> dict[str, int]:
        raise RuntimeError("a bug at the end of the stream")

    monkeypatch.setattr(openai_routes.Choices, "usage", broken)
    usage = {"include_usage": True}
    body = {"prompt": "hi", "max_tokens": 2, "stream": True, "stream_options": usage}
    first, _headers, raw, second = await asyncio.to_thread(
        two_requests, served, "POST", "/v1/completions", json.dumps(body).encode(), JSON
    )
    assert first == 200
    events = raw.decode().removesuffix("\n\n").split("\n\n")
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["type"] == "server_error"
    assert "a bug at the end of the stream" in error["message"]
    assert second == 200


# -- what a job keeps -----------------------------------------------------------------------------


def test_sampling_params_refuse_a_stop_string_that_is_not_text() -> None:
    with pytest.raises(InvalidRequest) as refused:
        SamplingParams(stop=("ok", "x\ud800"))
    assert refused.value.param == "stop"


async def test_a_surrogate_stop_string_is_refused_and_the_job_listings_keep_answering(
    client: httpx.AsyncClient,
) -> None:
    refused = await post(client, "/v1/completions", '{"prompt": "hi", "stop": "\\udc00"}')
    error = error_of(refused, 400)
    assert error["param"] == "stop"
    r = await post(client, "/v1/completions", '{"prompt": "hi", "stop": ["z"], ' + SHORT + "}")
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    job = await client.get(f"/jobs/{job_id}")
    assert job.status_code == 200, job.text
    assert job.json()["params"]["stop"] == ["z"]
    detailed = await client.get("/stats/detailed")
    assert detailed.status_code == 200, detailed.text
    assert job_id.removeprefix("cmpl-") in [j["id"] for j in detailed.json()["recent_jobs"]]


async def test_a_string_that_is_not_text_never_breaks_a_listing(
    client: httpx.AsyncClient, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --served-model-name from argv that is not UTF-8: Python keeps the bytes as lone surrogates.
    monkeypatch.setattr(engine, "model_name", TINY + "\udcff")
    for path in ("/stats", "/stats/detailed", "/v1/models", "/health"):
        r = await client.get(path)
        assert r.status_code == 200, (path, r.text)
        assert TINY + "\ufffd" in r.text, path


# -- the published schema -------------------------------------------------------------------------


async def test_openapi_describes_the_bodies_the_routes_parse(client: httpx.AsyncClient) -> None:
    r = await client.get("/openapi.json")
    assert r.status_code == 200
    schema = r.json()
    components = schema["components"]["schemas"]
    bodies = {
        "/v1/completions": "CompletionRequest",
        "/v1/chat/completions": "ChatRequest",
        "/generate": "GenerateRequest",
        "/generate_stream": "GenerateRequest",
        "/generate/stream": "GenerateRequest",
    }
    for path, model in bodies.items():
        body = schema["paths"][path]["post"]["requestBody"]
        ref = body["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model}"
    chat = components["ChatRequest"]
    assert "messages" in chat["required"]
    assert chat["properties"]["messages"]["items"] == {"$ref": "#/components/schemas/ChatMessage"}
    # Every reference in the document points at a schema it holds.
    refs = set()

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            refs.update(v for k, v in node.items() if k == "$ref")
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(schema)
    assert {ref.removeprefix("#/components/schemas/") for ref in refs} <= set(components)


# -- fuzzing --------------------------------------------------------------------------------------

fuzzed = schemathesis.pytest.from_fixture("engine_schema")

# Generated lengths up to the context would make each case a long generation; past it they are a
# quick 400 worth keeping.
LENGTHS = ("max_tokens", "max_completion_tokens", "max_new_tokens")
FUZZ_MAX_TOKENS = 4


@pytest.fixture(scope="module")
def engine_schema(engine: Engine) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", api.create_app(engine))


def few_tokens(body: Any, context: int) -> None:
    """Cut a generated body's lengths that the engine would spend a generation on."""
    if not isinstance(body, dict):
        return
    for name in LENGTHS:
        value = body.get(name)
        if isinstance(value, int) and FUZZ_MAX_TOKENS < value <= context:
            body[name] = FUZZ_MAX_TOKENS
    if "messages" in body and all(body.get(name) is None for name in LENGTHS):
        body["max_tokens"] = FUZZ_MAX_TOKENS  # the chat default is the rest of the context
    few_tokens(body.get("parameters"), context)


@fuzzed.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    # Generating bodies for these schemas can be slow on a loaded machine; that is not a fault.
    suppress_health_check=[HealthCheck.too_slow],
)
def test_fuzzed_requests_never_get_a_server_error(case: schemathesis.Case, engine: Engine) -> None:
    few_tokens(case.body, engine.max_model_len)
    response = case.call()
    assert response.status_code < 500, (
        f"{case.method} {case.path} answered {response.status_code}: {response.text[:500]}\n"
        f"reproduce with: {case.as_curl_command()}"
    )

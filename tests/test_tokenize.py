"""``/tokenize`` and ``/detokenize`` in vLLM's shapes on the tiny real model: the ids a prompt or a
chat becomes are the ids the generation routes use, and bad bodies get 400s naming the field."""

from __future__ import annotations

from pathlib import Path

import httpx
from conftest import TINY, error_of
from transformers import AutoTokenizer

from flockctl.engine.engine import Engine

MESSAGES = [{"role": "user", "content": "hello world"}]


async def test_tokenize_a_prompt_and_back(
    client: httpx.AsyncClient, engine: Engine, tiny: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    r = await client.post("/tokenize", json={"model": TINY, "prompt": "the quick brown fox"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["tokens"] == tokenizer.encode("the quick brown fox")
    assert out["count"] == len(out["tokens"])
    assert out["max_model_len"] == engine.max_model_len
    assert out["token_strs"] is None
    strs = await client.post("/tokenize", json={"prompt": "the fox", "return_token_strs": True})
    assert "".join(strs.json()["token_strs"]).replace("Ġ", " ") == "the fox"
    back = await client.post("/detokenize", json={"model": TINY, "tokens": out["tokens"]})
    assert back.json() == {"prompt": "the quick brown fox"}


async def test_tokenized_messages_are_the_prompt_chat_completions_count(
    client: httpx.AsyncClient, tiny: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    r = await client.post("/tokenize", json={"messages": MESSAGES})
    assert r.status_code == 200, r.text
    expected = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"]  # a BatchEncoding
    assert r.json()["tokens"] == list(expected)
    chat = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1})
    assert chat.json()["usage"]["prompt_tokens"] == r.json()["count"]
    bare = await client.post(
        "/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}
    )
    assert bare.json()["count"] < r.json()["count"]  # no assistant marker at the end


async def test_bad_tokenize_bodies_name_the_field(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    cases = [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "x", "messages": MESSAGES}, "prompt"),
        ("/tokenize", {"prompt": 3}, "prompt"),
        ("/tokenize", {"messages": []}, "messages"),
        (
            "/tokenize",
            {"messages": MESSAGES, "continue_final_message": True},
            "continue_final_message",
        ),
        ("/detokenize", {"tokens": [1, engine.vocab_size]}, "tokens[1]"),
        ("/detokenize", {"tokens": [-1]}, "tokens[0]"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
    ]
    for route, body, field in cases:
        error = error_of(await client.post(route, json=body), 400)
        assert error["param"] == field, (route, body, error)
    missing = await client.post("/tokenize", json={"prompt": "x", "model": "other"})
    assert error_of(missing, 404)["code"] == "model_not_found"

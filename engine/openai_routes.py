"""OpenAI's API on the engine: ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``,
plain and streamed (SSE, ending with ``data: [DONE]``).

A request becomes one job per choice: ``n`` choices per prompt, and on completions one prompt or
a batch of them (``index`` is ``prompt * n + choice``, in order). The ``n`` choices of a prompt
share its KV cache: choice 0 starts at once, and the others are checked and queued with it but
held until its prefill is done (``Engine.submit``'s ``after``), so they take references to the
prompt's full blocks from the prefix cache and compute only the last, partial one. Where there is
nothing to share (prefix caching off, a prompt of one block or less, a prompt to score) they all
start together. With ``seed``, choice ``i`` samples from its own seed derived from it
(``sibling_seed``), so every choice reproduces and no two are copies of each other.

A response's id is ``cmpl-`` (or ``chatcmpl-``) and its first job's id, so ``GET /jobs/{id}``
answers for it, here and through the balancer (the id begins with this engine's instance token).
Log-probabilities are in OpenAI's shapes (:mod:`flockctl.engine.openai_format`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from flockctl.engine.engine import Engine
from flockctl.engine.job import FinishReason, Job, SamplingParams
from flockctl.engine.openai_format import LogprobFormat
from flockctl.engine.protocol import ChatRequest, CompletionRequest, OpenAIRequest
from flockctl.engine.routes_common import (
    APIError,
    SafeJSON,
    body_schema,
    check_model,
    collect,
    parse,
    refusals,
    server_error,
    submit,
)
from flockctl.engine.sampling import sibling_seed
from flockctl.engine.streaming import EventStream, sse, until_disconnect

if TYPE_CHECKING:
    from flockctl.engine.encoder import EncoderEngine
    from flockctl.engine.handle import Delta, JobHandle


@dataclass
class Choice:
    """One choice of a request: its job, and what its text starts with (an echoed prompt)."""

    index: int
    handle: JobHandle
    prompt_text: str = ""
    echo: bool = False
    started: bool = False  # a streamed choice has sent its first chunk
    offset: int = 0  # characters of text sent so far (completions' text_offset)
    text: str = ""  # the generated text, once the job finished (plain answers)


@dataclass
class Choices:
    """A request's jobs, cancelled together (what ``EventStream`` and ``until_disconnect`` take
    for a single job's handle)."""

    choices: list[Choice]
    prompt_tokens: int = 0

    @property
    def job(self) -> Job:
        return self.choices[0].handle.job

    def cancel(self) -> None:
        for choice in self.choices:
            choice.handle.cancel()

    def usage(self) -> dict[str, int]:
        completion = sum(len(c.handle.job.output_ids) for c in self.choices)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }


def register_openai(app: FastAPI, engine: Engine | EncoderEngine) -> None:
    """Add OpenAI's routes to the engine's ``app``."""
    created = int(time.time())
    tokenizer = engine.tokenizer
    fmt = LogprobFormat(tokenizer)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": engine.model_name,
                    "object": "model",
                    "created": created,
                    "owned_by": "flockctl",
                    "max_model_len": engine.max_model_len,
                    # "generate" and "embed", or "embed" alone for an embedding model
                    "capabilities": list(engine.capabilities),
                }
            ],
        }

    @app.post("/v1/completions", openapi_extra=body_schema(CompletionRequest))
    async def completions(request: Request) -> Response:
        body = await parse(request, CompletionRequest)
        check_openai(body)
        prompts = [tokenizer.encode(p) if isinstance(p, str) else p for p in body.prompt]
        vocab = engine.vocab_size
        for k, ids in enumerate(prompts):  # before a tokenizer sees them: it overflows on some
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                param = f"prompt[{k}]" if len(prompts) > 1 else "prompt"
                message = f"{param}: token id {bad} is outside the vocabulary (0..{vocab - 1})"
                raise APIError(400, message, param)
        texts = [
            p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=False)
            for p in body.prompt
        ]
        scored = body.prompt_logprobs()
        group = start(
            body,
            prompts,
            lambda: body.sampling_params(default_max_tokens=16, prompt_logprobs=scored),
            lambda k: {
                "prompt": f"prompt[{k}]" if len(prompts) > 1 else "prompt",
                "max_tokens": body.max_tokens_field(),
            },
            texts if body.echo else None,
        )
        head = openai_head(f"cmpl-{group.job.id}", "text_completion")
        if body.stream:
            events = completion_events(group, head, body.include_usage, body.logprobs is not None)
            return EventStream(events, group, openai_failed)  # type: ignore[arg-type]
        await run_all(request, group)
        choices = []
        for c in group.choices:
            job = c.handle.job
            text = c.text
            logprobs = None
            if body.logprobs is not None:
                entries = [*(job.prompt_logprobs or []), *job.logprobs] if c.echo else job.logprobs
                ids = [*job.prompt_ids, *job.output_ids] if c.echo else job.output_ids
                logprobs = fmt.completion(ids, entries, 0)
            choices.append(
                {
                    "index": c.index,
                    "text": c.prompt_text + text if c.echo else text,
                    "logprobs": logprobs,
                    "finish_reason": job.finish_reason.value if job.finish_reason else None,
                }
            )
        return SafeJSON({**head, "choices": choices, "usage": group.usage()})

    @app.post("/v1/chat/completions", openapi_extra=body_schema(ChatRequest))
    async def chat_completions(request: Request) -> Response:
        body = await parse(request, ChatRequest)
        check_openai(body)
        prompt_ids = chat_prompt(body)
        default = max(engine.max_model_len - len(prompt_ids), 1)
        # The prompt is what the messages became: errors name the fields the client sent.
        group = start(
            body,
            [prompt_ids],
            lambda: body.sampling_params(default_max_tokens=default),
            lambda _k: {"prompt": "messages", "max_tokens": body.max_tokens_field()},
        )
        head = openai_head(f"chatcmpl-{group.job.id}", "chat.completion")
        if body.stream:
            head["object"] = "chat.completion.chunk"
            events = chat_events(group, head, body.include_usage, body.logprobs)
            return EventStream(events, group, openai_failed)  # type: ignore[arg-type]
        await run_all(request, group)
        choices = []
        for c in group.choices:
            job = c.handle.job
            choices.append(
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "finish_reason": job.finish_reason.value if job.finish_reason else None,
                    "logprobs": fmt.chat(job.output_ids, job.logprobs) if body.logprobs else None,
                }
            )
        return SafeJSON({**head, "choices": choices, "usage": group.usage()})

    def check_openai(body: OpenAIRequest) -> None:
        check_model(engine, body.model)
        unsupported = body.unsupported()
        if unsupported is not None:
            raise APIError(400, unsupported[1], unsupported[0], "unsupported_parameter")
        vocab = engine.vocab_size
        for name, ids in (
            ("logit_bias", [int(k) for k in (body.logit_bias or {}) if k.isdigit()]),
            ("stop_token_ids", body.stop_token_ids or []),
        ):
            bad = next((t for t in ids if t >= vocab), None)
            if bad is not None:
                raise APIError(
                    400, f"{name}: token id {bad} is outside the vocabulary (0..{vocab - 1})", name
                )

    def start(
        body: OpenAIRequest,
        prompts: list[list[int]],
        params: Callable[[], SamplingParams],
        fields: Callable[[int], Mapping[str, str]],
        echoed: list[str] | None = None,
    ) -> Choices:
        """Submit ``n`` jobs per prompt, choices 1.. behind choice 0 (they share its prompt's
        blocks); if one is refused, those already submitted stop."""
        group = Choices([], prompt_tokens=sum(len(p) for p in prompts))
        try:
            for k, prompt_ids in enumerate(prompts):
                leader: JobHandle | None = None
                for i in range(body.n):
                    index = k * body.n + i

                    def choice_params(i: int = i) -> SamplingParams:
                        p = params()
                        return replace(p, seed=sibling_seed(p.seed, i)) if i else p

                    if leader is None:
                        handle = leader = submit(engine, prompt_ids, choice_params, fields(k))
                    else:
                        handle = submit_behind(leader, choice_params())
                    handle.job.user = body.user
                    text = echoed[k] if echoed is not None else ""
                    group.choices.append(Choice(index, handle, text, echoed is not None))
        except APIError:
            group.cancel()
            raise
        return group

    def submit_behind(leader: JobHandle, params: SamplingParams) -> JobHandle:
        """Another choice of ``leader``'s prompt, held until the leader's prefill. Its prompt and
        limits passed with the leader's; what may still refuse it is a full queue or a stopped
        engine."""
        assert isinstance(engine, Engine)  # only a generating engine took the leader
        with refusals():
            return engine.submit(leader.job.prompt_ids, params, after=leader)
        raise AssertionError("unreachable")  # refusals() re-raises every exception it catches

    def chat_prompt(body: ChatRequest) -> list[int]:
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(
                400,
                f"the model {engine.model_name!r} has no chat template, so it cannot take"
                " messages; send a prompt to /v1/completions instead",
                "messages",
                "no_chat_template",
            )
        # Templates index message["content"]; an assistant turn may have sent none.
        messages = [
            {**m.model_dump(exclude_none=True), "content": m.content or ""} for m in body.messages
        ]
        try:
            out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # templates raise on what they refuse (roles out of order...)
            raise APIError(
                400, f"the chat template rejected the messages: {exc}", "messages"
            ) from exc
        ids = out["input_ids"] if isinstance(out, Mapping) else out
        if ids and isinstance(ids[0], list):  # a batch of one
            ids = ids[0]
        return [int(t) for t in ids]

    def openai_head(response_id: str, kind: str) -> dict[str, Any]:
        return {
            "id": response_id,
            "object": kind,
            "created": int(time.time()),
            "model": engine.model_name,
        }

    async def completion_events(
        group: Choices, head: dict[str, Any], include_usage: bool, logprobs: bool
    ) -> AsyncIterator[bytes]:
        extra = {"usage": None} if include_usage else {}
        async for c, delta in merged(group):
            if delta.error:
                yield sse({"error": server_error(delta.error)})
                group.cancel()
                break
            job = c.handle.job
            text, ids = delta.text, list(delta.token_ids)
            entries: list[Any] = list(delta.logprobs or [])
            if c.echo and not c.started:
                text = c.prompt_text + text
                ids = [*job.prompt_ids, *ids]
                entries = [*(job.prompt_logprobs or []), *entries]
            c.started = True
            if not (text or ids or delta.finish_reason is not None):
                continue
            chunk_logprobs = None
            if logprobs:
                chunk_logprobs = fmt.completion(ids, entries, c.offset)
            c.offset += len(text)
            reason = delta.finish_reason.value if delta.finish_reason else None
            choice = {
                "index": c.index,
                "text": text,
                "logprobs": chunk_logprobs,
                "finish_reason": reason,
            }
            yield sse({**head, "choices": [choice], **extra})
        if include_usage:
            yield sse({**head, "choices": [], "usage": group.usage()})
        yield b"data: [DONE]\n\n"

    async def chat_events(
        group: Choices, head: dict[str, Any], include_usage: bool, logprobs: bool
    ) -> AsyncIterator[bytes]:
        extra = {"usage": None} if include_usage else {}

        def chunk(
            c: Choice,
            delta: dict[str, Any],
            reason: FinishReason | None = None,
            scores: Any = None,
        ) -> bytes:
            choice = {
                "index": c.index,
                "delta": delta,
                "finish_reason": reason.value if reason else None,
                "logprobs": scores,
            }
            return sse({**head, "choices": [choice], **extra})

        for c in group.choices:
            yield chunk(c, {"role": "assistant", "content": ""})
        async for c, delta in merged(group):
            if delta.error:
                yield sse({"error": server_error(delta.error)})
                group.cancel()
                break
            scores = fmt.chat(delta.token_ids, delta.logprobs or []) if logprobs else None
            if delta.finish_reason is not None:
                content = {"content": delta.text} if delta.text else {}
                yield chunk(c, content, delta.finish_reason, scores)
            elif delta.text or (scores and scores["content"]):
                yield chunk(c, {"content": delta.text}, None, scores)
        if include_usage:
            yield sse({**head, "choices": [], "usage": group.usage()})
        yield b"data: [DONE]\n\n"


async def merged(group: Choices) -> AsyncIterator[tuple[Choice, Delta]]:
    """Every choice's deltas as they come, each with its choice, until every job has finished."""
    if len(group.choices) == 1:
        [only] = group.choices
        async for delta in only.handle:
            yield only, delta
        return
    queue: asyncio.Queue[tuple[Choice, Delta]] = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        async for delta in choice.handle:
            await queue.put((choice, delta))

    tasks = [asyncio.ensure_future(pump(c)) for c in group.choices]
    try:
        left = len(tasks)
        while left:
            choice, delta = await queue.get()
            if delta.finish_reason is not None:
                left -= 1
            yield choice, delta
    finally:
        for task in tasks:
            task.cancel()


async def run_all(request: Request, group: Choices) -> None:
    """Wait for every job of a request (its text goes on each handle as ``stream_text``); a
    client gone first cancels them all (the route answers 499), an aborted one is a 503."""

    async def everything() -> list[tuple[str, Delta]]:
        return list(await asyncio.gather(*(collect(c.handle) for c in group.choices)))

    outcome = await until_disconnect(everything(), request.receive, group)
    if outcome is None:
        raise APIError(499, "the client closed the connection", code="client_closed")
    for choice, (text, final) in zip(group.choices, outcome, strict=True):
        if final.finish_reason is FinishReason.ABORT:
            group.cancel()
            raise APIError(
                503,
                final.error or f"job {choice.handle.job.id} was aborted",
                code="aborted",
                kind="server_error",
            )
        choice.text = text


def openai_failed(message: str) -> bytes:
    """The last events of an OpenAI stream whose events failed."""
    return sse({"error": server_error(message)}) + b"data: [DONE]\n\n"

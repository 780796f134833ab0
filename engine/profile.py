"""``flockctl engine profile``: measure a model's service model on this machine for
``flockctl simulate --service-model``.

It runs flockctl's engine in this process and measures what the simulator's worker model needs:
prefill speed (prompt tokens per second, from the time to the first token of a lone job with a
long prompt), decode speed of one job at batch 1, and the decode speed per job as the batch grows
(jobs started together, each timed from its first token to its last). Prompts differ from job to
job and run to run, so the prefix cache cannot shorten a prefill. The file is the simulator's
JSON service model, with where and how it was measured under ``measured``.

Importing this module imports no torch; ``measure`` does.
"""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from flockctl.console import fail, say
from flockctl.exitcodes import ExitCode


def measure(
    model: str,
    device: str = "auto",
    batches: tuple[int, ...] = (1, 2, 4, 8),
    prompt_tokens: int = 256,
    decode_tokens: int = 48,
    repeats: int = 3,
) -> dict[str, Any]:
    """The service model of ``model`` on this machine, as a JSON-ready dict."""
    from flockctl.engine.llm import LLM, GenerationConfig

    llm = LLM(model, device=device)
    llm.compile(max_requests_per_batch=max(batches), spec="off")
    llm.start_server()
    engine = llm.engine
    assert engine is not None
    try:
        vocab = engine.vocab_size
        longest = engine.max_model_len - decode_tokens - 1
        prompt_tokens = max(8, min(prompt_tokens, longest))
        params = GenerationConfig(ignore_eos=True)
        counter = iter(range(1, 1 << 30))

        def prompt(n: int) -> list[int]:
            # Distinct from every other prompt from its first token on: nothing to reuse.
            k = next(counter)
            return [(k * 7919 + i * 31) % (vocab - 1) + 1 for i in range(n)]

        async def run(jobs: int, n_prompt: int, n_out: int) -> list[tuple[float, float, int]]:
            """Per job: seconds to the first token, seconds from it to the last, tokens."""
            start = time.perf_counter()
            handles = [engine.submit(prompt(n_prompt), params.params(n_out)) for _ in range(jobs)]

            async def follow(handle: Any) -> tuple[float, float, int]:
                first = end = None
                tokens = 0
                async for delta in handle:
                    if delta.error:
                        raise RuntimeError(delta.error)
                    now = time.perf_counter()
                    if delta.token_ids:
                        first = now if first is None else first
                        end = now
                        tokens += len(delta.token_ids)
                assert first is not None and end is not None
                return first - start, end - first, tokens

            return list(await asyncio.gather(*(follow(h) for h in handles)))

        async def main() -> dict[str, Any]:
            await run(1, 16, 8)  # warm up: first calls pay for allocation and kernels
            firsts = [(await run(1, prompt_tokens, 1))[0][0] for _ in range(repeats)]
            prefill = prompt_tokens / statistics.median(firsts)
            speeds: dict[int, float] = {}
            for b in batches:
                rates = []
                for _ in range(repeats):
                    for _, span, tokens in await run(b, 16, decode_tokens):
                        if tokens > 1 and span > 0:
                            rates.append((tokens - 1) / span)
                speeds[b] = statistics.median(rates)
            return {"prefill": prefill, "speeds": speeds}

        got = asyncio.run(main())
    finally:
        llm.stop_server()
    speeds = got["speeds"]
    one = speeds[min(speeds)]
    return {
        "prefill_tokens_per_s": round(got["prefill"], 1),
        "decode_tokens_per_s": round(one, 2),
        "max_batch_size": max(batches),
        "batching": [[b, round(min(s / one, 1.5), 4)] for b, s in sorted(speeds.items())],
        "measured": {
            "model": model,
            "device": str(engine.device),
            "machine": platform.machine(),
            "processor": platform.processor() or None,
            "prompt_tokens": prompt_tokens,
            "decode_tokens": decode_tokens,
            "decode_tokens_per_s_by_batch": {str(b): round(s, 2) for b, s in speeds.items()},
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }


def profile(
    model: Annotated[
        str, typer.Option(help="Hub id, local path, or 'demo' (built locally).", show_default=False)
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Service model file to write (JSON).")
    ] = Path("service-model.json"),
    device: Annotated[str, typer.Option(help="auto, cuda, mps or cpu.")] = "auto",
    batch: Annotated[
        list[int] | None,
        typer.Option(
            help="Batch sizes to measure decode speed at (repeatable) [default: 1 2 4 8]."
        ),
    ] = None,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length of the prefill runs.")] = 256,
    decode_tokens: Annotated[int, typer.Option(help="Tokens each decode run generates.")] = 48,
    repeats: Annotated[int, typer.Option(help="Runs of each measurement (median kept).")] = 3,
) -> None:
    """Measure prefill and decode speed, and decode speed per job as the batch grows, on this
    machine; write a service model for `flockctl simulate --service-model`."""
    batches = tuple(sorted(set(batch or (1, 2, 4, 8))))
    if batches[0] != 1 or any(b < 1 for b in batches):
        fail(
            "--batch: the sizes must include 1 (the speed the others are relative to)",
            ExitCode.USAGE,
        )
    if repeats < 1 or prompt_tokens < 8 or decode_tokens < 2:
        fail("--repeats must be >= 1, --prompt-tokens >= 8, --decode-tokens >= 2", ExitCode.USAGE)
    say(f"profiling {model}: prefill of {prompt_tokens} tokens, decode at batch {list(batches)}")
    try:
        result = measure(model, device, batches, prompt_tokens, decode_tokens, repeats)
    except (OSError, ValueError, RuntimeError) as exc:
        fail(f"cannot profile {model}: {exc}", ExitCode.ERROR)
    output.write_text(json.dumps(result, indent=2) + "\n")
    curve = ", ".join(f"{b}: {f:g}" for b, f in result["batching"])
    say(
        f"wrote {output}: prefill {result['prefill_tokens_per_s']:g} tokens/s, decode"
        f" {result['decode_tokens_per_s']:g} tokens/s at batch 1, per-job speed by batch {curve}"
    )

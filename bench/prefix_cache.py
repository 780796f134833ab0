"""Prefix caching: time to first token for requests sharing a long system prompt, on against off.

    python bench/prefix_cache.py [--model demo] [--system-tokens 512] [--requests 24]
                                 [--concurrency 4] [--rounds 3] [--max-tokens 8] [--threads N]

Two engines on the same weights run in this process (``load_engine``, no HTTP): one with
``--prefix-caching on``, one with it off. Each round sends both the same requests, one engine
after the other (the order alternates by round, the idle engine's thread sleeps), so both see the
host in the same state. A request is the same system prompt of ``--system-tokens`` tokens (the
demo's code snippets end to end, repeated) followed by a question of its own (one snippet, 10-25
tokens), greedy, ``--max-tokens`` new tokens; ``--concurrency`` clients send them back to back.

Time to first token is the engine's own (job arrival to first token), so it holds the queueing a
request meets at this concurrency as well as its prefill. Why caching should win: with it off
every request computes the whole system prompt; with it on only the first request of the run does,
and the others start their prefill after the cached blocks. The greedy tokens of both engines are
compared too: they must be identical. Stdout gets one JSON object; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import TYPE_CHECKING, Any

from common import PROMPTS, machine, percentile, say

if TYPE_CHECKING:
    from flockctl.engine.engine import Engine


def _model_path(model: str) -> str:
    if model == "demo":
        from flockctl.engine.demo import ensure_demo

        return str(ensure_demo(progress=False).target)
    return model


def make_requests(tokenizer: Any, system_tokens: int, count: int) -> list[list[int]]:
    """``count`` prompts: one system prompt of ``system_tokens`` tokens, then a snippet each."""
    text = "\n".join(PROMPTS) + "\n"
    ids = tokenizer.encode(text)
    system = (ids * -(-system_tokens // len(ids)))[:system_tokens]
    questions = [tokenizer.encode("\n" + p) for p in PROMPTS]
    return [system + questions[i % len(questions)] for i in range(count)]


async def one_round(
    engine: Engine, prompts: list[list[int]], concurrency: int, max_tokens: int
) -> list[dict[str, Any]]:
    """Send every prompt through ``concurrency`` clients; each request's TTFT and tokens."""
    from flockctl.engine.job import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    queue = list(enumerate(prompts))
    results: list[dict[str, Any]] = [{} for _ in prompts]

    async def client() -> None:
        while queue:
            index, prompt = queue.pop(0)
            handle = engine.submit(prompt, params)
            tokens: list[int] = []
            async for delta in handle:
                if delta.error:
                    raise RuntimeError(f"engine job failed: {delta.error}")
                tokens += delta.token_ids
            job = handle.job
            assert job.first_token is not None
            results[index] = {"ttft": job.first_token - job.arrival, "tokens": tokens}

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results


def summary(ttfts: list[float], stats: dict[str, Any]) -> dict[str, Any]:
    ordered = sorted(ttfts)
    p99 = percentile(ordered, 99)
    return {
        "requests": len(ttfts),
        "ttft_mean_ms": round(statistics.fmean(ttfts) * 1000, 2),
        "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 2),
        "ttft_p99_ms": round(p99 * 1000, 2) if p99 is not None else None,
        "prefix_cache": stats.get("prefix_cache"),
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    from flockctl.engine.config import EngineConfig
    from flockctl.engine.loader import load_engine

    path = _model_path(args.model)
    engines: dict[str, Engine] = {}
    try:
        for mode in ("on", "off"):
            say(f"loading {args.model} with prefix caching {mode}")
            config = EngineConfig(
                model=path,
                device=args.device,
                max_batch_size=args.max_batch_size,
                threads=args.threads,
                prefix_caching=mode == "on",
            )
            engines[mode] = load_engine(config, progress=False)
        prompts = make_requests(engines["on"].tokenizer, args.system_tokens, args.requests)
        say(
            f"{len(prompts)} requests of {min(map(len, prompts))}-{max(map(len, prompts))} tokens,"
            f" {args.system_tokens} shared; concurrency {args.concurrency}, {args.rounds} rounds"
        )
        await one_round(engines["on"], prompts[:1], 1, 1)  # warm-up, and it fills the cache
        await one_round(engines["off"], prompts[:1], 1, 1)
        ttfts: dict[str, list[float]] = {"on": [], "off": []}
        outputs: dict[str, list[list[int]]] = {"on": [], "off": []}
        for r in range(args.rounds):
            for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
                start = time.perf_counter()
                results = await one_round(engines[mode], prompts, args.concurrency, args.max_tokens)
                ttfts[mode] += [x["ttft"] for x in results]
                outputs[mode] += [x["tokens"] for x in results]
                mean = statistics.fmean(x["ttft"] for x in results) * 1000
                say(
                    f"round {r + 1} caching {mode}: mean TTFT {mean:.1f} ms,"
                    f" {time.perf_counter() - start:.1f} s"
                )
        on = summary(ttfts["on"], engines["on"].stats())
        off = summary(ttfts["off"], engines["off"].stats())
    finally:
        for engine in engines.values():
            engine.close()
    return {
        "bench": "prefix_cache",
        "machine": machine(),
        "model": args.model,
        "system_tokens": args.system_tokens,
        "requests_per_round": args.requests,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "on": on,
        "off": off,
        "ttft_mean_ratio_off_over_on": round(off["ttft_mean_ms"] / on["ttft_mean_ms"], 3),
        "greedy_identical": outputs["on"] == outputs["off"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(bench(args)), indent=2))


if __name__ == "__main__":
    main()

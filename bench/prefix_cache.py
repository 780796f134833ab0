"""Prefix caching: time to first token for requests sharing a long system prompt, on against off;
and a request's ``n`` choices sharing their prompt, against each choice computing it.

    python bench/prefix_cache.py [--model demo] [--system-tokens 512] [--requests 24]
                                 [--concurrency 4] [--rounds 3] [--max-tokens 8] [--threads N]
                                 [--parts caching,choices] [--choices 8] [--choice-requests 6]
                                 [--max-num-batched-tokens N (0: auto)]

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
compared too: they must be identical.

The ``choices`` part sends requests of ``--choices`` choices (sampled, a seed per choice as the
OpenAI routes give them), each with a prompt of its own (no cache hit from an earlier request), to
two more engines with caching on, taking turns request by request: ``together`` submits every
choice at once, in one iteration (each prefills the whole prompt: what the OpenAI routes did
before, unless the model loop happened to take choice 0 alone first), ``shared`` holds choices
1.. until choice 0's prefill (``Engine.submit``'s ``after``, what the OpenAI routes do), so they
take the prompt's full blocks from it. It reports the prompt tokens computed (the cache's
queries less its hits) and the request's latency (submit to last choice finished), and checks
that both ways give the same tokens. Stdout gets one JSON object; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
from typing import TYPE_CHECKING, Any

from common import PROMPTS, job_tokens, machine, percentile, say

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


async def one_request(
    engine: Engine, prompt: list[int], choices: int, max_tokens: int, shared: bool
) -> dict[str, Any]:
    """One request of ``choices`` choices: its latency, prompt tokens computed, tokens out."""
    from flockctl.engine.job import SamplingParams
    from flockctl.engine.sampling import sibling_seed

    prefix = engine.pool.prefix
    assert prefix is not None, "the choices part needs prefix caching on"
    queries, hits = prefix.queries, prefix.hits
    params = [
        SamplingParams(
            max_tokens=max_tokens, temperature=1.0, seed=sibling_seed(7, i), ignore_eos=True
        )
        for i in range(choices)
    ]
    start = time.perf_counter()
    # together: the model loop takes every choice from its inbox at once (its lock is held while
    # they are submitted), else it may take choice 0 alone and the others share by chance
    with contextlib.nullcontext() if shared else engine.model_loop._cv:
        leader = engine.submit(prompt, params[0])
        handles = [leader]
        handles += [engine.submit(prompt, p, after=leader if shared else None) for p in params[1:]]

    outputs = await asyncio.gather(*(job_tokens(h) for h in handles))
    return {
        "latency": time.perf_counter() - start,
        "computed": (prefix.queries - queries) - (prefix.hits - hits),
        "tokens": outputs,
    }


async def bench_choices(engines: dict[str, Engine], args: argparse.Namespace) -> dict[str, Any]:
    """``together`` and ``shared``, each on an engine of its own, taking turns; the same fresh
    prompt to both for each request."""
    system = make_requests(engines["together"].tokenizer, args.system_tokens, 1)[0]
    results: dict[str, list[dict[str, Any]]] = {"together": [], "shared": []}
    for mode, engine in engines.items():  # warm-up
        await one_request(engine, system[-64:], args.choices, 1, mode == "shared")
    for r in range(args.choice_requests):
        # the system prompt turned by a token more each time: a first block of its own, so
        # nothing of this prompt is cached before it, and the same length every time
        prompt = system[r + 1 :] + system[: r + 1]
        for mode in ("together", "shared") if r % 2 == 0 else ("shared", "together"):
            result = await one_request(
                engines[mode], prompt, args.choices, args.max_tokens, mode == "shared"
            )
            results[mode].append(result)
            say(
                f"request {r + 1} {mode}: {result['latency'] * 1000:.0f} ms,"
                f" {result['computed']} prompt tokens computed"
            )
    figures: dict[str, Any] = {}
    for mode, runs in results.items():
        latencies = [x["latency"] for x in runs]
        figures[mode] = {
            "latency_mean_ms": round(statistics.fmean(latencies) * 1000, 1),
            "latency_p50_ms": round(statistics.median(latencies) * 1000, 1),
            "prompt_tokens_computed_per_request": round(
                statistics.fmean(x["computed"] for x in runs), 1
            ),
            "prompt_tokens_computed": [x["computed"] for x in runs],
            "latencies_ms": [round(x * 1000) for x in latencies],
        }
    pairs = zip(results["together"], results["shared"], strict=True)
    ratios = [t["latency"] / s["latency"] for t, s in pairs]
    return {
        "choices": args.choices,
        "requests_each": args.choice_requests,
        "prompt_tokens": len(system),
        **figures,
        "latency_ratio_together_over_shared": {
            "mean": round(statistics.fmean(ratios), 3),
            "min": round(min(ratios), 3),
            "max": round(max(ratios), 3),
        },
        "computed_ratio_together_over_shared": round(
            figures["together"]["prompt_tokens_computed_per_request"]
            / figures["shared"]["prompt_tokens_computed_per_request"],
            2,
        ),
        "tokens_identical": [x["tokens"] for x in results["together"]]
        == [x["tokens"] for x in results["shared"]],
    }


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

    parts = set(args.parts.split(","))
    path = _model_path(args.model)
    engines: dict[str, Engine] = {}
    out: dict[str, Any] = {
        "bench": "prefix_cache",
        "machine": machine(),
        "model": args.model,
        "system_tokens": args.system_tokens,
        "max_tokens": args.max_tokens,
    }
    names = [*(("on", "off") if "caching" in parts else ()),
             *(("together", "shared") if "choices" in parts else ())]  # fmt: skip
    try:
        for name in names:
            say(f"loading {args.model} as {name!r}")
            config = EngineConfig(
                model=path,
                device=args.device,
                max_batch_size=args.max_batch_size,
                threads=args.threads,
                prefix_caching=name != "off",
                max_num_batched_tokens=args.max_num_batched_tokens,
            )
            engines[name] = load_engine(config, progress=False)
            out["max_num_batched_tokens"] = engines[name].config.max_num_batched_tokens
        if "caching" in parts:
            out.update(await bench_caching(engines, args))
        if "choices" in parts:
            pair = {name: engines[name] for name in ("together", "shared")}
            out["n_choices"] = await bench_choices(pair, args)
    finally:
        for engine in engines.values():
            engine.close()
    return out


async def bench_caching(engines: dict[str, Engine], args: argparse.Namespace) -> dict[str, Any]:
    """Requests sharing a system prompt, the engine with caching on and off taking turns."""
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
    return {
        "requests_per_round": args.requests,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
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
    parser.add_argument("--max-num-batched-tokens", type=int, default=0, help="0: auto")
    parser.add_argument("--parts", default="caching,choices", help="caching, choices or both")
    parser.add_argument("--choices", type=int, default=8)
    parser.add_argument("--choice-requests", type=int, default=6)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(bench(args)), indent=2))


if __name__ == "__main__":
    main()

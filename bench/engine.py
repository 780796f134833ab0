"""The engine's speed side by side: transformers ``generate``, the engine at concurrency 1, 8 and
32, speculation on two model pairs, and optionally a running vLLM server, on CPU or CUDA.

    python bench/engine.py                       # the demo pair, about 2 minutes on 2 CPU cores
    python bench/engine.py --quick               # a smoke run
    python bench/engine.py --device cuda         # bfloat16 by default; --dtype float32 for equality
    python bench/engine.py --model M --draft-model D [--vllm http://127.0.0.1:8000]
    python bench/engine.py --stall               # a long prompt beside 8 decodes, chunked or not
    python bench/engine.py --out-of-step         # clients whose requests end at different steps

Every engine is a real ``flockctl engine serve`` process on 127.0.0.1, loaded one at a time, so
none of them competes with another for the cores; requests are streamed ``/v1/completions`` of
greedy tokens (``ignore_eos``, so every request makes exactly ``--tokens`` tokens) sent as token
ids, the same ones to every server. transformers' ``generate`` (greedy, KV cache, batch 1) runs in
this process before any engine starts. Requests of one length sent back to back start and end
together at each level above 1; with ``--out-of-step`` client ``k`` of ``c`` first asks for
``1 + k * tokens // c`` tokens (counted in tokens/s, not in the latencies), so its requests end at
other steps than the others', as independent users' do, and new prompts join a running batch.

Speculation is measured on two pairs: the given one (the demo's target and its distilled draft),
and a weaker one this script builds: the same target with a copy of the draft whose weights carry
Gaussian noise (that many times each tensor's spread), so fewer drafted tokens are accepted. Each
pair's greedy agreement (how often the draft's argmax is the target's greedy token, fed the
target's own continuations) is measured and reported. The noise is found by bisection so that the
weaker draft's agreement is ``--weak-agreement`` (default 0.69, the agreement of the weaker 2-layer
draft the targets were set with), or given with ``--weak-noise``: a fixed noise of 0.15 gave 0.69
with an earlier demo draft and 0.89 with today's (the demo draft itself: 0.94). Each pair runs with
``--spec on`` and ``--spec auto`` beside a plain engine (the same flags, no draft): the three are
up together and take ``--rounds`` turns, each sending the prompts once at concurrency 1, so a
change in the host's speed between engines (other tenants, the clock) falls on all three alike, and
each ratio is of their sums over the rounds. The concurrency table takes ``--rounds`` rounds too,
each the prompts once at concurrency 1, then ``--requests`` at every level: a level's row is its
median round, with every round's tokens/s, and ``vs_c1`` the median of the rounds' own ratios to
their concurrency 1. On a host where a request of 96 tokens takes 20 ms, one pass over 8 prompts
measured 0.2 s, and single passes on fresh engines were 10-15% apart with nothing changed (64
requests at concurrency 32 took 0.48 s).

Greedy output is compared, per prompt, against transformers' (and the concurrent runs against the
engine's own concurrency 1): in float32 it must be identical; in bfloat16 or float16 different
batch shapes round differently, so the agreement is reported as a fraction. Stdout gets one JSON
object (on a CPU with ``targets``: each ratio of ``TARGETS`` this run measured, its minimum and
whether it passed); progress, a short table and the targets missed go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from common import HOST, PROMPTS, Processes, free_port, machine, percentile, say, wait_until

H200_PEAK_GBPS = 4800.0  # HBM3e, NVIDIA's figure for the H200 SXM
LOAD_TIMEOUT = 600.0  # seconds for an engine to load and answer /health
#: Each engine's ``--kv-budget`` where three are up together (speculation side by side): a
#: concurrency-1 request needs its prompt and ``--tokens``, and on a GPU the default (most of the
#: free memory) would leave the second engine none
SIDE_BY_SIDE_KV_TOKENS = 16384


#: What the engine is held to on a CPU, as ratios from one run: batch 1 against transformers'
#: ``generate``; concurrency against the engine's own batch 1; ``--spec auto`` against plain
#: decoding on the demo pair and on the weaker draft; and, given ``--vllm``, tokens/s and mean
#: time to first token against vLLM's at the same concurrency.
TARGETS = {
    "batch1_vs_transformers": 1.0,
    "concurrency_vs_c1": {"8": 4.0, "32": 8.0},
    "spec_auto_vs_plain": {"demo_pair": 2.0, "weak_pair": 1.15},
    "vs_vllm": 1.0,
}


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """Each of ``TARGETS`` that this run measured: its value, its minimum, whether it passed;
    ``met``: all passed and greedy output was identical everywhere. For time to first token
    the value is vLLM's over the engine's (at least 1: the engine's first token comes as soon)."""

    def check(value: float, least: float) -> dict[str, Any]:
        return {"value": round(value, 3), "min": least, "pass": value >= least}

    out: dict[str, Any] = {
        "batch1_vs_transformers": check(
            report["batch1"]["engine_vs_transformers"], TARGETS["batch1_vs_transformers"]
        )
    }
    engine = report["concurrency"].get(engine_table(report["concurrency"]), {})
    for level, least in TARGETS["concurrency_vs_c1"].items():
        if level in engine:
            out[f"c{level}_vs_c1"] = check(engine[level]["vs_c1"], least)
    for pair, least in TARGETS["spec_auto_vs_plain"].items():
        auto = report["speculation"].get(pair, {}).get("auto")
        if auto is not None:
            out[f"{pair}_auto_vs_plain"] = check(auto["vs_plain"], least)
    vllm = report["concurrency"].get("vllm", {})
    for level, row in vllm.items():
        mine = engine.get(level)
        if mine is None or level == "1":
            continue
        out[f"c{level}_tokens_vs_vllm"] = check(
            mine["tokens_per_s"] / row["tokens_per_s"], TARGETS["vs_vllm"]
        )
        if mine["ttft_mean_ms"] > 0:
            out[f"c{level}_ttft_vllm_over_engine"] = check(
                row["ttft_mean_ms"] / mine["ttft_mean_ms"], TARGETS["vs_vllm"]
            )
    identical = report["equality"]["all_identical"]
    out["greedy_identical"] = identical
    out["met"] = identical and all(v["pass"] for v in out.values() if isinstance(v, dict))
    out["missed"] = sorted(k for k, v in out.items() if isinstance(v, dict) and not v["pass"])
    return out


def engine_table(concurrency: dict[str, Any]) -> str:
    """The engine's concurrency table that speculation and the targets are measured against:
    prefix caching off where that ran, else on (``--prefix-caching on``; a ``--vllm`` server
    should then cache prefixes too)."""
    return "engine" if "engine" in concurrency else "engine_prefix_caching"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/engine.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--model", default="demo", help="served model (default: demo)")
    parser.add_argument(
        "--draft-model", help="its draft (default with --model demo: the demo's distilled draft)"
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="auto: float32 on CPU, bfloat16 on CUDA (where only float32 gives exact equality)",
    )
    parser.add_argument("--tokens", type=int, default=96, help="greedy tokens a request (96)")
    parser.add_argument(
        "--prompts", type=int, default=8, help="distinct prompts; batch-1 runs send each once (8)"
    )
    parser.add_argument(
        "--requests", type=int, default=64, help="requests at each concurrency above 1 (64)"
    )
    parser.add_argument(
        "--concurrency", default="8,32", help="concurrent clients, besides 1 (8,32)"
    )
    parser.add_argument(
        "--prefix-caching",
        default="off",
        choices=("off", "on", "both"),
        help="the engine's prefix caching; both adds the concurrency table with it on (off)",
    )
    parser.add_argument(
        "--attention",
        default="fast",
        choices=("fast", "exact"),
        help="the engine's --attention (fast: its CPU decode kernel; exact: transformers')",
    )
    parser.add_argument(
        "--max-batch-size", help="engine's --max-batch-size (N or auto; default: its own, auto)"
    )
    parser.add_argument(
        "--stall",
        action="store_true",
        help="only the decode-stall check: 8 streams decoding, then one --stall-prompt-token"
        " prompt, with chunked prefill (--max-num-batched-tokens auto) and without",
    )
    parser.add_argument("--stall-prompt-tokens", type=int, default=1500, help="(1500)")
    parser.add_argument("--threads", type=int, help="torch CPU threads, here and in engines")
    parser.add_argument(
        "--fused-threads", choices=("1", "2", "auto"), help="the engines' --fused-threads"
    )
    parser.add_argument(
        "--weak-agreement",
        type=float,
        default=0.69,
        help="how often the weaker draft's argmax is the target's greedy token; the script finds"
        " the noise that gives it (0.69: the 2-layer draft the engine's targets name)",
    )
    parser.add_argument(
        "--weak-noise",
        type=float,
        help="the weaker draft's noise, given instead of found from --weak-agreement",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="rounds of the concurrency table (the prompts at concurrency 1, then --requests at"
        " each level; each level's median round reported) and passes over the prompts at"
        " concurrency 1 taken in turns by the engines compared side by side (5)",
    )
    parser.add_argument("--no-spec", action="store_true", help="skip the speculation runs")
    parser.add_argument("--vllm", metavar="URL", help="a running vLLM OpenAI server to compare")
    parser.add_argument(
        "--peak-bandwidth",
        type=float,
        default=H200_PEAK_GBPS,
        metavar="GBPS",
        help=f"the GPU's memory bandwidth, for batch-1 decode's share of it ({H200_PEAK_GBPS:g})",
    )
    parser.add_argument("--workdir", type=Path, help="logs and the weaker draft (default: temp)")
    parser.add_argument(
        "--out-of-step",
        action="store_true",
        help="client k of c first asks for 1 + k * tokens // c tokens, so the clients' requests"
        " end at different steps and prompts join a running batch",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 prompts, 8 requests")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.requests, args.tokens = 2, 8, min(args.tokens, 24)
        args.concurrency, args.rounds = "4", 1
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    try:
        args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--concurrency: not a list of integers: {args.concurrency!r}")
    if any(c < 2 for c in args.levels):
        parser.error("--concurrency: levels above 1 (concurrency 1 always runs)")
    if args.model != "demo" and not args.draft_model and not args.no_spec:
        parser.error("--draft-model is required unless --model demo (or --no-spec)")
    return args


# -- the models ------------------------------------------------------------------------------------


def resolve_models(args: argparse.Namespace) -> tuple[Path, Path | None]:
    if args.model == "demo":
        from flockctl.engine.demo import ensure_demo

        say("finding or building the demo pair")
        demo = ensure_demo(progress=False)
        draft = demo.draft if args.draft_model in (None, "demo") else Path(args.draft_model)
        return demo.target, None if args.no_spec else draft
    return Path(args.model), Path(args.draft_model) if args.draft_model else None


def build_weak_draft(draft: Path, path: Path, noise: float, seed: int = 7) -> Path:
    """A copy of ``draft`` (tokenizer files too) whose weights carry Gaussian noise."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(draft, path, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(draft, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * noise * p.std())
    model.save_pretrained(path)
    return path


def weak_draft_for(
    draft: Path,
    path: Path,
    agreement: float,
    prompts: list[list[int]],
    continuations: list[list[int]],
    device: str,
    dtype: Any,
) -> float:
    """Build at ``path`` the weaker draft whose greedy agreement (:func:`greedy_agreement`) is
    nearest ``agreement``: the noise by bisection (more noise, less agreement), stopping within
    0.02 or after 8 builds. Returns its noise."""
    low, high = 0.0, 1.0
    best: tuple[float, float] | None = None  # (noise, its agreement)
    for _ in range(8):
        noise = (low + high) / 2
        build_weak_draft(draft, path, noise)
        got = greedy_agreement(path, prompts, continuations, device, dtype)
        if best is None or abs(got - agreement) < abs(best[1] - agreement):
            best = (noise, got)
        if abs(got - agreement) <= 0.02:
            break
        low, high = (noise, high) if got > agreement else (low, noise)
    assert best is not None
    if best[0] != noise:
        build_weak_draft(draft, path, best[0])
    say(f"weaker draft: noise {best[0]:.4g}, greedy agreement {best[1]}")
    return best[0]


def greedy_agreement(
    draft: Path, prompts: list[list[int]], continuations: list[list[int]], device: str, dtype: Any
) -> float:
    """How often ``draft``'s argmax is the target's greedy next token, fed the target's greedy
    ``continuations`` of ``prompts`` (teacher forcing: every position counts once, whatever the
    draft got wrong before it). The acceptance a one-token chain can reach."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(draft, dtype=dtype).to(device).eval()
    hits = total = 0
    with torch.inference_mode():
        for prompt, ids in zip(prompts, continuations, strict=True):
            fed = torch.tensor([prompt + ids[:-1]], device=device)
            picks = model(fed).logits[0, len(prompt) - 1 :].argmax(dim=-1).tolist()
            hits += sum(a == b for a, b in zip(picks, ids, strict=True))
            total += len(ids)
    del model
    return round(hits / total, 3) if total else 0.0


def describe_model(path: Path, dtype: Any) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    size = torch.empty((), dtype=dtype).element_size()
    return {
        "path": str(path),
        "type": config.model_type,
        "layers": getattr(config, "num_hidden_layers", None),
        "hidden": getattr(config, "hidden_size", None),
        "parameters": params,
        "weight_bytes": params * size,
    }


def pick(device: str, dtype: str) -> tuple[str, str]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        if device == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    return device, dtype


# -- transformers -------------------------------------------------------------------------------


def transformers_generate(
    path: Path, prompts: list[list[int]], new: int, device: str, dtype: str
) -> tuple[float, list[list[int]]]:
    """Batch 1, greedy, KV cache; one warm-up prompt first. Seconds and each one's tokens."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    model.eval()
    gen = model.generation_config
    pad = gen.pad_token_id if gen.pad_token_id is not None else gen.eos_token_id
    gen.eos_token_id = None  # like the engine's ignore_eos: exactly ``new`` tokens each
    gen.pad_token_id = pad if pad is not None else 0

    def one(prompt: list[int], n: int) -> list[int]:
        ids = torch.tensor([prompt], dtype=torch.long, device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            use_cache=True,
        )
        return out[0, ids.shape[1] :].tolist()

    outputs = []
    with torch.inference_mode():
        one(prompts[0], min(new, 8))
        sync(device)
        start = time.perf_counter()
        for prompt in prompts:
            outputs.append(one(prompt, new))
        sync(device)
        elapsed = time.perf_counter() - start
    return elapsed, outputs


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# -- HTTP clients ----------------------------------------------------------------------------------


@dataclass
class Run:
    """One concurrency level against one server."""

    concurrency: int
    tokens: int
    seconds: float
    ttfts: list[float]
    latencies: list[float]
    texts: list[str] = field(repr=False)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        p99 = percentile(lat, 99)
        return {
            "concurrency": self.concurrency,
            "requests": len(self.texts),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "ttft_mean_ms": round(statistics.fmean(self.ttfts) * 1000, 1),
            "latency_p50_ms": round(statistics.median(lat) * 1000, 1),
            "latency_p99_ms": round(p99 * 1000, 1) if p99 is not None else None,
            "seconds": round(self.seconds, 3),
        }


def texts_of(runs: list[Run]) -> list[str]:
    """Every completion of ``runs``, round after round."""
    return [text for run in runs for text in run.texts]


def median_round(runs: list[Run], ones: list[Run]) -> dict[str, Any]:
    """The summary of the round of median tokens/s (the lower middle of an even count), with
    every round's tokens/s; above concurrency 1, ``vs_c1``: the median of each round's tokens/s
    over its own round's at concurrency 1."""
    order = sorted(range(len(runs)), key=lambda i: runs[i].tokens_per_s)
    row = runs[order[(len(runs) - 1) // 2]].summary()
    row["rounds_tokens_per_s"] = [round(run.tokens_per_s, 1) for run in runs]
    if runs is not ones:
        ratios = [run.tokens_per_s / one.tokens_per_s for run, one in zip(runs, ones, strict=True)]
        row["vs_c1"] = round(statistics.median(ratios), 3)
    return row


async def served_model(http: aiohttp.ClientSession, base: str) -> str:
    async with http.get(base + "/v1/models") as resp:
        resp.raise_for_status()
        return str((await resp.json())["data"][0]["id"])


async def complete(
    http: aiohttp.ClientSession, base: str, model: str, prompt: list[int], new: int
) -> tuple[float, float, str]:
    """One streamed greedy completion: time to first token, latency, text."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": new,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    start = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []
    async with http.post(base + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{base} answered {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"{base} failed a request: {event['error']}")
            for choice in event.get("choices", ()):
                if choice.get("text") and first is None:
                    first = time.perf_counter()
                pieces.append(choice.get("text") or "")
    end = time.perf_counter()
    return (first or end) - start, end - start, "".join(pieces)


async def load(
    base: str,
    prompts: list[list[int]],
    requests: int,
    concurrency: int,
    new: int,
    out_of_step: bool = False,
) -> Run:
    """``requests`` completions (the prompts in turn) through ``concurrency`` clients; with
    ``out_of_step`` (see the module docstring) each client leads with a shorter request first."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        model = await served_model(http, base)
        await complete(http, base, model, prompts[0], min(new, 8))  # warm-up
        queue = list(range(requests))
        results: list[tuple[float, float, str]] = [(0.0, 0.0, "")] * requests

        lead = [1 + k * new // concurrency if out_of_step else 0 for k in range(concurrency)]

        async def client(k: int) -> None:
            if lead[k]:
                await complete(http, base, model, prompts[k % len(prompts)], lead[k])
            while queue:
                i = queue.pop(0)
                results[i] = await complete(http, base, model, prompts[i % len(prompts)], new)

        start = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(concurrency)))
        seconds = time.perf_counter() - start
    return Run(
        concurrency,
        requests * new + sum(lead),
        seconds,
        [r[0] for r in results],
        [r[1] for r in results],
        [r[2] for r in results],
    )


async def stats(base: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(base + "/stats") as resp:
        resp.raise_for_status()
        return dict(await resp.json())


# -- engines ---------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def engine_server(
    procs: Processes,
    name: str,
    args: argparse.Namespace,
    model: Path,
    extra: list[str],
    caching: str = "off",
) -> Any:
    """A ``flockctl engine serve`` on a free port, until the block ends; yields its URL."""
    port = free_port()
    argv = [
        sys.executable, "-m", "flockctl", "engine", "serve",
        "--model", str(model), "--host", HOST, "--port", str(port),
        "--device", args.device, "--dtype", args.dtype, "--seed", "0",
        "--prefix-caching", caching, "--attention", args.attention, *extra,
    ]  # fmt: skip
    if args.max_batch_size:
        argv += ["--max-batch-size", str(args.max_batch_size)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.fused_threads:
        argv += ["--fused-threads", args.fused_threads]
    base = f"http://{HOST}:{port}"
    say(f"starting engine {name}")
    proc = procs.start(name, argv)

    async def healthy() -> bool:
        async with aiohttp.ClientSession() as http, http.get(base + "/health") as resp:
            return resp.status == 200

    try:
        await wait_until(healthy, f"engine {name}", LOAD_TIMEOUT, procs)
        yield base
    finally:
        procs.forget(proc.pid)
        with contextlib.suppress(Exception):
            proc.terminate()
            proc.wait(30)


async def arrivals(
    http: aiohttp.ClientSession, base: str, model: str, prompt: list[int], new: int
) -> list[float]:
    """One streamed greedy completion: when each piece of text arrived (perf_counter)."""
    body = {"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    marks: list[float] = []
    async with http.post(base + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                marks.append(time.perf_counter())
    return marks


async def stall_check(args: argparse.Namespace, workdir: Path, target: Path) -> dict[str, Any]:
    """How long a long prompt's prefill holds up jobs already decoding: 8 streams decode, then
    one prompt of ``--stall-prompt-tokens`` arrives. Reported per setting: that prompt's time to
    first token and the longest gap between two pieces of any decoding stream from its arrival
    until its first token (and the decode streams' median gap before it, for scale)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    short = [tokenizer.encode(p) for p in PROMPTS[:8]]
    long = [t for p in PROMPTS * 200 for t in tokenizer.encode(p)][: args.stall_prompt_tokens]
    procs = Processes(workdir)
    out: dict[str, Any] = {"prompt_tokens": len(long), "decoding": len(short)}
    settings = {"chunked": ["--max-num-batched-tokens", "auto"],
                "whole": ["--max-num-batched-tokens", str(4 * len(long))]}  # fmt: skip
    try:
        for name, extra in settings.items():
            async with engine_server(procs, f"stall-{name}", args, target, extra) as base:
                timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
                async with aiohttp.ClientSession(timeout=timeout) as http:
                    model = await served_model(http, base)
                    await arrivals(http, base, model, short[0], 4)  # warm-up
                    streams = [
                        asyncio.ensure_future(arrivals(http, base, model, p, 400)) for p in short
                    ]
                    await asyncio.sleep(0)
                    while (await stats(base))["running"] < len(short):
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(1.0)  # all of them decoding for a while
                    sent = time.perf_counter()
                    first = (await arrivals(http, base, model, long, 1))[0]
                    marks = await asyncio.gather(*streams)
                gaps_during = [
                    b - a for m in marks for a, b in itertools.pairwise(m) if b > sent and a < first
                ]
                gaps_before = [b - a for m in marks for a, b in itertools.pairwise(m) if b < sent]
                out[name] = {
                    "long_prompt_ttft_ms": round((first - sent) * 1000, 1),
                    "decode_stall_max_ms": round(max(gaps_during, default=0.0) * 1000, 1),
                    "decode_gap_median_before_ms": round(statistics.median(gaps_before) * 1000, 1),
                }
                say(f"stall {name}: {out[name]}")
    finally:
        procs.stop_all()
    return out


def compare(reference: list[str], texts: list[str]) -> dict[str, Any]:
    """Per prompt ``i % len(reference)``: all identical? the fraction that is; the first not."""
    same = [t == reference[i % len(reference)] for i, t in enumerate(texts)]
    first = next((i % len(reference) for i, ok in enumerate(same) if not ok), None)
    return {
        "identical": all(same),
        "agreement": round(sum(same) / len(same), 4),
        "first_differing_prompt": first,
    }


def spec_summary(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    if not after:
        return {}
    before = before or {}
    steps = after["num_drafts"] - before.get("num_drafts", 0)
    drafted = after["num_draft_tokens"] - before.get("num_draft_tokens", 0)
    accepted = after["num_accepted_tokens"] - before.get("num_accepted_tokens", 0)
    return {
        "steps": steps,
        "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
        "mean_accepted_length": round(1 + accepted / steps, 4) if steps else None,
        # what the engine's policy decided, and why (the keys /stats has today, and any new ones)
        "policy": {k: v for k, v in after.items() if not k.startswith("num_")},
    }


async def side_by_side(
    procs: Processes,
    args: argparse.Namespace,
    target: Path,
    prompts: list[list[int]],
    draft: Path,
    reference: list[str],
    equality: dict[str, dict[str, Any]],
    pair: str,
) -> dict[str, Any]:
    """A plain engine, ``--spec on`` and ``--spec auto`` with ``draft``, up together, taking
    ``--rounds`` turns at concurrency 1 (the order rotating each round): each mode's tokens/s
    over its rounds, the speculative ones against plain."""
    budget = ["--kv-budget", str(SIDE_BY_SIDE_KV_TOKENS)]  # three engines share the device
    flags = {
        "plain": budget,
        "on": ["--draft-model", str(draft), "--spec", "on", *budget],
        "auto": ["--draft-model", str(draft), "--spec", "auto", *budget],
    }
    runs: dict[str, list[Run]] = {mode: [] for mode in flags}
    async with contextlib.AsyncExitStack() as stack:
        bases = {
            mode: await stack.enter_async_context(
                engine_server(procs, f"{pair}_spec_{mode}", args, target, extra)
            )
            for mode, extra in flags.items()
        }
        before = {mode: (await stats(bases[mode])).get("speculation") for mode in ("on", "auto")}
        modes = list(flags)
        for r in range(args.rounds):
            for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
                runs[mode].append(await load(bases[mode], prompts, len(prompts), 1, args.tokens))
        after = {mode: (await stats(bases[mode])).get("speculation") for mode in ("on", "auto")}

    def rate(mode: str) -> float:
        return sum(run.tokens for run in runs[mode]) / sum(run.seconds for run in runs[mode])

    plain = rate("plain")
    out: dict[str, Any] = {"plain_tokens_per_s": round(plain, 1), "rounds": args.rounds}
    for mode in ("on", "auto"):
        tps = rate(mode)
        out[mode] = {
            "tokens_per_s": round(tps, 1),
            "vs_plain": round(tps / plain, 3),
            "rounds_vs_plain": [
                round((s.tokens / s.seconds) / (p.tokens / p.seconds), 3)
                for s, p in zip(runs[mode], runs["plain"], strict=True)
            ],
            **spec_summary(before[mode], after[mode]),
        }
        texts = [text for run in runs[mode] for text in run.texts]
        equality[f"{pair}_spec_{mode}_vs_transformers"] = compare(reference, texts)
        say(f"{pair} --spec {mode}: {tps:.0f} tokens/s ({tps / plain:.2f}x plain beside it)")
    texts = [text for run in runs["plain"] for text in run.texts]
    equality[f"{pair}_plain_vs_transformers"] = compare(reference, texts)
    return out


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoTokenizer

    from flockctl.engine.text import TextStream

    transformers.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device, args.dtype = pick(args.device, args.dtype)
    target, draft = resolve_models(args)
    if args.stall:
        return {"bench": "engine-stall", "machine": machine(), "device": args.device,
                "stall": await stall_check(args, workdir, target)}  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(target)
    prompts = [tokenizer.encode(p) for p in (PROMPTS * 4)[: args.prompts]]
    new = args.tokens
    dtype = getattr(torch, args.dtype)
    exact = args.dtype == "float32"

    def text(prompt: list[int], ids: list[int]) -> str:
        stream = TextStream(tokenizer, prompt)
        return stream.push(ids) + stream.finish()

    models: dict[str, Any] = {"target": describe_model(target, dtype)}
    say(f"transformers generate on {args.device} in {args.dtype}, batch 1")
    hf_seconds, hf_ids = transformers_generate(target, prompts, new, args.device, args.dtype)
    if args.device == "cuda":
        torch.cuda.empty_cache()  # the engines size their KV caches from free memory
    pairs: dict[str, Path] = {}
    if draft is not None and not args.no_spec:
        weak = workdir / "weak-draft"
        if args.weak_noise is None:
            args.weak_noise = weak_draft_for(
                draft, weak, args.weak_agreement, prompts, hf_ids, args.device, dtype
            )
        else:
            build_weak_draft(draft, weak, args.weak_noise)
        models["draft"] = describe_model(draft, dtype)
        models["weak_draft"] = {
            **describe_model(weak, dtype),
            "what": f"the draft with Gaussian noise of {args.weak_noise:.4g} times each weight"
            " tensor's standard deviation added (seed 7)",
        }
        pairs = {"demo_pair" if args.model == "demo" else "given_pair": draft, "weak_pair": weak}
    reference = [text(p, ids) for p, ids in zip(prompts, hf_ids, strict=True)]
    hf_tps = len(prompts) * new / hf_seconds
    say(f"transformers: {hf_tps:.0f} tokens/s")
    agreement = {
        pair: greedy_agreement(path, prompts, hf_ids, args.device, dtype)
        for pair, path in pairs.items()
    }
    for pair, share in agreement.items():
        say(f"{pair}: the draft picks the target's greedy token at {share:.0%} of positions")

    procs = Processes(workdir)
    concurrency: dict[str, dict[str, Any]] = {}
    equality: dict[str, dict[str, Any]] = {}
    spec: dict[str, dict[str, Any]] = {}
    engine_info: dict[str, Any] = {}

    async def table(name: str, base: str) -> None:
        """``--rounds`` rounds, each concurrency 1 on the prompts once, then every level on
        ``--requests``: each level's row is its median round (by tokens/s), ``vs_c1`` the median
        of each round's ratio to that round's concurrency 1, so a change in the host's speed
        between rounds falls on both sides of a ratio."""
        runs: dict[int, list[Run]] = {level: [] for level in (1, *args.levels)}
        for r in range(args.rounds):
            for level in runs:
                requests = len(prompts) if level == 1 else args.requests
                out_of_step = args.out_of_step and level > 1
                runs[level].append(await load(base, prompts, requests, level, new, out_of_step))
            say(
                f"{name} round {r + 1}/{args.rounds}: "
                + ", ".join(f"c={lv} {rs[-1].tokens_per_s:.0f}" for lv, rs in runs.items())
                + " tokens/s"
            )
        ones = runs[1]
        rows = {str(level): median_round(rs, ones) for level, rs in runs.items()}
        equality[f"{name}_c1_vs_transformers"] = compare(reference, texts_of(ones))
        for level in args.levels:  # request i completes prompt i % len(prompts) everywhere
            equality[f"{name}_c{level}_vs_c1"] = compare(ones[0].texts, texts_of(runs[level]))
            row = rows[str(level)]
            say(
                f"{name} c={level}: {row['tokens_per_s']} tokens/s ({row['vs_c1']}x c=1), mean"
                f" TTFT {row['ttft_mean_ms']} ms, p99 {row['latency_p99_ms']} ms (median round)"
            )
        concurrency[name] = rows

    try:
        caching = {"off": ["off"], "on": ["on"], "both": ["off", "on"]}[args.prefix_caching]
        for mode in caching:
            name = "engine" if mode == "off" else "engine_prefix_caching"
            async with engine_server(procs, name, args, target, [], mode) as base:
                await table(name, base)
                if not engine_info:
                    s = await stats(base)
                    engine_info = {
                        "max_batch_size": s.get("max_batch_size"),
                        "dtype": s.get("dtype"),
                        "device": s.get("device"),
                        "kv_budget_tokens": (s.get("kv") or {}).get("budget_tokens"),
                        "fused_threads": s.get("fused_threads"),
                    }
        for pair, draft_path in pairs.items():
            spec[pair] = await side_by_side(
                procs, args, target, prompts, draft_path, reference, equality, pair
            )
            spec[pair]["greedy_agreement"] = agreement[pair]
        if args.vllm:
            base = args.vllm.rstrip("/")
            say(f"vLLM at {base}")
            await table("vllm", base)
    finally:
        procs.stop_all()

    engine_c1 = concurrency[engine_table(concurrency)]["1"]["tokens_per_s"]
    report: dict[str, Any] = {
        "bench": "engine",
        "machine": {
            **machine(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # others' work adds noise
        },
        "device": args.device,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "models": models,
        "engine": engine_info,
        "settings": {
            "prompts": len(prompts),
            "new_tokens": new,
            "requests": args.requests,
            "concurrency": [1, *args.levels],
            "prefix_caching": args.prefix_caching,
            "attention": args.attention,
            "max_batch_size": args.max_batch_size,
            "threads": args.threads,
            "fused_threads": args.fused_threads or "auto",
            "quick": args.quick,
            "out_of_step": args.out_of_step,
            "rounds": args.rounds,
        },
        "batch1": {
            "transformers_tokens_per_s": round(hf_tps, 1),
            "engine_tokens_per_s": engine_c1,
            "engine_vs_transformers": round(engine_c1 / hf_tps, 3),
        },
        "concurrency": concurrency,
        "speculation": spec,
        "equality": {
            "exact_expected": exact,
            "all_identical": all(e["identical"] for e in equality.values()),
            "comparisons": equality,
        },
    }
    if args.device == "cpu":  # the targets are a CPU's
        report["targets"] = targets(report)
    if args.device == "cuda":
        weight = models["target"]["weight_bytes"]
        peak = args.peak_bandwidth * 1e9
        report["bandwidth"] = {
            "peak_gbps": args.peak_bandwidth,
            "weight_bytes": weight,
            "engine_batch1_fraction": round(weight * engine_c1 / peak, 5),
            "transformers_batch1_fraction": round(weight * hf_tps / peak, 5),
        }
    return report


def print_table(report: dict[str, Any]) -> None:
    if "stall" in report:
        return  # its lines went to stderr as it ran
    b = report["batch1"]
    lines = [
        f"transformers generate batch 1: {b['transformers_tokens_per_s']} tokens/s;"
        f" engine {b['engine_tokens_per_s']} ({b['engine_vs_transformers']}x)",
        f"{'server':<24}{'c':>4}{'tok/s':>10}{'vs c=1':>8}{'TTFT ms':>10}{'p99 ms':>10}",
    ]
    for name, rows in report["concurrency"].items():
        for level, row in rows.items():
            lines.append(
                f"{name:<24}{level:>4}{row['tokens_per_s']:>10}{row.get('vs_c1', 1.0):>8}"
                f"{row['ttft_mean_ms']:>10}{row['latency_p99_ms']:>10}"
            )
    for pair, modes in report["speculation"].items():
        for mode in ("on", "auto"):
            m = modes[mode]
            lines.append(
                f"{pair} --spec {mode}: {m['tokens_per_s']} tokens/s ({m['vs_plain']}x plain),"
                f" acceptance {m.get('acceptance_rate')}"
            )
    eq = report["equality"]
    lines.append(f"greedy output identical everywhere: {eq['all_identical']}")
    if "targets" in report:
        missed = report["targets"]["missed"]
        lines.append(
            "targets: all met" if report["targets"]["met"] else f"targets missed: {missed}"
        )
    if "bandwidth" in report:
        lines.append(
            f"batch-1 decode reaches {report['bandwidth']['engine_batch1_fraction']:.2%} of"
            f" {report['bandwidth']['peak_gbps']:g} GB/s"
        )
    for line in lines:
        print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = args.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-engine-")))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            report = asyncio.run(bench(args, workdir))
        except KeyboardInterrupt:
            say("interrupted")
            return 130
        except (RuntimeError, OSError, ValueError, aiohttp.ClientError) as exc:
            where = f" (logs in {workdir})" if args.workdir else ""
            say(f"failed: {exc or type(exc).__name__}{where}")
            return 1
    report["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(report, indent=2))
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

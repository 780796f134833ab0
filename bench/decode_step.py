"""The engine's compiled decode step alone, with no server, scheduler or Python between steps:
how many tokens a second this host's cores and memory allow at each batch size and history.

    python bench/decode_step.py                  # the demo target, about a minute on 2 CPU cores
    python bench/decode_step.py --quick          # a smoke run
    python bench/decode_step.py --model M --jobs 1,4,8,16,32 --history 64,256,1024

``bench/engine.py`` measures the engine served; this measures the ceiling under it. Each
(history, jobs) pair is a batch of ``jobs`` greedy jobs, each with ``history`` positions of keys
and values in the KV pool already, running runs of ``--steps`` decode steps through
``fused_forward._decode``, the compiled loop the engine runs them with (``greedy_run``), split
over ``--threads`` threads as the engine splits them (whole jobs each side; one job never
splits). The pool has the engine's layout, ``[layers, slots, kv_heads, head_dim]`` in blocks of
``--block-size``; a job's blocks alternate with the other jobs' (``--blocks interleaved``, as
jobs that grow together take them from the engine's pool) or follow each other
(``contiguous``). Its contents are seeded noise (the arithmetic and the bytes read are a real
history's; the tokens picked are not meaningful).

Every configuration runs once a round, ``--rounds`` rounds, so a change in the host's speed falls
on all alike; each reports its median round, and ``vs_one_job`` is the median of each round's
ratio to one job at the same history: what batching adds to the engine's own batch 1 in the
compiled step, with nothing around it (``bench/engine.py``'s ``c8_vs_c1`` and ``c32_vs_c1`` are
the same ratios served, where batch 1 also pays each request's prefill and HTTP, a larger share of
its time than at 8 or 32 streams: served ratios can come out a little above these, not far).
``bytes_per_step`` is what a step reads at least (its keys and values, and the
weights once), ``gb_per_s`` that over the step's time; ``memory`` is one thread's (and two
threads') read rate over arrays of ``--memory-mb`` sizes, so a step whose rate is near the
rate of arrays of its size waits on memory, not on arithmetic.

Prints one JSON object on stdout and a table on stderr. Exit codes: 0 done, 1 the model does not
load or the compiled forward cannot serve it here (numba missing, not a float32 Llama on a CPU),
2 bad flags.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from common import machine, say


def positive_list(text: str) -> list[int]:
    """``"1,8,32"`` as ``[1, 8, 32]``; every item a positive integer."""
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"needs positive integers: {text!r}")
    return sorted(set(values))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="decode_step.py",
        description="The compiled decode step alone: tokens/s by batch size and history.",
    )
    parser.add_argument(
        "--model", default="demo", help="a local Llama directory, or 'demo' (built if missing)"
    )
    parser.add_argument("--jobs", type=positive_list, default=[1, 8, 32], help="batch sizes")
    parser.add_argument(
        "--history", type=positive_list, default=[64, 512], help="positions already cached a job"
    )
    parser.add_argument(
        "--threads", type=int, choices=(1, 2), default=None,
        help="threads a batch is split over (default: 2 where there are 2 cores, as the engine)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=16, help="decode steps a compiled call")
    parser.add_argument("--rounds", type=int, default=5, help="rounds over every configuration")
    parser.add_argument("--block-size", type=int, default=16, help="the pool's block size")
    parser.add_argument("--blocks", choices=("interleaved", "contiguous"), default="interleaved")
    parser.add_argument(
        "--memory-mb", type=str, default="1,4,16,64,256",
        help="array sizes for the memory read rate ('' to skip)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: small and one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs, args.history, args.rounds, args.memory_mb = [1, 4], [32], 1, "1,16"
    if args.steps < 1 or args.rounds < 1 or args.block_size < 1:
        parser.error("--steps, --rounds and --block-size take positive integers")
    try:
        args.memory_mb = positive_list(args.memory_mb) if args.memory_mb.strip() else []
    except argparse.ArgumentTypeError as exc:
        parser.error(f"--memory-mb: {exc}")
    return args


def load_model(name: str) -> tuple[Any, Path]:
    """The float32 model (demo: found or built); exits 1 where it does not load or the compiled
    forward cannot serve it."""
    import torch
    from transformers import AutoModelForCausalLM

    from flockctl.engine import fused_forward

    if name == "demo":
        from flockctl.engine.demo import ensure_demo

        say("finding or building the demo pair")
        path = ensure_demo(progress=False).target
    else:
        path = Path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    except (OSError, ValueError) as exc:  # no such directory, no model there, an unknown type
        say(f"cannot load {path}: {exc}")
        raise SystemExit(1) from None
    if not fused_forward.usable(model, torch.float32, torch.device("cpu")):
        say(f"the compiled forward cannot serve {path} here (numba, a float32 Llama on a CPU)")
        raise SystemExit(1)
    return model, path


class Batch:
    """One (history, jobs) configuration: its block tables over a shared pool and the arrays
    of a run of decode steps."""

    def __init__(self, jobs: int, history: int, steps: int, blocks: list[list[int]]) -> None:
        self.jobs, self.history, self.steps = jobs, history, steps
        self.tables = np.array(blocks, dtype=np.int64)
        self.first = (np.arange(jobs, dtype=np.int64) * 7 + 3) % 100 + 1
        self.roots = np.full(jobs, history - 1, dtype=np.int64)  # fed after position history-1
        self.step_counts = np.full(jobs, steps, dtype=np.int64)
        self.stops = np.full((jobs, 1), -1, dtype=np.int64)  # none: every run makes its steps
        self.picks = np.zeros((jobs, steps), dtype=np.int64)
        self.made = np.zeros(jobs, dtype=np.int64)


def block_tables(jobs: int, blocks_each: int, first: int, layout: str) -> list[list[int]]:
    """Each job's blocks from block ``first`` on: alternating between jobs (interleaved) or
    each job's in a row (contiguous)."""
    if layout == "interleaved":
        return [[first + b * jobs + j for b in range(blocks_each)] for j in range(jobs)]
    return [[first + j * blocks_each + b for b in range(blocks_each)] for j in range(jobs)]


def read_rate(sizes_mb: list[int], rounds: int) -> dict[str, Any]:
    """GB/s of a compiled sum over float32 arrays of each size, one thread (the best of a few
    passes); two threads each over its own array of the largest size."""
    import numba

    from flockctl.engine.decode_attention import FASTMATH

    @numba.njit(nogil=True, fastmath=FASTMATH, cache=False)
    def total(a: np.ndarray, passes: int) -> float:  # pragma: no cover - compiled
        s = np.float32(0.0)
        for _ in range(passes):
            for i in range(a.shape[0]):
                s += a[i]
        return s

    def rate(a: np.ndarray) -> float:
        passes = max(1, (256 << 20) // a.nbytes)
        best = float("inf")
        for _ in range(max(3, rounds)):
            start = time.perf_counter()
            total(a, passes)
            best = min(best, time.perf_counter() - start)
        return a.nbytes * passes / best / 1e9

    one: dict[str, float] = {}
    for mb in sizes_mb:
        a = np.ones((mb << 20) // 4, dtype=np.float32)
        total(a[:16], 1)
        one[str(mb)] = round(rate(a), 1)
    out: dict[str, Any] = {"one_thread_gb_per_s": one}
    if sizes_mb:
        mb = max(sizes_mb)
        arrays = [np.ones((mb << 20) // 4, dtype=np.float32) for _ in range(2)]
        with ThreadPoolExecutor(2) as pool:
            rates = list(pool.map(rate, arrays))
        out["two_threads_gb_per_s"] = {str(mb): round(sum(rates), 1)}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from flockctl.engine.fused_forward import FusedLlama

    torch.set_num_threads(1)  # as the engine serving fused: one torch thread, the split its own
    threads = args.threads or min(2, os.cpu_count() or 1)
    model, path = load_model(args.model)
    fused = FusedLlama(model, threads=threads)
    layers = fused.weights[2].shape[0]
    kv_heads, dim, bs = fused.kv_heads, fused.head_dim, args.block_size

    # one pool for every configuration, as large as the largest one needs (block 0: scratch)
    per_job = {h: -(-(h + args.steps) // bs) for h in args.history}
    need = max(j * per_job[h] for j in args.jobs for h in args.history)
    shape = (layers, (1 + need) * bs, kv_heads, dim)
    say(f"pool of {need} blocks: {2 * np.prod(shape) * 4 / 1e6:.0f} MB of keys and values")
    rng = np.random.default_rng(args.seed)
    keys = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * np.float32(0.5))
    values = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * np.float32(0.5))
    stores = fused.arrays(keys, values)

    batches = [
        Batch(j, h, args.steps, block_tables(j, per_job[h], 1, args.blocks))
        for h in args.history
        for j in args.jobs
    ]

    split: dict[int, bool] = {}  # whether the engine splits a step of that many jobs

    def step_seconds(batch: Batch) -> float:
        """One compiled run of the batch, split as the engine splits it; seconds a step."""
        splits = fused.split_forwards
        start = time.perf_counter()
        fused.decode(
            batch.first, batch.roots, batch.step_counts, batch.stops, np.zeros(1, np.int8),
            batch.tables, bs, stores, batch.picks, batch.made,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        split[batch.jobs] = fused.split_forwards > splits
        if int(batch.made.min()) != args.steps:  # no stop tokens: every job makes every step
            raise RuntimeError(f"a run made {batch.made.tolist()} steps of {args.steps}")
        return seconds / args.steps

    say("compiling (or loading) the decode loop")
    for batch in batches:
        step_seconds(batch)
    times: dict[tuple[int, int], list[float]] = {(b.history, b.jobs): [] for b in batches}
    for r in range(args.rounds):
        say(f"round {r + 1} of {args.rounds}")
        for batch in batches:
            # repeat small configurations to about 20 ms, so a round of each weighs alike
            once = step_seconds(batch)
            repeats = max(1, min(50, int(0.02 / (once * args.steps))))
            best = min([once] + [step_seconds(batch) for _ in range(repeats - 1)])
            times[(batch.history, batch.jobs)].append(best)
    fused.close()

    kv_token_bytes = layers * 2 * kv_heads * dim * 4  # a position's keys and values, all layers
    # the weights a step reads whole: all but the embedding table (a row a token)
    weight_bytes = sum(int(w.nbytes) for w in fused.weights[1:] if isinstance(w, np.ndarray))
    rows = []
    for batch in batches:
        mine = times[(batch.history, batch.jobs)]
        alone = times.get((batch.history, 1))
        step = statistics.median(mine)
        # the keys and values a step reads: every job's history, growing through the run
        kv = batch.jobs * (batch.history + (args.steps + 1) / 2) * kv_token_bytes
        row: dict[str, Any] = {
            "history": batch.history,
            "jobs": batch.jobs,
            "threads": 2 if split[batch.jobs] else 1,
            "ms_per_step": round(step * 1e3, 6),
            "rounds_ms_per_step": [round(t * 1e3, 6) for t in mine],
            "tokens_per_s": round(batch.jobs / step, 1),
            "bytes_per_step": int(kv + weight_bytes),
            "kv_bytes_per_step": int(kv),
            "gb_per_s": round((kv + weight_bytes) / step / 1e9, 2),
        }
        if alone is not None:
            row["vs_one_job"] = round(
                statistics.median(batch.jobs * a / t for a, t in zip(alone, mine, strict=True)), 3
            )
        rows.append(row)
    say("measuring the memory read rate")
    return {
        "bench": "decode_step",
        "machine": machine(),
        "model": {
            "path": str(path),
            "layers": layers,
            "hidden": int(fused.weights[0].shape[1]),
            "heads": fused.heads,
            "kv_heads": kv_heads,
            "head_dim": dim,
            "weight_bytes": weight_bytes,
            "kv_bytes_per_token": kv_token_bytes,
        },
        "settings": {
            "jobs": args.jobs,
            "history": args.history,
            "threads": threads,
            "steps": args.steps,
            "rounds": args.rounds,
            "block_size": bs,
            "blocks": args.blocks,
            "seed": args.seed,
        },
        "steps": rows,
        "memory": read_rate(args.memory_mb, args.rounds),
    }


def print_table(report: dict[str, Any]) -> None:
    lines = [
        f"{'history':>8} {'jobs':>5} {'thr':>4} {'ms/step':>9} {'tokens/s':>10} "
        f"{'vs 1 job':>9} {'MB/step':>8} {'GB/s':>6}"
    ]
    for row in report["steps"]:
        ratio = f"{row['vs_one_job']:.2f}x" if "vs_one_job" in row else "-"
        lines.append(
            f"{row['history']:>8} {row['jobs']:>5} {row['threads']:>4} "
            f"{row['ms_per_step']:>9.3f} {row['tokens_per_s']:>10.0f} {ratio:>9} "
            f"{row['bytes_per_step'] / 1e6:>8.1f} {row['gb_per_s']:>6.1f}"
        )
    memory = report["memory"]
    if memory["one_thread_gb_per_s"]:
        reads = ", ".join(f"{mb} MB {gb}" for mb, gb in memory["one_thread_gb_per_s"].items())
        lines.append(f"read rate, one thread (GB/s): {reads}")
        for mb, gb in memory.get("two_threads_gb_per_s", {}).items():
            lines.append(f"read rate, two threads (GB/s): {mb} MB each {gb}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print_table(report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

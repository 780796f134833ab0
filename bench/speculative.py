"""Speculative decoding against incremental decoding on the same engine, and against transformers'
assisted generation on the same model pair.

    python bench/speculative.py                     # the demo pair (--model demo)
    python bench/speculative.py --quick             # a smoke run
    python bench/speculative.py --model M --draft-model D --spec-tree 1,1,1,1
    python bench/speculative.py --weak-noise 0.15   # bench/engine.py's weaker draft of the pair
    python bench/speculative.py --contend 3         # beside a neighbour that comes and goes

One engine is loaded with the draft model(s) and ``--spec on``; its speculation mode is switched
between runs, so incremental and speculative decoding use the same weights, caches and threads. A
second engine in the same process runs ``--spec auto`` as a server would (with auto's default tree,
which the policy cuts job by job). Every variant
completes the same prompts, one request at a time (batch 1, where speculation is meant to pay), in
rounds that alternate the variants so drift on a busy machine hits them alike. Greedy output must be
the same token for token across the engine's modes and transformers' plain and assisted generate
(the script fails otherwise). A sampled pass (temperature 0.7) measures the engine with stochastic
verification too. ``--engine-only`` leaves transformers' runs out. ``--contend S`` runs one busy
process per core beside it, S seconds running and S stopped in turn: ``--spec auto`` times its
steps as it goes, and a stall must not leave it slower than incremental decoding. Prints one JSON
object, with what a speculative step costs in incremental steps as each engine measured it;
progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import PROMPTS, machine, say

TARGET_SPEEDUP = 1.5  # speculative over incremental on the engine, greedy, batch 1
AUTO_FLOOR = 0.95  # --spec auto must never cost more than this against incremental decoding


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/speculative.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--model", default="demo", help="served model (default: demo)")
    parser.add_argument(
        "--draft-model",
        action="append",
        help="speculative model; repeat for several (default with --model demo: demo's draft)",
    )
    parser.add_argument("--spec-tree", help="token-tree expansion (default: the engine's)")
    parser.add_argument(
        "--weak-noise",
        type=float,
        help="draft with a copy of the first draft whose weights carry this much Gaussian noise"
        " (bench/engine.py's weaker draft: 0.5)",
    )
    parser.add_argument("--tokens", type=int, default=128, help="new tokens a request (128)")
    parser.add_argument("--prompts", type=int, default=6, help="requests a round (6)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every variant (2)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--contend",
        type=float,
        metavar="S",
        help="while it runs, one busy process per core, S seconds running and S stopped in turn:"
        " the stalls --spec auto must not be fooled by",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 prompts, 1 round")
    parser.add_argument(
        "--engine-only", action="store_true", help="leave out transformers' generate runs"
    )
    args = parser.parse_args(argv)
    if args.contend is not None and not args.contend > 0:
        parser.error(f"--contend: seconds must be positive, got {args.contend:g}")
    if args.quick:
        args.prompts, args.rounds, args.tokens = 2, 1, min(args.tokens, 48)
    if not args.draft_model:
        if args.model != "demo":
            parser.error("--draft-model is required unless --model demo")
        args.draft_model = ["demo"]
    return args


async def engine_round(engine: Any, prompts: list[list[int]], params: Any) -> tuple[float, list]:
    """Complete ``prompts`` one after another; seconds and each one's tokens."""
    outputs = []
    start = time.perf_counter()
    for prompt in prompts:
        handle = engine.submit(prompt, params)
        tokens: list[int] = []
        async for delta in handle:
            if delta.error:
                raise RuntimeError(f"engine job failed: {delta.error}")
            tokens += delta.token_ids
        outputs.append(tokens)
    return time.perf_counter() - start, outputs


def hf_round(
    model: Any, prompts: list[list[int]], new: int, pad_id: int, assistant: Any = None
) -> tuple[float, list]:
    import torch

    outputs = []
    start = time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,  # EOS is suppressed until then: exact lengths
                do_sample=False,
                pad_token_id=pad_id,
                assistant_model=assistant,
            )
            outputs.append(out[0, ids.shape[1] :].tolist())
    return time.perf_counter() - start, outputs


def assisted_variants(depth: int) -> dict[str, dict[str, Any]]:
    """transformers' defaults for an assistant, and drafts as deep as the engine's tree."""
    return {
        "assisted_default": {},
        f"assisted_{depth}_tokens": {
            "num_assistant_tokens": depth,
            "num_assistant_tokens_schedule": "constant",
            "assistant_confidence_threshold": 0.0,
        },
    }


def spec_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    steps = after["num_drafts"] - before["num_drafts"]
    drafted = after["num_draft_tokens"] - before["num_draft_tokens"]
    accepted = after["num_accepted_tokens"] - before["num_accepted_tokens"]
    return {
        "steps": steps,
        "draft_tokens": drafted,
        "accepted_tokens": accepted,
        "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
        "mean_accepted_length": round(1 + accepted / steps, 4) if steps else None,
    }


def first_difference(a: list[list[int]], b: list[list[int]]) -> list[int | None]:
    out: list[int | None] = []
    for x, y in zip(a, b, strict=True):
        i = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), None)
        out.append(i if i is not None or len(x) == len(y) else min(len(x), len(y)))
    return out


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    from flockctl.engine.config import EngineConfig
    from flockctl.engine.job import SamplingParams
    from flockctl.engine.loader import load_engine
    from flockctl.engine.tree import parse_tree

    if args.threads:
        torch.set_num_threads(args.threads)
    extra = {"spec_tree": parse_tree(args.spec_tree)} if args.spec_tree else {}

    def config(spec: str) -> EngineConfig:
        return EngineConfig(
            model=args.model,
            draft_models=tuple(args.draft_model),
            spec=spec,
            max_batch_size=1,
            **extra,
        )

    say(f"loading {args.model} with draft(s) {', '.join(args.draft_model)} in this process")
    engine = await asyncio.to_thread(load_engine, config("on"), False)
    auto_engine = await asyncio.to_thread(load_engine, config("auto"), False)
    transformers.logging.set_verbosity_error()
    try:
        tokenizer = engine.tokenizer
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id or 0
        prompts = [tokenizer.encode(p) for p in (PROMPTS * 4)[: args.prompts]]
        new = args.tokens
        greedy = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
        sampled = [
            SamplingParams(max_tokens=new, temperature=0.7, seed=i, ignore_eos=True)
            for i in range(len(prompts))
        ]
        depth = len(engine.spec_tree)
        assistant = engine.drafters[0].model
        base_config = assistant.generation_config.to_dict()
        policy = engine.spec_policy

        async def run_engine(mode: str, params: Any = greedy) -> tuple[float, list]:
            served = auto_engine if mode == "auto" else engine
            if mode != "auto":
                policy.mode = mode
            if isinstance(params, list):
                start = time.perf_counter()
                outs = []
                for prompt, p in zip(prompts, params, strict=True):
                    _, (out,) = await engine_round(served, [prompt], p)
                    outs.append(out)
                return time.perf_counter() - start, outs
            return await engine_round(served, prompts, params)

        def run_hf(variant: str) -> tuple[float, list]:
            if variant == "plain":
                return hf_round(engine.model, prompts, new, pad_id)
            settings = assisted_variants(depth)[variant]
            assistant.generation_config.update(**{**base_config, **settings})
            try:
                return hf_round(engine.model, prompts, new, pad_id, assistant)
            finally:
                assistant.generation_config.update(**base_config)

        variants: dict[str, Any] = {
            "engine_incremental": lambda: run_engine("off"),
            "engine_speculative": lambda: run_engine("on"),
            "engine_auto": lambda: run_engine("auto"),
            "engine_incremental_sampled": lambda: run_engine("off", sampled),
            "engine_speculative_sampled": lambda: run_engine("on", sampled),
        }
        if not args.engine_only:
            variants["transformers_generate"] = lambda: run_hf("plain")
            for name in assisted_variants(depth):
                variants[name] = lambda n=name: run_hf(n)
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        auto_state: dict[str, Any] = {}
        outputs: dict[str, list] = {}
        spec: dict[str, dict[str, Any]] = {}
        tokens = len(prompts) * new
        for round_ in range(args.rounds + 1):  # round 0 warms everything up
            names = list(variants)
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                served = auto_engine if name == "engine_auto" else engine
                before = served.spec_stats()
                run = variants[name]
                if name.startswith("engine"):
                    elapsed, out = await run()
                else:
                    elapsed, out = await asyncio.to_thread(run)
                if round_:
                    seconds[name].append(elapsed)
                    if name in ("engine_speculative", "engine_speculative_sampled", "engine_auto"):
                        delta = spec_delta(before, served.spec_stats())
                        spec.setdefault(name, delta)
                        if round_ == args.rounds:
                            spec[name] = delta
                outputs[name] = out
                if name == "engine_auto":
                    auto_state = auto_engine.spec_policy.describe()  # what it decided, and why
                say(
                    f"{'warm-up' if not round_ else f'round {round_}'}: {name}"
                    f" {tokens / elapsed:.0f} tokens/s"
                )
        on_state = policy.describe()
        auto_tree = list(auto_engine.spec_tree)
    finally:
        engine.close()
        auto_engine.close()

    lengths = {len(o) for name, outs in outputs.items() for o in outs}
    if lengths != {new}:
        raise RuntimeError(f"runs generated {sorted(lengths)} tokens a request, not {new}")
    greedy_names = [n for n in outputs if not n.endswith("_sampled")]
    mismatched = [n for n in greedy_names if outputs[n] != outputs["engine_incremental"]]
    tps = {name: round(tokens / statistics.median(s), 1) for name, s in seconds.items()}
    speedup = tps["engine_speculative"] / tps["engine_incremental"]
    auto = tps["engine_auto"] / tps["engine_incremental"]
    ratios = {
        "speculative_vs_incremental": round(speedup, 3),
        "auto_vs_incremental": round(auto, 3),
        "sampled_speculative_vs_incremental": round(
            tps["engine_speculative_sampled"] / tps["engine_incremental_sampled"], 3
        ),
    }
    targets: dict[str, Any] = {
        "speculative_vs_incremental": {
            "value": round(speedup, 3),
            "min": TARGET_SPEEDUP,
            "pass": speedup >= TARGET_SPEEDUP,
        },
        "auto_never_slower": {
            "value": round(auto, 3),
            "min": AUTO_FLOOR,
            "pass": auto >= AUTO_FLOOR,
        },
        "greedy_outputs_equal": not mismatched,
    }
    if not args.engine_only:
        vs_assisted = tps["engine_speculative"] / max(tps[n] for n in assisted_variants(depth))
        ratios["speculative_vs_best_assisted"] = round(vs_assisted, 3)
        ratios["incremental_vs_transformers_generate"] = round(
            tps["engine_incremental"] / tps["transformers_generate"], 3
        )
        targets["faster_than_assisted_generation"] = {
            "value": round(vs_assisted, 3),
            "min": 1.0,
            "pass": vs_assisted > 1.0,
        }
    targets["met"] = all(t["pass"] if isinstance(t, dict) else t for t in targets.values())
    return {
        "machine": {
            **machine(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # others' work adds noise
        },
        "model": args.model,
        "draft_models": args.draft_model,
        "tree": list(engine.spec_tree),
        "auto_tree": auto_tree,
        "settings": {
            "prompts": len(prompts),
            "new_tokens": new,
            "rounds": args.rounds,
            "weak_noise": args.weak_noise,
            "contend_s": args.contend,
        },
        "tokens_per_s": tps,
        "seconds": {name: [round(x, 4) for x in s] for name, s in seconds.items()},
        "speculation": spec,
        # a speculative step's seconds over an incremental step's, as each engine measured them
        # (--spec on at its whole tree; auto at the depth it chose last)
        "cost_ratio": {
            "speculative": on_state.get("cost_ratio_by_batch", {}).get("1"),
            "auto": auto_state.get("cost_ratio_by_batch", {}).get("1"),
        },
        "auto_policy": auto_state,
        "greedy_outputs_equal": not mismatched,
        "greedy_mismatches": {
            n: first_difference(outputs[n], outputs["engine_incremental"]) for n in mismatched
        },
        "ratios": ratios,
        "targets": targets,
    }


def weak_draft(draft: str, workdir: Path, noise: float) -> Path:
    """``draft`` (or the demo's) copied with noise in its weights, as bench/engine.py builds it."""
    from engine import build_weak_draft

    if draft == "demo":
        from flockctl.engine.demo import ensure_demo

        source = ensure_demo(progress=False).draft
    else:
        source = Path(draft)
    say(f"building a weaker draft: {source} with noise {noise:g}")
    return build_weak_draft(source, workdir / "weak-draft", noise)


#: A busy process that ends once its parent is gone (so a killed bench leaves none behind).
BUSY = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass\n"


@contextlib.contextmanager
def contention(period: float | None) -> Iterator[None]:
    """With ``period``, one busy process per core for the block, running ``period`` seconds and
    stopped ``period`` seconds in turn (a neighbour whose bursts come and go); else nothing."""
    if not period:
        yield
        return
    procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(os.cpu_count() or 1)]
    done = threading.Event()

    def toggle() -> None:
        running = True
        while not done.wait(period):
            running = not running
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT if running else signal.SIGSTOP)

    thread = threading.Thread(target=toggle, name="contention", daemon=True)
    thread.start()
    say(f"contention: {len(procs)} busy processes, {period:g} s on and {period:g} s off")
    try:
        yield
    finally:
        done.set()
        thread.join()
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in procs:
            proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="flockctl-spec-bench-") as tmp:
            if args.weak_noise is not None:
                args.draft_model = [
                    str(weak_draft(args.draft_model[0], Path(tmp), args.weak_noise))
                ]
            with contention(args.contend):
                report = asyncio.run(bench(args))
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except (RuntimeError, OSError, ValueError) as exc:
        say(f"failed: {exc or type(exc).__name__}")
        return 1
    report["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(report, indent=2))
    r = report["ratios"]
    assisted = r.get("speculative_vs_best_assisted")
    say(
        f"speculative/incremental x{r['speculative_vs_incremental']} (target"
        f" x{TARGET_SPEEDUP}), auto x{r['auto_vs_incremental']} (at least x{AUTO_FLOOR}),"
        f" sampled x{r['sampled_speculative_vs_incremental']}"
        + (f", vs best assisted generation x{assisted}" if assisted is not None else "")
        + f"; a speculative step costs {report['cost_ratio']} incremental steps;"
        f" targets met: {report['targets']['met']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

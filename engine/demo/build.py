"""One build of the demo, start to finish: text, tokenizer, target, draft, files, manifest.

Only :func:`flockctl.engine.demo.cache.ensure_demo` calls it, under the build lock and into a
temporary directory; this module is the first in the package to import torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import tokenizers
import torch
import transformers

from flockctl.engine.demo.cache import MANIFEST
from flockctl.engine.demo.corpus import encode, read_stdlib, train_tokenizer
from flockctl.engine.demo.progress import BuildProgress, Phase
from flockctl.engine.demo.recipe import DEMO_VERSION, DemoRecipe
from flockctl.engine.demo.training import copy_prefix, count_params, evaluate, new_model, train


def build_demo(
    out: Path, recipe: DemoRecipe, mode: str | None, report: Callable[[str], None]
) -> None:
    """Train tokenizer, target and draft into ``out``; ``manifest.json`` is written last.

    ``mode`` is :class:`BuildProgress`'s (``"auto"``, ``"bar"``, ``"plain"`` or ``None``);
    ``report`` gets its one-line phase text on every step.
    """
    started = time.perf_counter()
    bf16 = _native_bf16() if recipe.bf16 is None else recipe.bf16
    bar = BuildProgress(plan(recipe), mode, report)
    with bar, torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        generator = torch.Generator().manual_seed(recipe.seed)

        bar.start("reading text")
        train_docs, heldout_docs, source = read_stdlib(recipe)
        bar.advance()

        bar.start("tokenizer")
        tokenizer = train_tokenizer(train_docs, recipe.vocab_size)
        bar.advance()
        train_ids = encode(tokenizer, train_docs)
        heldout_ids = encode(tokenizer, heldout_docs)
        bar.advance()

        bar.start("target")
        target = new_model(tokenizer, recipe, recipe.target_layers)
        target_loss = train(target, None, train_ids, recipe, generator, bf16, bar)
        target.eval()

        bar.start("draft")
        draft = new_model(tokenizer, recipe, recipe.draft_layers)
        copy_prefix(target, draft)
        draft_loss = train(draft, target, train_ids, recipe, generator, bf16, bar)
        draft.eval()
        if recipe.draft_steps == 0:
            bar.advance()
        quality = evaluate(target, draft, heldout_ids, recipe.seq_len)

        bar.start("saving")
        for name, model in (("target", target), ("draft", draft)):
            with _quiet_transformers():
                model.save_pretrained(out / name)
            tokenizer.save_pretrained(out / name)
            bar.advance()
        bar.finish()
        manifest = {
            "demo_version": DEMO_VERSION,
            "recipe": dataclasses.asdict(recipe),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__,
            },
            "text": {**source, "train_tokens": len(train_ids), "heldout_tokens": len(heldout_ids)},
            "vocab_size": len(tokenizer),
            "params": {"target": count_params(target), "draft": count_params(draft)},
            "train_loss": {"target": target_loss, "draft": draft_loss},
            "heldout": quality,
            "draft_agreement": quality["draft_agreement"],
            "bf16_autocast": bf16,
            "threads": torch.get_num_threads(),
            "phase_seconds": bar.seconds,
            "build_seconds": round(time.perf_counter() - started, 1),
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        bar.advance()


def plan(recipe: DemoRecipe) -> list[Phase]:
    """The build's phases; a step's cost counts layer passes (a trained layer: forward and
    backward, three; the draft's teacher: forward only, one), enough to say the time left."""
    return [
        Phase("reading text", 1, 0),
        Phase("tokenizer", 2, 0),
        Phase("target", recipe.target_steps, 3 * recipe.target_layers),
        Phase("draft", max(recipe.draft_steps, 1), 3 * recipe.draft_layers + recipe.target_layers),
        Phase("saving", 3, 0),
    ]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' own per-file progress bars; the build has its own."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (bf16 autocast helps only then)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags

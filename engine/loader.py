"""Loading an engine: the model, its tokenizer and any draft models, the context length and the
end-of-sequence ids, then the engine itself (which calibrates and starts its model loop).

``demo`` names the offline demo (built locally on first use, no download); anything else is a
Hugging Face hub id or a local path that transformers loads.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from flockctl.cores import default_threads
from flockctl.engine.config import EngineConfig, EngineLoadError
from flockctl.engine.device import pick_device, pick_dtype
from flockctl.engine.embeddings import is_encoder
from flockctl.engine.encoder import EncoderEngine
from flockctl.engine.engine import Engine


def load_engine(
    config: EngineConfig,
    progress: bool = True,
    report: Callable[[str], None] | None = None,
) -> Engine | EncoderEngine:
    """Load the model, its tokenizer and any draft models, calibrate, start the model loop.

    A checkpoint that declares an encoder (a BERT-style ``AutoModel``) is served as an embedding
    model: an :class:`EncoderEngine`, which embeds and refuses generation.

    ``report`` hears each phase (``building demo model: target 62%, about 40 s left``,
    ``loading weights of M``, ``calibrating``) for whoever asks a starting engine what it does.
    """
    tell = report or (lambda _text: None)
    threads = config.threads or default_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    path = _resolve(config.model, draft=False, progress=progress, report=tell)
    torch.manual_seed(config.seed)
    tell(f"loading weights: {config.model} on {device}")
    tokenizer, model = _load(config.model, path, dtype, progress)
    model = model.to(device).eval()
    if is_encoder(model.config):
        return _encoder_engine(config, model, tokenizer, device, dtype)
    drafts = []
    for name in config.draft_models:
        draft_path = _resolve(name, draft=True, progress=progress, report=tell)
        tell(f"loading weights: draft model {name} on {device}")
        draft_tokenizer, draft = _load(name, draft_path, dtype, progress)
        problem = tokenizer_mismatch(tokenizer, draft_tokenizer)
        if problem:
            raise EngineLoadError(
                f"draft model {name!r} cannot speculate for {config.model!r}: {problem};"
                " a draft must use the same tokenizer as the model it serves"
            )
        drafts.append((name, draft.to(device).eval()))
    context = context_length(model, tokenizer)
    for _name, draft in drafts:
        draft_context = getattr(draft.config, "max_position_embeddings", None)
        if isinstance(draft_context, int) and 0 < draft_context < context:
            context = draft_context  # an SSM must reach every position the LLM does
    if config.max_model_len is not None:
        if config.max_model_len > context:
            raise EngineLoadError(
                f"--max-model-len {config.max_model_len} exceeds this model's context of {context}"
            )
        context = config.max_model_len
    name = config.served_model_name or config.model
    tell("calibrating: timing a prefill and a decode step")
    return Engine(
        model, tokenizer, config, device, dtype, name, context, eos_ids(model, tokenizer), drafts
    )


def _encoder_engine(
    config: EngineConfig, model: Any, tokenizer: Any, device: torch.device, dtype: torch.dtype
) -> EncoderEngine:
    if config.draft_models:
        raise EngineLoadError(
            f"{config.model!r} is an embedding model (an encoder): it generates no text, so it"
            " takes no --draft-model"
        )
    context = context_length(model, tokenizer)
    if config.max_model_len is not None:
        if config.max_model_len > context:
            raise EngineLoadError(
                f"--max-model-len {config.max_model_len} exceeds this model's context of {context}"
            )
        context = config.max_model_len
    name = config.served_model_name or config.model
    return EncoderEngine(model, tokenizer, config, device, dtype, name, context)


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every id that ends a sequence, wherever the model's files declare one."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def context_length(model: Any, tokenizer: Any) -> int:
    """The longest job the model and its tokenizer allow; 2048 when neither says."""
    limits = [getattr(model.config, "max_position_embeddings", None)]
    limits.append(getattr(tokenizer, "model_max_length", None))
    sane = [int(x) for x in limits if isinstance(x, int) and 0 < x < 10**7]
    return min(sane) if sane else 2048


def _resolve(model: str, draft: bool, progress: bool, report: Callable[[str], None]) -> str:
    """'demo' is the offline demo: its target, or for a draft its distilled SSM."""
    if model != "demo":
        return model
    from flockctl.engine.demo import ensure_demo

    paths = ensure_demo(progress=progress, report=report)
    return str(paths.draft if draft else paths.target)


def _load(name: str, path: str, dtype: torch.dtype, progress: bool) -> tuple[Any, Any]:
    """Tokenizer and model; transformers' own bars only where ``progress`` asks for them and
    stderr is a terminal (in a worker's log file they are noise)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not (progress and sys.stderr.isatty()):
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        encoder = is_encoder(AutoConfig.from_pretrained(path))
        auto = AutoModel if encoder else AutoModelForCausalLM
        model = auto.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineLoadError(f"cannot load model {name!r}: {first}") from exc
    return tokenizer, model


def tokenizer_mismatch(a: Any, b: Any) -> str | None:
    """Why two tokenizers would not map text to the same ids; None when they do."""
    va, vb = a.get_vocab(), b.get_vocab()
    if len(va) != len(vb):
        return f"its tokenizer has {len(vb)} tokens, the model's has {len(va)}"
    differ = [t for t, i in va.items() if vb.get(t) != i]
    if differ:
        return (
            f"{len(differ)} of {len(va)} tokens have other ids in its tokenizer"
            f" (for example {differ[0]!r})"
        )
    for attr in ("bos_token_id", "eos_token_id"):
        if getattr(a, attr, None) != getattr(b, attr, None):
            return (
                f"its {attr} is {getattr(b, attr, None)}, the model's is {getattr(a, attr, None)}"
            )
    return None

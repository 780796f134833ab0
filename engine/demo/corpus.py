"""The demo's text and tokenizer: the standard library's own sources, which every Python carries.

Reading them needs no download and gives the same text on every machine with the same Python;
the tokenizer is byte-level BPE, so any prompt, in any script, encodes and decodes back exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import sysconfig
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from flockctl.engine.demo.recipe import (
    EOT,
    MAX_POSITIONS,
    PAD,
    SPECIAL_TOKENS,
    DemoBuildError,
    DemoRecipe,
)

# One line naming the speaker, then the message. The model never saw a conversation (it learnt from
# source files), but an OpenAI-style chat endpoint needs a template to turn messages into a prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + '; use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Left out: parts of the standard library that are data rather than code (codec tables, generated
# topic text), its test suite (as large as the rest and full of odd edge cases), and third-party
# packages installed beside it (they differ from one machine to the next).
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "pydoc_data"}
)


def read_stdlib(recipe: DemoRecipe) -> tuple[list[str], list[str], dict[str, Any]]:
    """Standard-library sources: training files up to ``text_bytes``, then held-out ones.

    Files are ordered by a hash of their relative path, a fixed order that still mixes every part
    of the library into both sets (sorted by name, a few megabytes would be mostly ``a``–``e``).
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if _SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        with contextlib.suppress(OSError):
            if 0 < path.stat().st_size <= recipe.max_file_bytes:
                files.append((hashlib.sha256(rel.as_posix().encode()).hexdigest(), path))
    files.sort()
    train: list[str] = []
    heldout: list[str] = []
    sizes = [0, 0]
    for _, path in files:
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if sizes[0] < recipe.text_bytes:
            train.append(text)
            sizes[0] += len(text.encode())
        else:  # cut to the budget: held-out text only measures, and one file can be 200 kB
            heldout.append(text[: recipe.heldout_bytes - sizes[1]])
            sizes[1] += len(heldout[-1].encode())
            if sizes[1] >= recipe.heldout_bytes:
                break
    if not train or not heldout:
        raise DemoBuildError(
            f"found too little Python source under {stdlib} to build the demo model;"
            " serve a model from a local path or a hub id instead (--model PATH)"
        )
    source = {"stdlib": str(stdlib), "train_files": len(train), "train_bytes": sizes[0]}
    source |= {"heldout_files": len(heldout), "heldout_bytes": sizes[1]}
    return train, heldout, source


def train_tokenizer(docs: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE: any text, in any script, encodes and decodes back exactly."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=PAD,
        model_max_length=MAX_POSITIONS,
        padding_side="left",  # decoder-only: a batch is padded where generation does not continue
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def encode(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> torch.Tensor:
    """All documents as one token stream, each preceded by ``<|endoftext|>``."""
    eot = tokenizer.convert_tokens_to_ids(EOT)
    assert isinstance(eot, int)  # one token asked, so one id back
    ids: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False):
        ids.append(eot)
        ids.extend(encoding.ids)
    return torch.tensor(ids, dtype=torch.long)

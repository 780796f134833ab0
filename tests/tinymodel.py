"""A tiny real causal LM and tokenizer (and a BERT encoder that shares the tokenizer), built on
the spot, for tests that need a model.

Nothing is fetched from a hub: a byte-level BPE tokenizer is trained on a few KB of text written
here, and a two-layer Llama with random weights (``torch.manual_seed``) is saved next to it. The
result loads with ``AutoTokenizer`` / ``AutoModelForCausalLM`` like any local checkpoint, has a
chat template and an end-of-sequence token, and is the same on every run. The tests' models are
built here (not the demo, which the product builds); most tests take conftest's ``tiny`` fixture.

    from tinymodel import build_tiny_model
    path = build_tiny_model(tmp_path / "tiny")
"""

from __future__ import annotations

import itertools
from pathlib import Path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# Roles become plain text markers; the generation prompt ends with the assistant's marker.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_TEXT = (
    "the a flock of birds flies over quiet hills while servers answer requests in batches "
    "tokens stream out one by one and the scheduler picks jobs from queues that never starve "
    "memory holds keys and values for every sequence until the job is done or preempted "
    "hello world how are you today fine thanks and you the quick brown fox jumps over lazy dogs"
)
_WORDS = tuple(_TEXT.split())


def corpus(n_lines: int = 400) -> list[str]:
    """A few KB of deterministic text with enough repetition for BPE to learn merges."""
    lines = []
    for i, combo in zip(range(n_lines), itertools.cycle(itertools.permutations(_WORDS, 6))):
        lines.append(f"{' '.join(combo)} {i % 97}.")
    return lines


def build_tiny_model(path: Path, *, vocab_size: int = 512, seed: int = 0) -> Path:
    """Write a tokenizer and a random two-layer Llama into ``path`` (created) and return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def build_near_model(model: Path, path: Path, *, noise: float = 0.3, seed: int = 5) -> Path:
    """Write into ``path`` (created) a draft close to ``model``: its weights plus Gaussian noise
    (``noise`` times each tensor's spread) and its very tokenizer, so a speculating engine
    accepts some of the draft's tokens and rejects others."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    draft = AutoModelForCausalLM.from_pretrained(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * noise * p.std())
    draft.save_pretrained(path)
    for f in model.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, path / f.name)
    return path


def build_tiny_bert(tiny: Path, path: Path) -> Path:
    """A two-layer BertModel with random weights that takes the tiny model's tokenizer, trained
    (its config says) to be cut to 8 or 16 of its 32 dimensions."""
    import shutil

    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    path.mkdir(parents=True, exist_ok=True)
    for f in tiny.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, path / f.name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        matryoshka_dimensions=[8, 16],
    )
    BertModel(config).save_pretrained(path)
    return path


def greedy_continuations(path: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """The reference the engine's greedy output is held to: full-sequence forwards with no cache,
    one prompt at a time, ``new_tokens`` argmax tokens each."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(new_tokens):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            out.append(ids[len(prompt) :])
    return out

"""What decides the demo's weights: the recipe, its version, and the tokens every build reserves.

Torch-free, like the cache: ``flockctl up`` compares a cached build's recipe with this one to
decide whether to build before starting workers.
"""

from __future__ import annotations

from dataclasses import dataclass

DEMO_VERSION = 1
"""Part of the cache path: bump it whenever the recipe or the code that applies it changes."""

EOT = "<|endoftext|>"  # separates source files in training; bos and eos
PAD = "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (EOT, PAD, *ROLE_TOKENS)
MAX_POSITIONS = 2048


class DemoBuildError(RuntimeError):
    """The demo cannot be built here; the message says why and what to do instead."""


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that decides the demo's weights. The defaults are the real demo.

    Tests pass a tiny recipe to build in a second or two; a cached build whose recipe differs from
    the one asked for is rebuilt.
    """

    seed: int = 0
    # text: standard-library sources, scattered by a hash of their path, cut at these budgets
    text_bytes: int = 3_000_000
    heldout_bytes: int = 30_000  # further files, never trained on, to measure the draft
    max_file_bytes: int = 200_000
    # tokenizer
    vocab_size: int = 2048
    # training batches: windows of seq_len tokens drawn at random from the concatenated text
    seq_len: int = 128
    batch_size: int = 16
    # target
    target_hidden: int = 128
    target_layers: int = 16
    target_heads: int = 2
    target_intermediate: int = 256
    target_steps: int = 120
    target_lr: float = 0.05  # Muon, for the layers' matrices
    embedding_lr: float = 0.02  # AdamW, for embeddings and norms
    # draft: the target's embeddings and first draft_layers layers, then distilled from the target
    draft_layers: int = 2
    draft_steps: int = 150
    draft_lr: float = 0.04  # Muon
    distill_weight: float = 1.0  # loss = w * KL(target || draft) + (1 - w) * cross-entropy
    warmup_fraction: float = 0.1
    # bf16 autocast: None uses it where the CPU has native bf16 instructions (AMX, AVX512-BF16),
    # where it trains about 2x faster; emulated bf16 is an order of magnitude slower than fp32.
    bf16: bool | None = None

    def __post_init__(self) -> None:
        checks = {
            "text_bytes": self.text_bytes > 0,
            "heldout_bytes": self.heldout_bytes > 0,
            "vocab_size": self.vocab_size >= 256 + len(SPECIAL_TOKENS),
            "seq_len": 1 < self.seq_len < MAX_POSITIONS,
            "batch_size": self.batch_size > 0,
            "target_hidden": self.target_hidden % self.target_heads == 0,
            "target_steps": self.target_steps > 0,
            "draft_layers": 0 < self.draft_layers <= self.target_layers,
            "draft_steps": self.draft_steps >= 0,
            "distill_weight": 0.0 <= self.distill_weight <= 1.0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid DemoRecipe field(s): {', '.join(bad)} ({self})")


DEFAULT_RECIPE = DemoRecipe()
"""The real demo, the one ``--model demo`` serves."""

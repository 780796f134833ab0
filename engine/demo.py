"""The ``demo`` model: a small target/draft pair built on this machine, with no download.

``flockctl engine serve --model demo`` must work offline and on any machine, so the demo is trained
here from text every Python installation carries: the standard library's own ``.py`` sources. One
byte-level BPE tokenizer is shared by a 16-layer target and a 2-layer draft; the draft is meant for
speculative decoding, so it starts from the target's embeddings and first layers and is then
distilled from the target's logits, which makes it agree with the target's greedy choice far more
often than a draft trained alone on the same compute. The target is deep and narrow on purpose: at
these sizes a step's cost follows the number of layers, so the draft costs about a seventh of the
target per step, the kind of gap that makes speculation pay with real model pairs.

The build is deterministic for a given recipe, Python and machine (fixed seed, fixed step counts,
never bounded by time), takes about five and a half minutes on two CPU cores, and is cached under
the user's cache directory (``cache_root()``), so later starts load it in seconds.
``manifest.json``, written last into a temporary directory that is then renamed into place, marks
a complete build; an exclusive lock makes several workers starting at once build it once.

Run ``python -m flockctl.engine.demo`` to build it ahead of time (``--force`` rebuilds).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flockctl.engine.build_progress import BuildProgress, Phase
from flockctl.exitcodes import ExitCode

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

DEMO_VERSION = 1
"""Part of the cache path: bump it whenever the recipe or the code that applies it changes."""

EOT = "<|endoftext|>"  # separates source files in training; bos and eos
PAD = "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (EOT, PAD, *ROLE_TOKENS)
MAX_POSITIONS = 2048

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
_MANIFEST = "manifest.json"
_WAIT_POLL = 0.5  # seconds between two tries of the lock while another process builds


class DemoBuildError(RuntimeError):
    """The demo cannot be built here; the message says why and what to do instead."""


@dataclass(frozen=True)
class DemoPaths:
    """Where a complete demo build lies; each is a ``save_pretrained`` directory."""

    target: Path  # the model to serve, with its tokenizer
    draft: Path  # the speculative-decoding draft, with the same tokenizer files


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


def cache_root() -> Path:
    """flockctl's cache directory: ``$FLOCKCTL_CACHE``, else ``$XDG_CACHE_HOME/flockctl``, else
    ``~/.cache/flockctl`` (rebuildable data only; nothing in it needs a backup)."""
    if os.environ.get("FLOCKCTL_CACHE"):
        return Path(os.environ["FLOCKCTL_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "flockctl"
    return Path.home() / ".cache" / "flockctl"


def demo_dir(root: Path | None = None) -> Path:
    """The build directory of this ``DEMO_VERSION``; older versions beside it are left alone."""
    return (cache_root() if root is None else Path(root)) / "demo" / f"v{DEMO_VERSION}"


def ensure_demo(
    root: Path | None = None,
    recipe: DemoRecipe = DEFAULT_RECIPE,
    progress: bool = True,
    *,
    force: bool = False,
    report: Callable[[str], None] | None = None,
) -> DemoPaths:
    """Return the demo pair, building it first unless a complete build of ``recipe`` is cached.

    Safe to call from several processes at once: the build runs under an exclusive lock on
    ``<demo_dir>.lock``, so the first caller builds and the others wait, then find it complete.
    ``force`` rebuilds even when a complete build exists (``--force`` on the command line).
    ``progress`` shows the build on stderr (a bar on a terminal, plain lines elsewhere);
    ``report`` gets a one-line phase text on every step, also while waiting for another
    process's build (whose progress it reads from ``<demo_dir>.progress``).
    """
    final = demo_dir(root)
    if not force and _is_complete(final, recipe):
        return _paths(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    progress_file = final.with_name(final.name + ".progress")
    lock = final.with_name(final.name + ".lock")
    with _exclusive_lock(lock, final if progress else None, progress_file, report):
        if not force and _is_complete(final, recipe):
            return _paths(final)  # another process built it while we waited
        for stale in final.parent.glob(final.name + ".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a build that was killed
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))

        def tell(text: str) -> None:
            _write_progress(progress_file, text)
            if report is not None:
                report(text)

        try:
            _build(tmp, recipe, "auto" if progress else None, tell)
            if final.exists():
                old = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
                final.rename(old / "old")
            tmp.rename(final)
        finally:
            for leftover in final.parent.glob(final.name + ".tmp-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            progress_file.unlink(missing_ok=True)
    return _paths(final)


def demo_is_built(recipe: DemoRecipe = DEFAULT_RECIPE, root: Path | None = None) -> bool:
    """Whether a complete build of ``recipe`` is cached (reads a manifest; imports no torch)."""
    return _is_complete(demo_dir(root), recipe)


def _paths(directory: Path) -> DemoPaths:
    return DemoPaths(target=directory / "target", draft=directory / "draft")


def _is_complete(directory: Path, recipe: DemoRecipe) -> bool:
    try:
        manifest = json.loads((directory / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    paths = _paths(directory)
    return (
        manifest.get("recipe") == dataclasses.asdict(recipe)
        and (paths.target / "config.json").is_file()
        and (paths.draft / "config.json").is_file()
    )


@contextlib.contextmanager
def _exclusive_lock(
    path: Path,
    announce: Path | None,
    progress_file: Path,
    report: Callable[[str], None] | None,
) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``; say on stderr when it means waiting (for
    ``announce`` to be built by another process), since that can take minutes, and pass the
    other build's progress (from ``progress_file``) to ``report`` while waiting."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if announce is not None:
                print(f"waiting for another process to finish building {announce}", file=sys.stderr)
            while True:
                if report is not None:
                    report(f"waiting for another build: {_read_progress(progress_file)}")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(_WAIT_POLL)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _write_progress(path: Path, text: str) -> None:
    """Atomically, so a waiting process never reads half a line."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    tmp.write_text(text + "\n")
    tmp.replace(path)


def _read_progress(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text.removeprefix("building ") or "the demo model"


# ---------------------------------------------------------------------------------------- build


def _build(
    out: Path, recipe: DemoRecipe, mode: str | None, report: Callable[[str], None]
) -> None:
    """Train tokenizer, target and draft into ``out``; ``manifest.json`` is written last."""
    import tokenizers
    import torch
    import transformers

    started = time.perf_counter()
    bf16 = _native_bf16() if recipe.bf16 is None else recipe.bf16
    bar = BuildProgress(_plan(recipe), mode, report)
    with bar, torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        generator = torch.Generator().manual_seed(recipe.seed)

        bar.start("reading text")
        train_docs, heldout_docs, source = _read_stdlib(recipe)
        bar.advance()

        bar.start("tokenizer")
        tokenizer = _train_tokenizer(train_docs, recipe.vocab_size)
        bar.advance()
        train_ids = _encode(tokenizer, train_docs)
        heldout_ids = _encode(tokenizer, heldout_docs)
        bar.advance()

        bar.start("target")
        target = _new_model(tokenizer, recipe, recipe.target_layers)
        target_loss = _train(target, None, train_ids, recipe, generator, bf16, bar)
        target.eval()

        bar.start("draft")
        draft = _new_model(tokenizer, recipe, recipe.draft_layers)
        _copy_prefix(target, draft)
        draft_loss = _train(draft, target, train_ids, recipe, generator, bf16, bar)
        draft.eval()
        if recipe.draft_steps == 0:
            bar.advance()
        quality = _evaluate(target, draft, heldout_ids, recipe.seq_len)

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
            "params": {"target": _count(target), "draft": _count(draft)},
            "train_loss": {"target": target_loss, "draft": draft_loss},
            "heldout": quality,
            "draft_agreement": quality["draft_agreement"],
            "bf16_autocast": bf16,
            "threads": torch.get_num_threads(),
            "phase_seconds": bar.seconds,
            "build_seconds": round(time.perf_counter() - started, 1),
        }
        (out / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        bar.advance()


def _plan(recipe: DemoRecipe) -> list[Phase]:
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


def _read_stdlib(recipe: DemoRecipe) -> tuple[list[str], list[str], dict[str, Any]]:
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


def _train_tokenizer(docs: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE: any text, in any script, encodes and decodes back exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

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


def _encode(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> torch.Tensor:
    """All documents as one token stream, each preceded by ``<|endoftext|>``."""
    import torch

    eot = tokenizer.convert_tokens_to_ids(EOT)
    ids: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False):
        ids.append(eot)
        ids.extend(encoding.ids)
    return torch.tensor(ids, dtype=torch.long)


def _new_model(
    tokenizer: PreTrainedTokenizerFast, recipe: DemoRecipe, layers: int
) -> LlamaForCausalLM:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.target_hidden,
        intermediate_size=recipe.target_intermediate,
        num_hidden_layers=layers,
        num_attention_heads=recipe.target_heads,
        num_key_value_heads=recipe.target_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        dtype=torch.float32,
        **special,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**special)
    return model


def _copy_prefix(target: LlamaForCausalLM, draft: LlamaForCausalLM) -> None:
    """Start the draft as the target cut after its first layers: same embeddings (and so the same
    tied output head), same final norm. It then agrees with the target far sooner than from
    scratch, because it only has to learn what the skipped layers added."""
    import torch

    with torch.no_grad():
        source = target.state_dict()
        for name, tensor in draft.state_dict().items():
            tensor.copy_(source[name])


def _schedule(step: int, steps: int, warmup_fraction: float) -> float:
    """Linear warm-up, then cosine decay to a tenth: the usual shape, short run or long."""
    warmup = max(1, round(steps * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


class _Optimizer:
    """Muon for the layers' weight matrices, AdamW for the embeddings and norms.

    With a two-minute budget the models see only a few hundred thousand tokens, so what counts is
    progress per step: given the same CPU time (four CPU-minutes, a 256-wide model), Muon ended
    0.26 nats lower in held-out loss than AdamW.
    ``torch.optim.Muon`` is not used because it orthogonalises in bfloat16, which CPUs without
    native bf16 (most of them) emulate an order of magnitude slower than float32.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        matrix_lr: float,
        embedding_lr: float,
        freeze_embeddings: bool,
    ) -> None:
        import torch

        self.matrices: list[torch.nn.Parameter] = []
        others = []
        for name, param in model.named_parameters():
            if "embed" in name and freeze_embeddings:
                param.requires_grad_(False)
            elif param.dim() == 2 and "embed" not in name:
                self.matrices.append(param)
            else:
                others.append(param)
        self.matrix_lr = matrix_lr
        self.momentum = [torch.zeros_like(p) for p in self.matrices]
        self.adamw = torch.optim.AdamW(others, lr=embedding_lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.embedding_lr = embedding_lr

    def step(self, lr_scale: float, beta: float = 0.95) -> None:
        import torch

        with torch.no_grad():
            for p, buf in zip(self.matrices, self.momentum, strict=True):
                buf.mul_(beta).add_(p.grad)
                update = _orthogonalise(p.grad.add(buf, alpha=beta))  # Nesterov momentum
                shape_scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                p.add_(update, alpha=-self.matrix_lr * lr_scale * shape_scale)
                p.grad = None
        for group in self.adamw.param_groups:
            group["lr"] = self.embedding_lr * lr_scale
        self.adamw.step()
        self.adamw.zero_grad(set_to_none=True)


def _train(
    model: LlamaForCausalLM,
    teacher: LlamaForCausalLM | None,
    ids: torch.Tensor,
    recipe: DemoRecipe,
    generator: torch.Generator,
    bf16: bool,
    bar: BuildProgress,
) -> float | None:
    """A fixed number of optimizer steps on random windows of ``ids``; returns the last loss.

    With a ``teacher`` the loss mixes the KL divergence from the teacher's next-token distribution
    (what makes a draft agree with its target) with plain cross-entropy on the text. The draft
    keeps the target's embeddings (and so its tied output head): its tokens mean what the target's
    mean, and only its layers and final norm learn to imitate the target.
    """
    import torch
    import torch.nn.functional as F

    if teacher is None:
        steps, w = recipe.target_steps, 0.0
        optimizer = _Optimizer(model, recipe.target_lr, recipe.embedding_lr, False)
    else:
        steps, w = recipe.draft_steps, recipe.distill_weight
        optimizer = _Optimizer(model, recipe.draft_lr, recipe.embedding_lr, True)
    if steps == 0:
        return None
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        starts = torch.randint(
            0, len(ids) - recipe.seq_len - 1, (recipe.batch_size,), generator=generator
        )
        window = torch.stack([ids[s : s + recipe.seq_len + 1] for s in starts.tolist()])
        inputs, labels = window[:, :-1], window[:, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=inputs).logits.float()
            if teacher is not None and w > 0:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=inputs).logits.float()
        log_probs = F.log_softmax(logits, dim=-1).flatten(0, 1)
        loss = F.nll_loss(log_probs, labels.flatten())
        if teacher is not None and w > 0:
            teacher_log_probs = F.log_softmax(teacher_logits, dim=-1).flatten(0, 1)
            kl = F.kl_div(log_probs, teacher_log_probs, log_target=True, reduction="batchmean")
            loss = w * kl + (1 - w) * loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(_schedule(step, steps, recipe.warmup_fraction))
        loss_value = loss.item()
        bar.advance(f"loss {loss_value:.2f}")
    return round(loss_value, 4)


def _orthogonalise(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U·Vᵀ of g = U·S·Vᵀ: the quintic Newton–Schulz iteration of Muon."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + 1e-7)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def _evaluate(
    target: LlamaForCausalLM, draft: LlamaForCausalLM, ids: torch.Tensor, seq_len: int
) -> dict[str, float]:
    """Held-out cross-entropy of both models, and how often the draft's greedy next token is the
    target's: on real text (``draft_agreement``), and along the target's own greedy continuations
    of held-out prompts (``greedy_acceptance``, what a greedy speculative decoder accepts per
    drafted token; higher, since a model's own output is easier to predict than real text)."""
    import torch
    import torch.nn.functional as F

    usable = (len(ids) - 1) // seq_len * seq_len
    if usable == 0:
        raise DemoBuildError("held-out text is shorter than one training window")
    inputs = ids[:usable].view(-1, seq_len)
    labels = ids[1 : usable + 1].view(-1, seq_len)
    agree = total = 0
    losses = {"target": 0.0, "draft": 0.0}
    with torch.no_grad():
        for batch_inputs, batch_labels in zip(inputs.split(16), labels.split(16), strict=True):
            picks = {}
            for name, model in (("target", target), ("draft", draft)):
                logits = model(input_ids=batch_inputs).logits
                losses[name] += F.cross_entropy(
                    logits.flatten(0, 1), batch_labels.flatten(), reduction="sum"
                ).item()
                picks[name] = logits.argmax(-1)
            agree += (picks["target"] == picks["draft"]).sum().item()
            total += batch_labels.numel()
        prompt_len = new_tokens = seq_len // 4
        starts = torch.linspace(0, len(ids) - prompt_len, 8).long().tolist()
        prompts = torch.stack([ids[s : s + prompt_len] for s in starts])
        greedy = target.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
        )
        drafted = draft(input_ids=greedy).logits[:, prompt_len - 1 : -1].argmax(-1)
        accepted = (drafted == greedy[:, prompt_len:]).float().mean().item()
    return {
        "target_loss": round(losses["target"] / total, 4),
        "draft_loss": round(losses["draft"] / total, 4),
        "draft_agreement": round(agree / total, 4),
        "greedy_acceptance": round(accepted, 4),
        "tokens": total,
    }


def _count(model: LlamaForCausalLM) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    """``python -m flockctl.engine.demo``: build the demo ahead of time; print where it is."""
    parser = argparse.ArgumentParser(
        prog="python -m flockctl.engine.demo",
        description="Build (or find cached) the offline demo model pair that --model demo serves.",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if a build is cached")
    parser.add_argument("--root", type=Path, help=f"cache directory [default: {cache_root()}]")
    args = parser.parse_args(argv)
    try:
        paths = ensure_demo(args.root, DEFAULT_RECIPE, force=args.force)
    except DemoBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(ExitCode.ERROR)
    except OSError as exc:
        where = args.root or cache_root()
        print(f"error: cannot build the demo under {where}: {exc}", file=sys.stderr)
        return int(ExitCode.ERROR)
    manifest = json.loads((paths.target.parent / _MANIFEST).read_text())
    params = manifest["params"]
    print(
        f"demo v{DEMO_VERSION}: target {params['target'] / 1e6:.1f}M and draft"
        f" {params['draft'] / 1e6:.1f}M parameters, built in {manifest['build_seconds']:.0f} s;"
        f" the draft picks the target's next token {manifest['draft_agreement']:.0%} of the time",
        file=sys.stderr,
    )
    print(f"target {paths.target}")
    print(f"draft {paths.draft}")
    return int(ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())

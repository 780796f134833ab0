"""The demo's two models, how they are trained, and how well the draft stands in for the target.

The target is trained on the text; the draft starts as the target cut after its first layers and
is then distilled from the target's logits. Every step count is fixed (never bounded by time) and
every random draw comes from the build's seeded generator, so a recipe gives the same weights on
every run on the same machine.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from flockctl.engine.demo.muon import MuonAdamW
from flockctl.engine.demo.progress import BuildProgress
from flockctl.engine.demo.recipe import MAX_POSITIONS, DemoBuildError, DemoRecipe


def new_model(
    tokenizer: PreTrainedTokenizerFast, recipe: DemoRecipe, layers: int
) -> LlamaForCausalLM:
    """A freshly initialised Llama of the recipe's width and ``layers`` deep, in float32."""
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


def copy_prefix(target: LlamaForCausalLM, draft: LlamaForCausalLM) -> None:
    """Start the draft as the target cut after its first layers: same embeddings (and so the same
    tied output head), same final norm. It then agrees with the target far sooner than from
    scratch, because it only has to learn what the skipped layers added."""
    with torch.no_grad():
        source = target.state_dict()
        for name, tensor in draft.state_dict().items():
            tensor.copy_(source[name])


def schedule(step: int, steps: int, warmup_fraction: float) -> float:
    """Linear warm-up, then cosine decay to a tenth: the usual shape, short run or long."""
    warmup = max(1, round(steps * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def train(
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
    if teacher is None:
        steps, w = recipe.target_steps, 0.0
        optimizer = MuonAdamW(model, recipe.target_lr, recipe.embedding_lr, False)
    else:
        steps, w = recipe.draft_steps, recipe.distill_weight
        optimizer = MuonAdamW(model, recipe.draft_lr, recipe.embedding_lr, True)
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
        optimizer.step(schedule(step, steps, recipe.warmup_fraction))
        loss_value = loss.item()
        bar.advance(f"loss {loss_value:.2f}")
    return round(loss_value, 4)


def evaluate(
    target: LlamaForCausalLM, draft: LlamaForCausalLM, ids: torch.Tensor, seq_len: int
) -> dict[str, float]:
    """Held-out cross-entropy of both models, and how often the draft's greedy next token is the
    target's: on real text (``draft_agreement``), and along the target's own greedy continuations
    of held-out prompts (``greedy_acceptance``, what a greedy speculative decoder accepts per
    drafted token; higher, since a model's own output is easier to predict than real text)."""
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
        # transformers types generate's self as a class its own models are not declared to be
        greedy = target.generate(  # type: ignore[misc]
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


def count_params(model: LlamaForCausalLM) -> int:
    return sum(p.numel() for p in model.parameters())

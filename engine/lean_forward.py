"""The served model's forward without transformers' module machinery, bit for bit the same.

At the sizes a CPU serves, a forward through ``LlamaForCausalLM`` costs more in module calls,
hooks, keyword plumbing, mask preparation and output wrappers than in arithmetic: on the demo's
sixteen-layer model (hidden 128) one decode step ran about 450 module calls around 113 matrix
products. :class:`ExactLlama` runs the same tensor operations, in the same order, on the same
weight tensors and dtypes as transformers' eager or SDPA path, and nothing else, so its logits
equal transformers' exactly (``torch.equal``): greedy output cannot change, only the time around
the arithmetic goes.

Unlike the draft's lean forward (:mod:`flockctl.engine.draft_forward`), nothing is fused: a
fused query/key/value product rounds differently in the last bits, which a draft may afford and
the served model may not.

It takes the call the runner makes (``input_ids``, a 4D additive ``attention_mask``,
``position_ids``, a ``Cache`` whose ``update`` stores and returns each layer's keys and values,
``logits_to_keep``) and answers with an object holding ``logits``. A model it does not cover
(another architecture or a subclass, biases, scaled rotary embeddings, another activation,
another attention implementation, quantised or hooked modules) keeps transformers' forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class LeanOutput:
    """What the runner reads of a forward's result."""

    logits: torch.Tensor


def plain_llama(model: Any) -> bool:
    """Whether ``model`` is a Llama whose forward is the plain arithmetic the lean forwards
    copy: no biases, SiLU, default rotary embeddings, no tensor-parallel split."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "llama":
        return False
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if (
        getattr(config, "attention_bias", False)
        or getattr(config, "mlp_bias", False)
        or getattr(config, "hidden_act", "silu") != "silu"
        or (rope.get("rope_type") or rope.get("type") or "default") != "default"
        or getattr(config, "pretraining_tp", 1) != 1
    ):
        return False
    inner = getattr(model, "model", None)
    return inner is not None and hasattr(inner, "rotary_emb") and hasattr(model, "lm_head")


@dataclass
class _ExactLayer:
    norm1: torch.Tensor
    eps1: float
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    norm2: torch.Tensor
    eps2: float
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm.forward``, operation for operation (its casts are skipped where they
    are no-ops: a float32 model's activations)."""
    dtype = x.dtype
    if dtype != torch.float32:
        x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * (x if dtype == torch.float32 else x.to(dtype))


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with the same roundings: ``rotate_half(x)`` is ``x``
    rolled by half a head with its first half negated, and ``-a * b`` equals ``a * -b``
    exactly, so the negation moves onto ``sin`` (computed once a forward)."""
    return (x * cos) + (torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin)


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    if n == 1:
        return x
    batch, kv_heads, length, dim = x.shape
    return (
        x[:, :, None]
        .expand(batch, kv_heads, n, length, dim)
        .reshape(batch, kv_heads * n, length, dim)
    )


class ExactLlama:
    """See the module docstring; :func:`exact_forward` builds one where it applies. It holds
    references to the model's own weight tensors (no copies)."""

    def __init__(self, model: Any):
        inner = model.model
        self.config = model.config
        self.sdpa = model.config._attn_implementation == "sdpa"
        self.embed: torch.Tensor = inner.embed_tokens.weight
        self.padding_idx = inner.embed_tokens.padding_idx
        self.norm: torch.Tensor = inner.norm.weight
        self.norm_eps = float(inner.norm.variance_epsilon)
        self.lm_head: torch.Tensor = model.lm_head.weight
        self.inv_freq: torch.Tensor = inner.rotary_emb.inv_freq
        self.attention_scaling = inner.rotary_emb.attention_scaling
        first = inner.layers[0].self_attn
        self.head_dim = int(first.head_dim)
        self.heads = int(first.q_proj.weight.shape[0]) // self.head_dim
        # the query and key products side by side (see __call__)
        self.qk_width = int(first.q_proj.weight.shape[0] + first.k_proj.weight.shape[0])
        self.groups = int(first.num_key_value_groups)
        self.scaling = float(first.scaling)
        self.layers = [
            _ExactLayer(
                layer.input_layernorm.weight,
                float(layer.input_layernorm.variance_epsilon),
                layer.self_attn.q_proj.weight,
                layer.self_attn.k_proj.weight,
                layer.self_attn.v_proj.weight,
                layer.self_attn.o_proj.weight,
                layer.post_attention_layernorm.weight,
                float(layer.post_attention_layernorm.variance_epsilon),
                layer.mlp.gate_proj.weight,
                layer.mlp.up_proj.weight,
                layer.mlp.down_proj.weight,
            )
            for layer in inner.layers[: self.config.num_hidden_layers]
        ]

    def _rotary(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``LlamaRotaryEmbedding.forward``'s cos ``[batch, 1, q, head_dim]``, and its sin with
        the first half negated (see :func:`_rope`)."""
        inv = self.inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1)
        inv = inv.to(dtype=torch.float, device=x.device)
        freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype=x.dtype).unsqueeze(1)
        sin = (emb.sin() * self.attention_scaling).to(dtype=x.dtype).unsqueeze(1)
        half = sin.shape[-1] // 2
        return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)

    def _attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """transformers' SDPA or eager attention with a 4D additive mask, ``[batch, q, heads,
        head_dim]`` contiguous."""
        key, value = _repeat_kv(key, self.groups), _repeat_kv(value, self.groups)
        if self.sdpa:
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=0.0, scale=self.scaling
            )
        else:
            weights = torch.matmul(query, key.transpose(2, 3)) * self.scaling
            weights = weights + mask
            weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
            out = torch.matmul(weights, value)
        return out.transpose(1, 2).contiguous()

    def __call__(
        self,
        *,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: Any,
        logits_to_keep: int = 0,
        **_: Any,
    ) -> LeanOutput:
        batch, length = input_ids.shape
        shape = (batch, length, -1, self.head_dim)
        x = F.embedding(input_ids, self.embed, self.padding_idx)
        cos, signed_sin = self._rotary(x, position_ids)
        heads, queries = self.heads, self.heads * self.head_dim
        for index, layer in enumerate(self.layers):
            h = _rms(x, layer.norm1, layer.eps1)
            # the query and key products side by side in one buffer (each the same matrix
            # product as F.linear's), so one rotary embedding covers both
            flat = h.view(-1, h.shape[-1])
            both = flat.new_empty((flat.shape[0], self.qk_width))
            torch.mm(flat, layer.q.t(), out=both[:, :queries])
            torch.mm(flat, layer.k.t(), out=both[:, queries:])
            value = F.linear(h, layer.v).view(shape).transpose(1, 2)
            both = _rope(both.view(shape).transpose(1, 2), cos, signed_sin)
            query, key = both[:, :heads], both[:, heads:]
            key, value = past_key_values.update(key, value, index)
            attn = self._attend(query, key, value, attention_mask)
            attn = attn.reshape(batch, length, -1).contiguous()
            x = x + F.linear(attn, layer.o)
            h = _rms(x, layer.norm2, layer.eps2)
            x = x + F.linear(F.silu(F.linear(h, layer.gate)) * F.linear(h, layer.up), layer.down)
        x = _rms(x, self.norm, self.norm_eps)
        return LeanOutput(F.linear(x[:, -logits_to_keep:, :], self.lm_head))


def exact_forward(model: torch.nn.Module) -> ExactLlama | None:
    """An :class:`ExactLlama` for ``model`` when its forward is exactly what that class
    computes; None otherwise (the caller keeps transformers' forward)."""
    try:
        from transformers.models.llama import modeling_llama as llama
    except ImportError:  # pragma: no cover - transformers without Llama
        return None
    if type(model) is not llama.LlamaForCausalLM or not plain_llama(model) or model.training:
        return None
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return None
    if getattr(model, "hf_quantizer", None) is not None:
        return None
    expected = {
        llama.LlamaForCausalLM,
        llama.LlamaModel,
        llama.LlamaDecoderLayer,
        llama.LlamaAttention,
        llama.LlamaMLP,
        llama.LlamaRMSNorm,
        llama.LlamaRotaryEmbedding,
        torch.nn.Linear,
        torch.nn.Embedding,
        torch.nn.ModuleList,
        type(llama.ACT2FN["silu"]),
    }
    for module in model.modules():
        if type(module) not in expected or module._forward_hooks or module._forward_pre_hooks:
            return None
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            return None
    if len(model.model.layers) < model.config.num_hidden_layers:
        return None
    return ExactLlama(model)

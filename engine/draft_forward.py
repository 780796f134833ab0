"""A lean forward for Llama-shaped draft models (SSMs): the same arithmetic as transformers'
``LlamaForCausalLM`` with fewer tensor operations and no module machinery on the way.

A draft model is small, so on a CPU its forward is bound by how many operations run, not by their
arithmetic: transformers' forward of the demo's two-layer draft ran about 90 tensor operations and
as many module calls, hooks and output wrappers, and cost a quarter of the sixteen-layer model's.
Here the query, key and value projections are one matrix product, the gate and up projections
another, and the rotary tables are computed once a forward. A draft only proposes tokens, and
verification keeps the served model's output whatever they are, so a draft's logits that differ in
the last bits from transformers' change what is accepted, never what is generated.

It takes the call the engine's runner makes (``input_ids``, a 4D additive ``attention_mask``,
``position_ids``, a ``Cache`` that stores and returns each layer's keys and values,
``logits_to_keep``) and answers with an object holding ``logits``. Models it does not cover
(another architecture, biases, scaled rotary embeddings, a non-SiLU activation) keep
transformers' forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from flockctl.engine.lean_forward import LeanOutput, plain_llama


@dataclass
class _Layer:
    norm1: torch.Tensor
    qkv: torch.Tensor  # [q_heads + 2 * kv_heads) * head_dim, hidden]
    out: torch.Tensor
    norm2: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor


class LeanLlama(torch.nn.Module):
    """See the module docstring; :func:`lean_forward` builds one where it applies. It holds
    the model's own weight tensors (the fused ones are copies) without registering them."""

    def __init__(self, model: Any):
        super().__init__()
        config = model.config
        inner = model.model
        self.config = config
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.eps = float(config.rms_norm_eps)
        self.scale = self.head_dim**-0.5
        self.embed: torch.Tensor = inner.embed_tokens.weight
        self.norm: torch.Tensor = inner.norm.weight
        self.lm_head: torch.Tensor = model.lm_head.weight
        self.inv_freq: torch.Tensor = inner.rotary_emb.inv_freq.float()
        self.attention_scaling = float(getattr(inner.rotary_emb, "attention_scaling", 1.0))
        with torch.no_grad():
            self.layers = [
                _Layer(
                    layer.input_layernorm.weight,
                    torch.cat(
                        [
                            layer.self_attn.q_proj.weight,
                            layer.self_attn.k_proj.weight,
                            layer.self_attn.v_proj.weight,
                        ]
                    ),
                    layer.self_attn.o_proj.weight,
                    layer.post_attention_layernorm.weight,
                    torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]),
                    layer.mlp.down_proj.weight,
                )
                for layer in inner.layers
            ]

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x.to(dtype)

    @torch.inference_mode()
    def forward(
        self,
        *,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: Any,
        logits_to_keep: int = 0,
        **_: Any,
    ) -> LeanOutput:
        batch, q = input_ids.shape
        x = F.embedding(input_ids, self.embed)
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(x.dtype)[:, None]
        sin = (emb.sin() * self.attention_scaling).to(x.dtype)[:, None]
        half = self.head_dim // 2
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        repeat = heads // kv_heads
        for index, layer in enumerate(self.layers):
            h = self._rms(x, layer.norm1)
            qkv = F.linear(h, layer.qkv).view(batch, q, heads + 2 * kv_heads, dim).transpose(1, 2)
            both = qkv[:, : heads + kv_heads]
            rotated = torch.cat((-both[..., half:], both[..., :half]), dim=-1)
            both = both * cos + rotated * sin
            query, key = both[:, :heads], both[:, heads:]
            value = qkv[:, heads + kv_heads :]
            key, value = past_key_values.update(key, value, index)
            if repeat > 1:
                key = key.repeat_interleave(repeat, dim=1)
                value = value.repeat_interleave(repeat, dim=1)
            attn = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, scale=self.scale
            )
            x = x + F.linear(attn.transpose(1, 2).reshape(batch, q, heads * dim), layer.out)
            h = self._rms(x, layer.norm2)
            gate, up = F.linear(h, layer.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.down)
        x = self._rms(x[:, -logits_to_keep:] if logits_to_keep else x, self.norm)
        return LeanOutput(F.linear(x, self.lm_head))


def lean_forward(model: torch.nn.Module) -> LeanLlama | None:
    """A :class:`LeanLlama` for ``model`` when it is a plain Llama; None otherwise."""
    return LeanLlama(model) if plain_llama(model) else None

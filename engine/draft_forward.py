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

from typing import Any

import torch
import torch.nn.functional as F

from flockctl.engine.kv import BatchView
from flockctl.engine.kv_io import LayersIO, layer_kv
from flockctl.engine.lean_forward import LeanOutput, plain_llama, scripted


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _draft(
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    position_ids: torch.Tensor,
    keep: int,
    embed: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    layers: list[list[torch.Tensor]],
    final: list[torch.Tensor],
    eps: float,
    sizes: list[int],
    io: LayersIO,
) -> torch.Tensor:
    """:class:`LeanLlama`'s forward, scripted where TorchScript is there (as the served
    model's, :mod:`flockctl.engine.lean_forward`). ``layers[i]``: layer ``i``'s input norm,
    fused query/key/value weight, output weight, post-attention norm, fused gate/up weight and
    down weight; ``final``: the last norm and the LM head; ``sizes``: query heads, key/value
    heads, head dim."""
    batch, q = input_ids.size(0), input_ids.size(1)
    heads, kv_heads, dim = sizes[0], sizes[1], sizes[2]
    x = F.embedding(input_ids, embed)
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * attention_scaling).to(x.dtype)[:, None]
    sin = (emb.sin() * attention_scaling).to(x.dtype)[:, None]
    half = dim // 2
    repeat = heads // kv_heads
    scale = dim**-0.5
    for index in range(len(layers)):
        norm1, qkv_weight, out, norm2, gate_up, down = layers[index]
        h = _rms(x, norm1, eps)
        qkv = F.linear(h, qkv_weight).view(batch, q, heads + 2 * kv_heads, dim).transpose(1, 2)
        both = qkv[:, : heads + kv_heads]
        rotated = torch.cat((-both[:, :, :, half:], both[:, :, :, :half]), dim=-1)
        both = both * cos + rotated * sin
        query, key = both[:, :heads], both[:, heads:]
        value = qkv[:, heads + kv_heads :]
        key, value = layer_kv(key, value, index, io)
        if repeat > 1:
            key = key.repeat_interleave(repeat, dim=1)
            value = value.repeat_interleave(repeat, dim=1)
        attn = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
        x = x + F.linear(attn.transpose(1, 2).reshape(batch, q, heads * dim), out)
        h = _rms(x, norm2, eps)
        gate, up = F.linear(h, gate_up).chunk(2, dim=-1)
        x = x + F.linear(F.silu(gate) * up, down)
    x = _rms(x[:, -keep:] if keep > 0 else x, final[0], eps)
    return F.linear(x, final[1])


class LeanLlama(torch.nn.Module):
    """See the module docstring; :func:`lean_forward` builds one where it applies. It holds
    the model's own weight tensors (the fused ones are copies) without registering them."""

    def __init__(self, model: Any):
        super().__init__()
        config = model.config
        inner = model.model
        self.config = config
        heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        self.sizes = [heads, self.kv_heads, self.head_dim]
        self.eps = float(config.rms_norm_eps)
        self.embed: torch.Tensor = inner.embed_tokens.weight
        self.final = [inner.norm.weight, model.lm_head.weight]
        self.inv_freq: torch.Tensor = inner.rotary_emb.inv_freq.float()
        self.attention_scaling = float(getattr(inner.rotary_emb, "attention_scaling", 1.0))
        with torch.no_grad():
            self.layers = [
                [
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
                ]
                for layer in inner.layers
            ]
        # scripted on a CPU only, as the served model's forward (engine/lean_forward.py)
        self._draft = scripted(_draft) if self.embed.device.type == "cpu" else _draft
        self._weights = (
            self.embed,
            self.inv_freq,
            self.attention_scaling,
            self.layers,
            self.final,
            self.eps,
            self.sizes,
        )

    @torch.inference_mode()
    def forward(
        self,
        *,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: BatchView,
        logits_to_keep: int = 0,
        **_: Any,
    ) -> LeanOutput:
        io = past_key_values.layers_io(self.kv_heads, self.head_dim)
        logits = self._draft(
            input_ids, attention_mask, position_ids, logits_to_keep, *self._weights, io
        )
        return LeanOutput(logits)


def lean_forward(model: torch.nn.Module) -> LeanLlama | None:
    """A :class:`LeanLlama` for ``model`` when it is a plain Llama; None otherwise."""
    return LeanLlama(model) if plain_llama(model) else None

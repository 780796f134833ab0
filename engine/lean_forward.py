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

On a CPU the forward runs as one TorchScript function (:func:`scripted`), which lets the GIL go
for the whole call and takes it back once, instead of taking it back after each of a few hundred
operations: the engine's event loop streams tokens in the same process, and every operation of an
unscripted forward waited for it. TorchScript does not fuse on a CPU, so the operations and their
roundings stay the same (the tests compare both ways with ``torch.equal``). On CUDA its fuser
would fuse element-wise operations, which round differently, so there the forward runs as Python.

It takes the call the runner makes (``input_ids``, a 4D additive ``attention_mask``,
``position_ids``, the runner's :class:`~flockctl.engine.kv.BatchView` of the paged KV cache,
``logits_to_keep``) and answers with an object holding ``logits``. A model it does not cover
(another architecture or a subclass, biases, scaled rotary embeddings, another activation,
another attention implementation, quantised or hooked modules) keeps transformers' forward.
"""

import logging
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from flockctl.engine import decode_attention as _decode_attention  # noqa: F401 (registers the op)
from flockctl.engine.kv import BatchView
from flockctl.engine.kv_io import LayersIO, layer_kv

log = logging.getLogger("flockctl.engine")


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


def layer_weights(layer: Any) -> list[torch.Tensor]:
    """A Llama decoder layer's weights in the order :func:`_exact` takes them: input norm,
    query, key, value and output, post-attention norm, gate, up and down."""
    attn, mlp = layer.self_attn, layer.mlp
    return [
        layer.input_layernorm.weight,
        attn.q_proj.weight,
        attn.k_proj.weight,
        attn.v_proj.weight,
        attn.o_proj.weight,
        layer.post_attention_layernorm.weight,
        mlp.gate_proj.weight,
        mlp.up_proj.weight,
        mlp.down_proj.weight,
    ]


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
    return (x * cos) + (torch.roll(x, x.size(-1) // 2, dims=-1) * signed_sin)


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    if n == 1:
        return x
    batch, kv_heads, length, dim = x.size(0), x.size(1), x.size(2), x.size(3)
    return (
        x[:, :, None]
        .expand(batch, kv_heads, n, length, dim)
        .reshape(batch, kv_heads * n, length, dim)
    )


class Shape(NamedTuple):
    """The sizes and constants of an :class:`ExactLlama`'s arithmetic."""

    heads: int
    head_dim: int
    qk_width: int  # query and key features side by side
    groups: int  # query heads per key/value head
    scaling: float
    attention_scaling: float
    sdpa: bool  # transformers' SDPA attention, else its eager attention


def _exact(
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    position_ids: torch.Tensor,
    keep: int,
    embed: torch.Tensor,
    inv_freq: torch.Tensor,
    layers: list[list[torch.Tensor]],
    eps: list[list[float]],
    final: list[torch.Tensor],
    final_eps: float,
    shape: Shape,
    io: LayersIO,
) -> torch.Tensor:
    """The forward :class:`ExactLlama` runs, scripted where TorchScript is there (see the
    module docstring). ``layers[i]``: layer ``i``'s input norm, query, key, value and output
    weights, post-attention norm, gate, up and down weights; ``eps[i]`` its norms' epsilons;
    ``final``: the last norm and the LM head."""
    batch, length = input_ids.size(0), input_ids.size(1)
    x = F.embedding(input_ids, embed)
    # LlamaRotaryEmbedding.forward's cos and sin [batch, 1, q, head_dim]; the sin's first half
    # negated (see _rope)
    inv = inv_freq[None, :, None].expand(position_ids.size(0), -1, 1)
    inv = inv.to(dtype=torch.float, device=x.device)
    freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * shape.attention_scaling).to(dtype=x.dtype).unsqueeze(1)
    sin = (emb.sin() * shape.attention_scaling).to(dtype=x.dtype).unsqueeze(1)
    half = sin.size(-1) // 2
    signed_sin = torch.cat((-sin[:, :, :, :half], sin[:, :, :, half:]), dim=-1)
    heads = shape.heads
    queries = heads * shape.head_dim
    for index in range(len(layers)):
        norm1, wq, wk, wv, wo, norm2, gate, up, down = layers[index]
        h = _rms(x, norm1, eps[index][0])
        # the query and key products side by side in one buffer (each the same matrix
        # product as F.linear's), so one rotary embedding covers both
        flat = h.view(-1, h.size(-1))
        both = flat.new_empty((flat.size(0), shape.qk_width))
        torch.mm(flat, wq.t(), out=both[:, :queries])
        torch.mm(flat, wk.t(), out=both[:, queries:])
        value = F.linear(h, wv).view(batch, length, -1, shape.head_dim).transpose(1, 2)
        both = _rope(both.view(batch, length, -1, shape.head_dim).transpose(1, 2), cos, signed_sin)
        query, key = both[:, :heads], both[:, heads:]
        key, value = layer_kv(key, value, index, io)
        lengths = io.lengths
        if lengths is not None:  # a decode step over dense rows (engine/decode_attention.py)
            attn = torch.ops.flockctl.decode_attention(
                query, io.dense_keys[index], io.dense_values[index], lengths,
                shape.groups, shape.scaling,
            )  # fmt: skip
        elif shape.sdpa:  # transformers' SDPA or eager attention with a 4D additive mask
            key, value = _repeat_kv(key, shape.groups), _repeat_kv(value, shape.groups)
            attn = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=0.0, scale=shape.scaling
            )
        else:
            key, value = _repeat_kv(key, shape.groups), _repeat_kv(value, shape.groups)
            weights = torch.matmul(query, key.transpose(2, 3)) * shape.scaling
            weights = weights + mask
            weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
            attn = torch.matmul(weights, value)
        attn = attn.transpose(1, 2).contiguous().reshape(batch, length, -1).contiguous()
        x = x + F.linear(attn, wo)
        h = _rms(x, norm2, eps[index][1])
        x = x + F.linear(F.silu(F.linear(h, gate)) * F.linear(h, up), down)
    x = _rms(x, final[0], final_eps)
    return F.linear(x[:, -keep:, :], final[1])


class Scripted:
    """A TorchScript function whose errors read as the failed operation's own: TorchScript's
    message is the script's traceback, a dozen lines, and the engine passes a forward's error
    to the requests it fails. The whole message stays on the exception's cause (logged)."""

    def __init__(self, function: Any):
        self.function = function

    def __call__(self, *args: Any) -> Any:
        try:
            return self.function(*args)
        except RuntimeError as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            if len(lines) < 2 or not lines[0].startswith("The following operation failed"):
                raise
            raise RuntimeError(lines[-1].strip()) from exc


_scripted: dict[Any, Any] = {}  # function -> its scripted self, once compiled


def scripted(function: Any) -> Any:
    """``function`` compiled by TorchScript (a :class:`Scripted`), else ``function`` itself:
    the same operations either way. TorchScript is deprecated in torch 2.x but kept, and it is
    the one way there to run a whole forward in one call that takes the GIL back once
    (torch.compile's kernels would round differently)."""
    done = _scripted.get(function)
    if done is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                done = Scripted(torch.jit.script(function))
        except Exception as exc:  # a torch without TorchScript, or one that cannot compile it
            log.info("%s runs unscripted: %s", function.__name__, exc)
            done = function
        _scripted[function] = done
    return done


class ExactLlama:
    """See the module docstring; :func:`exact_forward` builds one where it applies. It holds
    references to the model's own weight tensors (no copies)."""

    def __init__(self, model: Any):
        inner = model.model
        self.config = model.config
        self.embed: torch.Tensor = inner.embed_tokens.weight
        self.inv_freq: torch.Tensor = inner.rotary_emb.inv_freq
        first = inner.layers[0].self_attn
        head_dim = int(first.head_dim)
        self.kv_heads = int(first.k_proj.weight.shape[0]) // head_dim
        self.shape = Shape(
            heads=int(first.q_proj.weight.shape[0]) // head_dim,
            head_dim=head_dim,
            qk_width=int(first.q_proj.weight.shape[0] + first.k_proj.weight.shape[0]),
            groups=int(first.num_key_value_groups),
            scaling=float(first.scaling),
            attention_scaling=float(inner.rotary_emb.attention_scaling),
            sdpa=model.config._attn_implementation == "sdpa",
        )
        layers = inner.layers[: self.config.num_hidden_layers]
        self.layers = [layer_weights(layer) for layer in layers]
        self.eps = [
            [
                float(layer.input_layernorm.variance_epsilon),
                float(layer.post_attention_layernorm.variance_epsilon),
            ]
            for layer in layers
        ]
        self.final = [inner.norm.weight, model.lm_head.weight]
        self.final_eps = float(inner.norm.variance_epsilon)
        cpu = self.embed.device.type == "cpu"
        self._forward = scripted(_exact) if cpu else _exact  # see the module docstring
        self._weights = (
            self.embed,
            self.inv_freq,
            self.layers,
            self.eps,
            self.final,
            self.final_eps,
            self.shape,
        )

    def __call__(
        self,
        *,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: BatchView,
        logits_to_keep: int = 0,
        **_: Any,
    ) -> LeanOutput:
        io = past_key_values.layers_io(self.kv_heads, self.shape.head_dim)
        logits = self._forward(
            input_ids, attention_mask, position_ids, logits_to_keep, *self._weights, io
        )
        return LeanOutput(logits)


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

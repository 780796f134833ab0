"""The lean forward of Llama-shaped draft models gives transformers' logits, through the engine's
own runner and paged KV cache, for prompts, single tokens and token trees."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from flockctl.engine.draft_forward import LeanLlama, lean_forward
from flockctl.engine.kv import KVPool, num_layers
from flockctl.engine.runner import Feed, Runner
from flockctl.engine.spec import TokenTree


def llama(**overrides: object) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        vocab_size=300,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


def runs(model: torch.nn.Module, forward: torch.nn.Module) -> list[torch.Tensor]:
    """Two jobs through a runner: prompts of different lengths, a token each, then a token tree
    for one of them beside a single token for the other."""
    pool = KVPool(num_layers(model.config), 512, torch.device("cpu"), torch.float32, block_size=8)
    runner = Runner(forward, pool, torch.device("cpu"))
    prompts = [list(range(3, 40)), list(range(50, 61))]
    for job, prompt in zip("ab", prompts, strict=True):
        pool.reserve(job, len(prompt) + 8)
    out = runner.run(["a", "b"], [Feed.linear(p, 0, keep=len(p)) for p in prompts])
    out += runner.run(["a", "b"], [Feed.linear([7], 37), Feed.linear([8], 11)])
    tree = TokenTree(9)
    first = tree.add(0, 4)
    tree.add(0, 5)
    tree.add(first, 6)
    nodes = list(range(len(tree)))
    feeds = [
        Feed.token_tree(tree.tokens, tree.depths, nodes, 38, tree.ancestry()),
        Feed.linear([10], 12),
    ]
    return out + runner.run(["a", "b"], feeds)


def test_lean_forward_gives_transformers_logits() -> None:
    model = llama()
    lean = lean_forward(model)
    assert isinstance(lean, LeanLlama)
    with torch.inference_mode():
        want, got = runs(model, model), runs(model, lean)
    for w, g in zip(want, got, strict=True):
        assert w.shape == g.shape
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
        assert torch.equal(g.argmax(-1), w.argmax(-1))


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(lambda: llama(attention_bias=True), id="attention-bias"),
        pytest.param(lambda: llama(hidden_act="gelu"), id="gelu"),
        pytest.param(
            lambda: llama(
                rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
            ),
            id="scaled-rope",
        ),
        pytest.param(
            lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)),
            id="gpt2",
        ),
    ],
)
def test_other_models_keep_transformers_forward(model: object) -> None:
    assert lean_forward(model()) is None  # type: ignore[operator]

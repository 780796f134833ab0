"""The served model's lean forward gives transformers' logits bit for bit (``torch.equal``), on
tiny real Llamas: straight against transformers' forward over a prompt and the tokens after it,
and through the engine's runner over prefills, batched decodes of jobs of different lengths
(left padding, masks), chunked prefills and token trees; greedy output stays transformers'."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from flockctl.engine.job import Job, SamplingParams
from flockctl.engine.kv import KVPool, num_layers
from flockctl.engine.lean_forward import ExactLlama, Scripted, _exact, exact_forward, scripted
from flockctl.engine.runner import Feed, Runner
from flockctl.engine.spec import TokenTree


def llama(attn: str = "sdpa", dtype: torch.dtype = torch.float32, **overrides: object) -> Any:
    torch.manual_seed(0)
    settings: dict[str, object] = {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # grouped-query attention
        "vocab_size": 300,
    }
    settings.update(overrides)
    config = LlamaConfig(**settings)  # type: ignore[arg-type]
    config._attn_implementation = attn
    return LlamaForCausalLM(config).to(dtype).eval()


MODELS = [
    pytest.param(lambda: llama("sdpa"), id="sdpa-gqa"),
    pytest.param(lambda: llama("eager"), id="eager-gqa"),
    pytest.param(lambda: llama("sdpa", num_key_value_heads=4), id="sdpa-mha"),
    pytest.param(lambda: llama("sdpa", torch.bfloat16), id="sdpa-bf16"),
    pytest.param(lambda: llama("eager", torch.bfloat16), id="eager-bf16"),
]


def causal(batch: int, q: int, past: int, dtype: torch.dtype) -> torch.Tensor:
    """A 4D additive mask for ``q`` new tokens after ``past`` cached ones."""
    seen = torch.arange(past + q)[None, :] <= (past + torch.arange(q))[:, None]
    mask = torch.zeros(q, past + q, dtype=dtype).masked_fill_(~seen, torch.finfo(dtype).min)
    return mask.expand(batch, 1, q, past + q)


@pytest.mark.parametrize("make", MODELS)
@torch.inference_mode()
def test_same_logits_as_transformers_for_a_prompt_and_the_tokens_after(make: Any) -> None:
    model = make()
    lean = exact_forward(model)
    assert isinstance(lean, ExactLlama)
    dtype = model.dtype
    prompt = torch.tensor([[3, 9, 27, 81, 4, 12, 36, 108, 25, 75, 7]])
    feeds = [(prompt, 0), (torch.tensor([[17]]), 11), (torch.tensor([[5, 6, 7]]), 12)]
    for keep in (0, 1, 2):
        cache = DynamicCache(config=model.config)
        # blocks of one token: the lean forward's keys are exactly transformers' (no masked
        # slots to the end of a block), read as one slice of the pool
        pool = KVPool(num_layers(model.config), 64, torch.device("cpu"), dtype, block_size=1)
        runner = Runner(model, pool, torch.device("cpu"))
        assert runner.lean is not None
        for ids, past in feeds:
            length = ids.shape[1]
            want = model(
                input_ids=ids,
                attention_mask=causal(1, length, past, dtype),
                position_ids=torch.arange(past, past + length)[None],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=keep,
            ).logits[0]
            pool.reserve("job", past + length)
            feed = Feed.linear(ids[0].tolist(), past, keep or length)
            got = runner.run(["job"], [feed])[0]
            assert got.shape == want.shape
            assert torch.equal(got, want.float())  # the runner's logits are float32


def through_runner(
    model: torch.nn.Module,
    lean: bool,
    dtype: torch.dtype,
    script: bool = True,
    attention: str = "exact",
    fused: bool = False,
    fused_threads: int = 1,
) -> list[torch.Tensor]:
    """Logits of a runner's forwards: prompts of different lengths prefilled together (one in
    two chunks), batched decodes with left padding, a job joining mid-way, and a token tree
    beside a single token. ``script=False``: the lean forward runs as plain Python; the last
    tensor: every job's greedy tokens."""
    pool = KVPool(num_layers(model.config), 1024, torch.device("cpu"), dtype, block_size=4)
    runner = Runner(
        model, pool, torch.device("cpu"), lean=lean, attention=attention, fused=fused,
        fused_threads=fused_threads,
    )  # fmt: skip
    assert (runner.lean is not None) == lean
    if runner.lean is not None and not script:
        runner.lean._forward = _exact
    jobs = [Job(list(range(3 + k, 3 + k + n)), SamplingParams(max_tokens=64)) for k, n in
            ((0, 13), (40, 5), (80, 9))]  # fmt: skip
    out: list[torch.Tensor] = []

    def step(batch: list[Job], counts: list[int | None] | None = None) -> None:
        for job in batch:
            pool.reserve(job.id, job.total_tokens)
        logits = runner.forward(batch, counts)
        out.append(logits)
        for i, (job, row) in enumerate(zip(batch, logits, strict=True)):
            n = counts[i] if counts is not None else None
            if n is not None:
                job.cached_tokens += n
                continue
            job.cached_tokens = job.total_tokens
            job.output_ids.append(int(row.argmax()))

    a, b, c = jobs
    step([a, b], [6, None])  # a's first chunk beside b's whole prompt
    step([a, b])  # a's rest of the prompt beside b's first decode
    for _ in range(3):
        step([a, b])
    step([c, a, b])  # c's prefill beside two decodes
    for _ in range(4):
        step([b, c, a])
    tree = TokenTree(11)
    first = tree.add(0, 4)
    tree.add(0, 5)
    tree.add(first, 6)
    root = a.total_tokens
    pool.reserve(a.id, root + len(tree))
    pool.reserve(b.id, b.total_tokens)
    feeds = [
        Feed.token_tree(tree.tokens, tree.depths, list(range(len(tree))), root, tree.ancestry()),
        Feed.linear(runner.tokens(b), b.cached_tokens),
    ]
    out.extend(runner.run([a.id, b.id], feeds))
    out.append(torch.tensor([t for job in jobs for t in job.output_ids]))
    runner.close()
    return out


@pytest.mark.parametrize("make", MODELS)
def test_same_logits_through_the_runner(make: Any) -> None:
    model = make()
    with torch.inference_mode():
        want = through_runner(model, False, model.dtype)
        got = through_runner(model, True, model.dtype)
    assert len(got) == len(want)
    for w, g in zip(want, got, strict=True):
        assert torch.equal(g, w)


def test_the_lean_forward_runs_scripted_and_as_python_alike() -> None:
    """The served model's forward is one TorchScript function (a forward holds the GIL once,
    not between each operation); where TorchScript cannot compile it the same function runs
    as Python, with the same logits."""
    model = llama()
    lean = exact_forward(model)
    assert lean is not None
    assert isinstance(lean._forward, Scripted)
    assert isinstance(lean._forward.function, torch.jit.ScriptFunction)
    assert scripted(_exact) is lean._forward  # compiled once a process
    with torch.inference_mode():
        want = through_runner(model, True, model.dtype, script=False)
        got = through_runner(model, True, model.dtype)
    for w, g in zip(want, got, strict=True):
        assert torch.equal(g, w)


@torch.inference_mode()
def test_a_failing_scripted_forward_says_what_failed_in_one_line() -> None:
    model = llama()
    pool = KVPool(num_layers(model.config), 64, torch.device("cpu"), model.dtype, block_size=4)
    runner = Runner(model, pool, torch.device("cpu"))
    pool.reserve("job", 3)
    with pytest.raises(RuntimeError) as failed:
        runner.run(["job"], [Feed.linear([1, 2, model.config.vocab_size], 0)])
    assert str(failed.value) == "RuntimeError: index out of range in self"
    assert "TorchScript" in str(failed.value.__cause__)  # the whole traceback, for the log


@torch.inference_mode()
def test_greedy_output_is_transformers_generate(tiny: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    prompt = [5, 17, 33, 2, 90, 41, 7]
    want = model.generate(
        torch.tensor([prompt]), max_new_tokens=24, do_sample=False, min_new_tokens=24
    )[0, len(prompt) :].tolist()
    pool = KVPool(num_layers(model.config), 512, torch.device("cpu"), torch.float32, 16)
    runner = Runner(model, pool, torch.device("cpu"))
    assert runner.lean is not None
    job = Job(list(prompt), SamplingParams(max_tokens=24))
    eos = model.generation_config.eos_token_id
    while len(job.output_ids) < 24:
        pool.reserve(job.id, job.total_tokens)
        logits = runner.forward([job])[0]
        logits[eos] = float("-inf")  # as min_new_tokens does
        job.cached_tokens = job.total_tokens
        job.output_ids.append(int(logits.argmax()))
    assert job.output_ids == want


def hooked() -> torch.nn.Module:
    model = llama()
    model.model.layers[0].mlp.register_forward_hook(lambda *_: None)
    return model


class Subclass(LlamaForCausalLM):
    pass


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
        pytest.param(lambda: llama("flex_attention"), id="flex-attention"),
        pytest.param(hooked, id="forward-hook"),
        pytest.param(lambda: Subclass(llama().config).eval(), id="subclass"),
        pytest.param(
            lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)),
            id="gpt2",
        ),
    ],
)
def test_other_models_keep_transformers_forward(model: Any) -> None:
    built = model()
    assert exact_forward(built) is None
    pool = KVPool(num_layers(built.config), 64, torch.device("cpu"), torch.float32, 4)
    assert Runner(built, pool, torch.device("cpu")).lean is None

"""The CPU decode attention kernel (``--attention fast``): SDPA's result within float32
rounding, each row read to its own length and no further, used by the runner for decode steps
over dense rows only, with greedy output unchanged."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_lean_forward import llama, through_runner
from tinymodel import greedy_continuations

from flockctl.engine import decode_attention, runner
from flockctl.engine.config import EngineConfig
from flockctl.engine.job import SamplingParams
from flockctl.engine.kv import KVPool, num_layers
from flockctl.engine.loader import load_engine
from flockctl.engine.runner import Runner


@pytest.mark.parametrize("groups", [1, 2])
def test_the_kernel_is_sdpa_over_each_rows_own_length(groups: int) -> None:
    torch.manual_seed(0)
    kv_heads, dim, width = 2, 16, 40
    lengths = torch.tensor([1, 7, 33, 39, 20])
    batch = len(lengths)
    keys = torch.randn(batch + 3, kv_heads, width, dim)  # rows past the batch: not read
    values = torch.randn(batch + 3, kv_heads, width, dim)
    for row, length in enumerate(lengths.tolist()):
        keys[row, :, length:] = float("nan")  # past a row's length: never read
        values[row, :, length:] = float("nan")
    query = torch.randn(batch, kv_heads * groups, 1, dim)
    got = torch.ops.flockctl.decode_attention(query, keys, values, lengths, groups, 0.25)
    assert got.shape == query.shape
    for row, length in enumerate(lengths.tolist()):
        k = keys[row : row + 1, :, :length].repeat_interleave(groups, dim=1)
        v = values[row : row + 1, :, :length].repeat_interleave(groups, dim=1)
        want = F.scaled_dot_product_attention(query[row : row + 1], k, v, scale=0.25)
        torch.testing.assert_close(got[row : row + 1], want, rtol=1e-5, atol=1e-6)


def counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    kernel = decode_attention._kernel

    def count(*args: Any) -> None:
        calls.append(args[0].shape[0])  # the batch
        kernel(*args)

    monkeypatch.setattr(decode_attention, "_kernel", count)
    return calls


@pytest.mark.parametrize("script", [True, False])
def test_fast_runner_keeps_the_exact_logits_within_rounding(
    monkeypatch: pytest.MonkeyPatch, script: bool
) -> None:
    """Through the runner's sequence (chunked prefills, padded batched decodes, a job joining, a
    token tree): decode steps over several jobs take the kernel, the rest keep SDPA; logits
    within float32 rounding of the exact forward's and the same greedy tokens."""
    model = llama()
    monkeypatch.setattr(runner, "KERNEL_MIN_BATCH", 2)  # the sequence's batches are small
    calls = counting(monkeypatch)
    with torch.inference_mode():
        exact = through_runner(model, True, torch.float32)
        assert calls == []
        fast = through_runner(model, True, torch.float32, script=script, attention="fast")
    assert calls and set(calls) == {2, 3}  # the batched decodes, one call a layer
    assert len(calls) % model.config.num_hidden_layers == 0
    assert torch.equal(fast[-1], exact[-1])  # greedy tokens
    assert any(not torch.equal(f, e) for f, e in zip(fast, exact, strict=True))
    for f, e in zip(fast[:-1], exact[:-1], strict=True):
        torch.testing.assert_close(f, e, rtol=1e-4, atol=1e-5)


def test_the_kernel_is_left_out_where_it_does_not_apply() -> None:
    cpu = torch.device("cpu")
    bf16 = llama(dtype=torch.bfloat16)
    pool = KVPool(num_layers(bf16.config), 64, cpu, torch.bfloat16)
    assert not Runner(bf16, pool, cpu, attention="fast").fast_decode  # float32 only
    model = llama()
    pool = KVPool(num_layers(model.config), 64, cpu, torch.float32)
    assert Runner(model, pool, cpu, attention="fast").fast_decode
    assert not Runner(model, pool, cpu).fast_decode  # exact by default
    assert not Runner(model, pool, cpu, lean=False, attention="fast").fast_decode


def test_engine_config_names_a_bad_attention() -> None:
    with pytest.raises(ValueError, match="attention must be fast or exact, got 'flash'"):
        EngineConfig(model="demo", attention="flash")
    assert EngineConfig(model="demo").attention == "fast"


def test_batches_below_the_kernels_minimum_keep_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``KERNEL_MIN_BATCH`` jobs a call a layer costs more than the kernel saves: the
    runner's small batches keep transformers' attention, logits bit for bit."""
    model = llama()
    calls = counting(monkeypatch)
    with torch.inference_mode():
        exact = through_runner(model, True, torch.float32)
        fast = through_runner(model, True, torch.float32, attention="fast")
    assert calls == []
    for f, e in zip(fast, exact, strict=True):
        assert torch.equal(f, e)


@pytest.mark.parametrize("attention", ["fast", "exact"])
async def test_an_engine_decoding_eight_jobs_keeps_transformers_greedy_output(
    tiny: Path, monkeypatch: pytest.MonkeyPatch, attention: str
) -> None:
    """Eight greedy jobs decoding together take the kernel with ``--attention fast`` (and never
    with ``exact``); each one's tokens are what transformers gives one prompt at a time, and
    ``/stats`` says which attention runs."""
    prompts = [[5 + i, 40 + 3 * i, 7, 90 + i, *range(11, 11 + 2 * i)] for i in range(8)]
    want = greedy_continuations(tiny, prompts, 12)
    # two torch threads: no fused forward (tests/test_fused_forward.py), the decodes over the
    # dense rows are the lean forward's
    threads = torch.get_num_threads()
    config = EngineConfig(
        model=str(tiny), device="cpu", max_batch_size=8, attention=attention, threads=2
    )
    engine = load_engine(config, progress=False)  # the kernel compiled at start, 1 row
    calls = counting(monkeypatch)
    try:
        assert engine.runner.fused is None
        assert engine.stats()["attention"] == attention
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

        async def run(prompt: list[int]) -> list[int]:
            ids: list[int] = []
            async for delta in engine.submit(prompt, params):
                ids.extend(delta.token_ids)
            return ids

        got = await asyncio.gather(*(run(p) for p in prompts))
    finally:
        engine.close()
        torch.set_num_threads(threads)
    assert got == want
    assert (8 in calls) is (attention == "fast")
    assert all(batch >= runner.KERNEL_MIN_BATCH for batch in calls)

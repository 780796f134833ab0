"""The engine's CUDA path, where a CUDA device exists (skipped elsewhere): greedy output equal to
transformers' on the same device, alone and batched, with speculation, with prefix caching on and
off, and with jobs swapped out to host memory and back; embeddings equal to transformers'; and the
engine naming its device by index and UUID, as the daemon reads NVML by.

Run on a GPU machine with ``pytest tests/test_cuda.py``; ``scripts/gpu-check`` runs it with the
other checks that need a GPU."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tinymodel import build_near_model
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from flockctl.engine.config import EngineConfig
from flockctl.engine.engine import Engine
from flockctl.engine.job import Job
from flockctl.engine.loader import load_engine
from flockctl.engine.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
SYSTEM = (
    "the scheduler picks jobs from queues that never starve while servers answer requests in"
    " batches and memory holds keys and values for every sequence until the job is done"
)
QUESTIONS = ["hello", "the quick brown fox", "a flock of birds", "tokens stream out one by one"]


@pytest.fixture(scope="module")
def prompts(tiny: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    return [tokenizer.encode(f"{SYSTEM} {q}") for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference(tiny: Path, prompts: list[list[int]]) -> list[list[int]]:
    """transformers' greedy tokens on the GPU: full forwards, no cache, one prompt at a time."""
    model = AutoModelForCausalLM.from_pretrained(tiny).to("cuda").eval()
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(GREEDY.max_tokens):
                logits = model(torch.tensor([ids], device="cuda")).logits
                ids.append(int(logits[0, -1].argmax()))
            out.append(ids[len(prompt) :])
    return out


def cuda_engine(tiny: Path, **kw: Any) -> Iterator[Engine]:
    # float32, as the reference: the engine's default on CUDA is bfloat16
    kw.setdefault("dtype", "float32")
    engine = load_engine(EngineConfig(model=str(tiny), device="cuda", **kw), progress=False)
    try:
        yield engine
    finally:
        engine.close()


async def generate(engine: Engine, prompt: list[int]) -> tuple[list[int], Job]:
    handle = engine.submit(prompt, GREEDY)
    ids: list[int] = []
    async for delta in handle:
        ids.extend(delta.token_ids)
    return ids, handle.job


async def all_at_once(engine: Engine, prompts: list[list[int]]) -> list[tuple[list[int], Job]]:
    return list(await asyncio.gather(*(generate(engine, p) for p in prompts)))


async def test_greedy_output_equals_transformers_alone_and_batched(
    tiny: Path, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    for engine in cuda_engine(tiny, max_batch_size=4):
        alone = [(await generate(engine, p))[0] for p in prompts]
        batched = [ids for ids, _ in await all_at_once(engine, prompts)]
        assert alone == reference
        assert batched == reference
        assert engine.stats()["device"]["type"] == "cuda"


async def test_jobs_swapped_to_host_memory_and_back_keep_their_output(
    tiny: Path, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    # room for about two jobs on the device: the others wait or are swapped out to the host
    for engine in cuda_engine(tiny, max_batch_size=4, block_size=4, kv_budget=96):
        results = await all_at_once(engine, prompts)
        assert [ids for ids, _ in results] == reference
        assert sum(job.preemption_count for _, job in results) > 0


async def test_prefix_caching_shares_blocks_on_the_device_and_keeps_the_output(
    tiny: Path, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    for engine in cuda_engine(tiny, max_batch_size=4, block_size=4):
        first = await generate(engine, prompts[0])
        rest = await all_at_once(engine, prompts[1:])
        assert [ids for ids, _ in [first, *rest]] == reference
        cache = engine.stats()["prefix_cache"]
        assert cache is not None and cache["hits"] > 0


async def test_speculative_output_equals_transformers(
    tiny: Path, prompts: list[list[int]], reference: list[list[int]], tmp_path: Path
) -> None:
    near = build_near_model(tiny, tmp_path / "near")
    for engine in cuda_engine(tiny, max_batch_size=4, draft_models=(str(near),), spec="on"):
        results = await all_at_once(engine, prompts)
        assert [ids for ids, _ in results] == reference
        assert engine.stats()["speculation"]["num_drafts"] > 0


async def test_embeddings_equal_transformers_on_the_device(
    tiny: Path, prompts: list[list[int]]
) -> None:
    model = AutoModel.from_pretrained(tiny).to("cuda").eval()
    for engine in cuda_engine(tiny):
        vectors = await engine.embedder.embed(prompts[:2])
        for prompt, vector in zip(prompts[:2], vectors, strict=True):
            with torch.inference_mode():
                hidden = model(input_ids=torch.tensor([prompt], device="cuda")).last_hidden_state
            expected = torch.nn.functional.normalize(hidden[0, -1], dim=-1).cpu()
            assert torch.allclose(torch.tensor(vector), expected, atol=1e-4, rtol=0)


def test_the_engine_names_its_gpu_by_index_and_uuid(tiny: Path) -> None:
    for engine in cuda_engine(tiny):
        device = engine.stats()["device"]
        assert device["index"] == torch.cuda.current_device()
        uuid = str(torch.cuda.get_device_properties(device["index"]).uuid)
        assert device["uuid"].removeprefix("GPU-") == uuid.removeprefix("GPU-")
        assert device["memory_total"] > 0

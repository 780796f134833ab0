"""The fused forward (``--attention fast`` with one torch thread): the exact forward's logits
within float32 rounding through the runner's whole sequence (chunked prefills, batched
decodes, a job joining, a token tree), the same greedy tokens, its own pieces, and where it
is left out."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_chunked_prefill import run
from test_lean_forward import llama, through_runner
from tinymodel import greedy_continuations

from flockctl.engine import fused_forward, runner
from flockctl.engine.config import EngineConfig
from flockctl.engine.job import Job, SamplingParams
from flockctl.engine.kv import KVPool, num_layers
from flockctl.engine.loader import load_engine
from flockctl.engine.runner import Feed, Runner


def counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Each fused forward's token rows, as they are called."""
    calls: list[int] = []
    forward = fused_forward._forward

    def count(*args: Any) -> None:
        calls.append(args[0].shape[0])
        forward(*args)

    monkeypatch.setattr(fused_forward, "_forward", count)
    return calls


def assert_within_rounding(fast: list[torch.Tensor], exact: list[torch.Tensor]) -> None:
    assert torch.equal(fast[-1], exact[-1])  # every job's greedy tokens
    assert any(not torch.equal(f, e) for f, e in zip(fast[:-1], exact[:-1], strict=True))
    for f, e in zip(fast[:-1], exact[:-1], strict=True):
        torch.testing.assert_close(f, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_fused_runner_keeps_the_exact_logits_within_rounding(
    monkeypatch: pytest.MonkeyPatch, kv_heads: int
) -> None:
    """Every forward of the sequence runs fused (a prefill chunk beside a whole prompt, a
    prompt's rest beside a decode, padded decodes, a token tree beside a single token)."""
    model = llama(num_key_value_heads=kv_heads)
    calls = counting(monkeypatch)
    with torch.inference_mode():
        exact = through_runner(model, True, torch.float32)
        assert calls == []
        fast = through_runner(model, True, torch.float32, attention="fast", fused=True)
    assert len(calls) == len(fast) - 2  # the tree's forward returns two jobs' logits
    assert calls[0] == 6 + 5 and calls[-1] == 3 + 1 + 1  # a's chunk and b; the tree and b
    assert_within_rounding(fast, exact)


def test_forwards_above_the_row_limit_keep_the_lean_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a limit of two rows, prefills, three-job decodes and the tree take the lean forward
    over dense rows and the two-job decodes run fused, in turns: each reads what the other
    wrote (the dense rows are refilled after a fused step)."""
    model = llama()
    monkeypatch.setattr(runner, "FUSED_MAX_ROWS", 2)
    monkeypatch.setattr(runner, "KERNEL_MIN_BATCH", 3)  # the three-job decodes take the kernel
    calls = counting(monkeypatch)
    with torch.inference_mode():
        exact = through_runner(model, True, torch.float32)
        fast = through_runner(model, True, torch.float32, attention="fast", fused=True)
    assert calls == [2, 2, 2]  # a and b decoding, before c joins
    assert_within_rounding(fast, exact)


def test_a_forward_split_over_two_threads_keeps_every_rows_logits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With two threads the forwards of two or more jobs run as two calls of whole jobs at once
    (a prefill chunk's rows together: they see each other's keys and values), and every forward
    of the sequence keeps its logits within rounding and every greedy token."""
    model = llama()
    calls = counting(monkeypatch)
    with torch.inference_mode():
        one = through_runner(model, True, torch.float32, attention="fast", fused=True)
        forwards = len(calls)
        calls.clear()
        two = through_runner(
            model, True, torch.float32, attention="fast", fused=True, fused_threads=2
        )
    # the first forward: a's 6-row chunk and b's 5-token prompt, split between them
    assert calls[:2] in ([6, 5], [5, 6])
    assert len(calls) > forwards
    assert torch.equal(one[-1], two[-1])
    for a, b in zip(one[:-1], two[:-1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def fused_runner(model: torch.nn.Module, threads: int) -> Runner:
    """A runner of the fused forward on ``threads`` threads, over a pool of 1024 tokens."""
    pool = KVPool(num_layers(model.config), 1024, torch.device("cpu"), torch.float32)
    return Runner(
        model, pool, torch.device("cpu"), attention="fast", fused=True, fused_threads=threads
    )


def test_decode_steps_split_at_four_rows_keep_the_logits_bit_for_bit() -> None:
    """Eight jobs decoding: the split falls after the fourth (the products' blocks of four rows
    fall as in one call), so each job's logits are the same bit for bit, and the second thread
    ran."""
    model = llama()
    out: dict[int, list[torch.Tensor]] = {}
    with torch.inference_mode():
        for threads in (1, 2):
            run = fused_runner(model, threads)
            pool = run.pool
            assert run.fused is not None
            jobs = [Job(list(range(5 + k, 12 + 2 * k)), SamplingParams(max_tokens=8)) for k in
                    range(8)]  # fmt: skip
            out[threads] = []
            for step in range(4):
                for job in jobs:
                    pool.reserve(job.id, job.total_tokens)
                # each prompt alone first (one job: never split), then decode steps of all eight
                if step:
                    logits = run.forward(jobs)
                else:
                    logits = torch.cat([run.forward([job]) for job in jobs])
                out[threads].append(logits)
                for job, row in zip(jobs, logits, strict=True):
                    job.cached_tokens = job.total_tokens
                    job.output_ids.append(int(row.argmax()))
            assert run.fused.split_forwards == (3 if threads == 2 else 0)
            run.close()
    for a, b in zip(out[1], out[2], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_greedy_step_picks_the_argmax_of_the_fused_logits(threads: int) -> None:
    """``Runner.greedy``: the compiled forward's own argmax for eight decoding jobs, step after
    step (split over two threads with two), is the argmax of the logits ``forward`` gives the
    same step; with a job that has more than one token to feed it declines, feeding nothing."""
    model = llama()
    with torch.inference_mode():
        runs = {kind: fused_runner(model, threads) for kind in ("greedy", "logits")}
        prompts = [list(range(5 + k, 12 + 2 * k)) for k in range(8)]
        jobs = {kind: [Job(p, SamplingParams(max_tokens=8)) for p in prompts] for kind in runs}
        for kind, run in runs.items():
            assert run.fused is not None
            stores = run.pool.stacked(run.fused.kv_heads, run.fused.head_dim)
            assert stores is not None
            for job in jobs[kind]:
                run.pool.reserve(job.id, job.total_tokens)
                before = [store.clone() for store in stores]
                assert run.greedy([job]) is None  # its whole prompt to feed
                assert all(torch.equal(a, b) for a, b in zip(before, stores, strict=True))
                row = run.forward([job])[0]
                job.cached_tokens = job.total_tokens
                job.output_ids.append(int(row.argmax()))
        for _ in range(4):
            picks: dict[str, list[int]] = {}
            for kind, run in runs.items():
                for job in jobs[kind]:
                    run.pool.reserve(job.id, job.total_tokens)
                if kind == "greedy":
                    got = run.greedy(jobs[kind])
                    assert got is not None and all(len(one) == 1 for one in got)
                    picks[kind] = [one[0] for one in got]
                else:
                    picks[kind] = run.forward(jobs[kind]).argmax(dim=-1).tolist()
                for job, token in zip(jobs[kind], picks[kind], strict=True):
                    job.cached_tokens = job.total_tokens
                    job.output_ids.append(token)
            assert picks["greedy"] == picks["logits"]
        fused = runs["greedy"].fused
        assert fused is not None and fused.split_forwards == (4 if threads == 2 else 0)
        for run in runs.values():
            run.close()


def _prefilled(run: Runner, prompts: list[list[int]]) -> list[Job]:
    """Jobs of ``prompts``, each one's prompt fed and its first token picked."""
    jobs = [Job(p, SamplingParams(max_tokens=16)) for p in prompts]
    for job in jobs:
        run.pool.reserve(job.id, job.total_tokens)
        row = run.forward([job])[0]
        job.cached_tokens = job.total_tokens
        job.output_ids.append(int(row.argmax()))
    return jobs


@pytest.mark.parametrize("threads", [1, 2])
def test_a_greedy_run_decodes_the_tokens_of_its_steps_one_at_a_time(threads: int) -> None:
    """``Runner.greedy`` with ``steps``: one compiled call decodes several tokens a job, the same
    as that many calls of one step each (split over two threads with two); a job stops at its
    stop token, one with fewer steps sooner, and with ``interrupt`` set every job stops after
    the first forward."""
    model = llama()
    prompts = [list(range(5 + k, 12 + 2 * k)) for k in range(8)]
    with torch.inference_mode():
        # five steps for every job: one call against five
        runs = {kind: fused_runner(model, threads) for kind in ("steps", "run")}
        jobs = {kind: _prefilled(run, prompts) for kind, run in runs.items()}
        for _ in range(5):
            for job in jobs["steps"]:
                runs["steps"].pool.reserve(job.id, job.total_tokens)
            got = runs["steps"].greedy(jobs["steps"])
            assert got is not None
            for job, one in zip(jobs["steps"], got, strict=True):
                job.cached_tokens = job.total_tokens
                job.output_ids += one
        for job in jobs["run"]:
            runs["run"].pool.reserve(job.id, job.total_tokens + 4)
        made = runs["run"].greedy(jobs["run"], [5] * 8)
        assert made is not None
        assert [job.output_ids[1:] for job in jobs["steps"]] == made
        fused = runs["run"].fused
        assert fused is not None and fused.split_forwards == (1 if threads == 2 else 0)
        # job 0 stops at its third token (a stop token), job 1 has two steps, the rest four
        stepped = [job.output_ids[1:] for job in jobs["steps"]]
        run = fused_runner(model, threads)
        again = _prefilled(run, prompts)
        for job in again:
            run.pool.reserve(job.id, job.total_tokens + 3)
        stops = np.full((8, 2), -1, dtype=np.int64)
        stops[0, 1] = stepped[0][2]
        if threads == 1:  # the rows of each step are the one-step calls': the same tokens
            made = run.greedy(again, [4, 2, *[4] * 6], stops)
            assert made is not None
            assert made[0] == stepped[0][: stepped[0].index(stepped[0][2]) + 1]
            assert made[1] == stepped[1][:2]
            assert made[2:] == [tokens[:4] for tokens in stepped[2:]]
        # interrupted: one forward, one token each
        made = run.greedy(again, [4] * 8, None, np.ones(1, dtype=np.int8))
        assert made is not None and [len(tokens) for tokens in made] == [1] * 8
        for r in (*runs.values(), run):
            r.close()


def test_a_split_forward_calls_before_call_on_its_second_thread() -> None:
    """``before_call`` (the model loop's hand-over to the event loop) runs once a compiled
    forward: on the calling thread when the forward is whole, on the second thread just before
    its half when it is split, so that the event loop it wakes does not hold the GIL that thread
    needs to start."""
    model = llama()
    with torch.inference_mode():
        run = fused_runner(model, 2)
        assert run.fused is not None
        called: list[str] = []
        run.fused.before_call = lambda: called.append(threading.current_thread().name)
        jobs = [Job(list(range(5 + k, 9 + k)), SamplingParams(max_tokens=4)) for k in range(4)]
        for job in jobs:
            run.pool.reserve(job.id, job.total_tokens)
            run.forward([job])
            job.cached_tokens = job.total_tokens
            job.output_ids.append(1)
        assert called == [threading.current_thread().name] * 4
        called.clear()
        for job in jobs:
            run.pool.reserve(job.id, job.total_tokens)
        run.forward(jobs)
        assert run.fused.split_forwards == 1
        assert len(called) == 1 and called[0].startswith("flockctl-fused")
        run.close()


def test_prefills_above_the_row_limit_run_fused_where_each_half_fits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Four prompts of 30 tokens (120 rows, above one thread's limit of 64) run fused in two
    halves of 60 on two threads, MKL's forward on one thread; one prompt of 120 tokens, which
    cannot split, keeps MKL's forward. Their first tokens' logits agree within rounding."""
    model = llama()
    calls = counting(monkeypatch)
    got: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        for threads in (1, 2):
            run = fused_runner(model, threads)
            pool = run.pool
            jobs = [Job(list(range(3 + k, 33 + k)), SamplingParams(max_tokens=4)) for k in range(4)]
            alone = Job(list(range(5, 125)), SamplingParams(max_tokens=4))
            for job in [*jobs, alone]:
                pool.reserve(job.id, job.total_tokens)
            calls.clear()
            got[threads] = run.forward(jobs)
            assert calls == ([60, 60] if threads == 2 else [])
            run.forward([alone])
            assert calls == ([60, 60] if threads == 2 else [])
            run.close()
    assert torch.equal(got[1].argmax(dim=-1), got[2].argmax(dim=-1))
    torch.testing.assert_close(got[1], got[2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("jobs", "cut"),
    [
        ([0, 0, 0], 0),  # too few rows
        ([0] * 9, 0),  # one job: its rows see each other
        ([0, 1, 2, 3, 4, 5, 6, 7], 4),
        ([0, 0, 0, 0, 0, 1, 2, 3, 4], 5),  # no boundary a multiple of four in the middle half
        ([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2], 8),  # 8 (aligned) over 5 (nearer the middle)
        ([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], 10),  # the only boundary
    ],
)
def test_the_split_falls_between_jobs_near_the_middle(jobs: list[int], cut: int) -> None:
    assert fused_forward.split_point(np.array(jobs, dtype=np.int64)) == cut


def test_a_decode_steps_split_takes_the_general_rule_without_numpy() -> None:
    """A row a job (job indices 0 .. n-1) takes a shortcut; numbered from 1 the same rows take
    the general rule: both cut in the same place at every size."""
    for n in range(4, 130):
        rows = np.arange(n, dtype=np.int64)
        assert fused_forward.split_point(rows) == fused_forward.split_point(rows + 1), n


def test_stacking_keeps_transformers_forward_bit_for_bit() -> None:
    """The layer weights move into stacked tensors and the parameters become their slices: the
    model's own forward gives the same logits, and no second copy is kept."""
    model = llama()
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.inference_mode():
        before = model(ids).logits
    fused = fused_forward.FusedLlama(model)
    with torch.inference_mode():
        after = model(ids).logits
    assert torch.equal(before, after)
    stacked_qkv = fused.weights[2]
    for i, layer in enumerate(model.model.layers):
        q = layer.self_attn.q_proj.weight
        assert q.data_ptr() == stacked_qkv[i].ctypes.data
        assert layer.mlp.down_proj.weight.data_ptr() == fused.weights[6][i].ctypes.data


def test_a_compiled_draft_chain_picks_and_caches_what_forward_by_forward_drafting_does() -> None:
    """Two jobs drafting chains of 4 and 2 tokens in one compiled call: the same picks (argmax
    over the first ``vocab`` logits) and the same keys in their blocks, bit for bit, as one
    fused forward a depth (both jobs in a forward while both draft, then one)."""
    model = llama()
    cpu = torch.device("cpu")
    prompts = [list(range(3, 16)), list(range(40, 47))]
    vocab = 250  # as if the served model's vocabulary were smaller than the draft's
    runners = []
    for _ in range(2):
        pool = KVPool(num_layers(model.config), 256, cpu, torch.float32, block_size=4)
        runners.append(Runner(model, pool, cpu, attention="fast", fused=True))
    ids = ["a", "b"]
    roots = [len(p) - 1 for p in prompts]
    steps = [4, 2]
    with torch.inference_mode():
        firsts = []
        for r in runners:
            for job_id, prompt, n in zip(ids, prompts, steps, strict=True):
                r.pool.reserve(job_id, len(prompt) + 1 + n)
            rows = r.run(ids, [Feed.linear(p, 0) for p in prompts])
            firsts.append([int(row[-1, :vocab].argmax()) for row in rows])
        assert firsts[0] == firsts[1]
        chained, stepped = runners
        assert chained.chainable()
        got = chained.draft_chain(ids, roots, firsts[0], steps, vocab)
        want: list[list[int]] = [[], []]
        last = list(firsts[1])
        for depth in range(max(steps)):
            going = [j for j in range(2) if steps[j] > depth]
            feeds = [Feed.linear([last[j]], roots[j] + 1 + depth) for j in going]
            rows = stepped.run([ids[j] for j in going], feeds)
            for j, row in zip(going, rows, strict=True):
                last[j] = int(row[-1, :vocab].argmax())
                want[j].append(last[j])
    assert got == want
    assert chained.fused_forwards == stepped.fused_forwards == 1 + max(steps)
    for job_id, root, n in zip(ids, roots, steps, strict=True):
        mine, theirs = (
            [r.pool.tables[job_id][t // 4] * 4 + t % 4 for t in range(root + 1 + n)]
            for r in runners
        )
        for store in ("keys", "values"):
            for layer in range(num_layers(model.config)):
                a, b = (getattr(r.pool, store)[layer] for r in runners)
                assert torch.equal(a[mine], b[theirs])


def test_the_pool_stacks_its_layers_when_they_share_a_shape() -> None:
    pool = KVPool(3, 64, torch.device("cpu"), torch.float32, block_size=4)
    stores = pool.stacked(2, 8)
    assert stores is not None
    keys, values = stores
    assert keys.shape == values.shape == (3, pool.num_blocks * 4, 2, 8)
    for layer in range(3):
        assert pool.keys[layer] is not None and pool.values[layer] is not None
        assert pool.keys[layer].data_ptr() == keys[layer].data_ptr()
        assert pool.values[layer].data_ptr() == values[layer].data_ptr()
    uneven = KVPool(2, 64, torch.device("cpu"), torch.float32, block_size=4)
    uneven._ensure_layer(0, 2, 8)
    uneven._ensure_layer(1, 4, 8)  # another layer's heads: each layer its own store
    assert uneven.stacked(2, 8) is None


def _resident_bytes(tensor: torch.Tensor) -> int:
    """The resident bytes of the mapping that holds ``tensor`` (Linux's /proc/self/smaps): a
    store this large is a mapping of its own, so no other allocation of the process counts."""
    address = tensor.data_ptr()
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):  # a mapping's first line: start-end ...
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "Rss:":
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads the resident set (Linux)")
def test_a_cpu_pool_is_resident_once_its_stores_exist() -> None:
    """Every page of a CPU pool is written when its stores are made: a block's first use under
    load does not fault its pages in, and a machine without the memory fails at start."""
    pool = KVPool(8, 80 * 1024, torch.device("cpu"), torch.float32, block_size=16)
    stores = pool.stacked(2, 8)
    assert stores is not None
    for store in stores:  # 42 MB each: above any size the allocator serves from its heap
        assert _resident_bytes(store) >= 0.9 * store.numel() * store.element_size()


def test_blocks_handed_out_after_the_stacked_layers_exist_are_zeroed_in_every_layer() -> None:
    """A new block may hold anything (blocks are reused); the next forward's stores come back
    with it zeroed in every layer, the rest untouched."""
    pool = KVPool(3, 64, torch.device("cpu"), torch.float32, block_size=4)
    stores = pool.stacked(2, 8)
    assert stores is not None
    for store in stores:
        store.fill_(float("nan"))
    pool.reserve("a", 6)  # two blocks
    stores = pool.stacked(2, 8)
    assert stores is not None
    mine = [b * 4 + i for b in pool.tables["a"] for i in range(4)]
    others = [s for s in range(pool.num_blocks * 4) if s not in mine]
    for store in stores:
        assert torch.equal(store[:, mine], torch.zeros_like(store[:, mine]))
        assert store[:, others].isnan().all()


def test_the_fused_forward_is_left_out_where_it_does_not_apply() -> None:
    cpu = torch.device("cpu")
    model = llama()
    pool = KVPool(num_layers(model.config), 64, cpu, torch.float32, block_size=4)
    assert Runner(model, pool, cpu, attention="fast", fused=True).fused is not None
    assert Runner(model, pool, cpu, attention="fast").fused is None  # asked for only
    assert Runner(model, pool, cpu, attention="exact", fused=True).fused is None
    bf16 = llama(dtype=torch.bfloat16)
    bf16_pool = KVPool(num_layers(bf16.config), 64, cpu, torch.bfloat16, block_size=4)
    assert Runner(bf16, bf16_pool, cpu, attention="fast", fused=True).fused is None
    assert not fused_forward.usable(llama(mlp_bias=True), torch.float32, cpu)
    assert not fused_forward.usable(model, torch.float32, torch.device("meta"))


def test_the_vector_exp_is_within_three_ulp() -> None:
    x = np.concatenate(
        [np.linspace(-87.0, 88.0, 20001, dtype=np.float32), np.float32([0.0, -1e-8, 1e-8])]
    )
    buf = x.copy()
    fused_forward._exp(buf, len(buf), np.empty(len(buf), dtype=np.int32))
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(buf - want) / want) < 3 * 2.0**-23
    clamped = np.float32([-1000.0, -np.inf, 1000.0])
    fused_forward._exp(clamped, 3, np.empty(3, dtype=np.int32))
    assert np.all(np.isfinite(clamped)) and clamped[0] == clamped[1] < 1e-37
    assert clamped[2] > 1e38


@pytest.mark.parametrize("split", [1, 2])
async def test_an_engine_on_one_thread_serves_fused_with_transformers_greedy_output(
    tiny: Path, split: int
) -> None:
    """One torch thread: the engine runs the fused forward (the startup compiled it), eight
    greedy jobs at once and one alone get transformers' one-prompt-at-a-time tokens; with
    ``fused_threads=2`` the steps of several jobs ran split, and closing stops the thread."""
    prompts = [[5 + i, 40 + 3 * i, 7, 90 + i, *range(11, 11 + 2 * i)] for i in range(9)]
    want = greedy_continuations(tiny, prompts, 12)
    threads = torch.get_num_threads()
    config = EngineConfig(
        model=str(tiny), device="cpu", max_batch_size=8, threads=1, fused_threads=split
    )
    engine = load_engine(config, progress=False)
    try:
        fused = engine.runner.fused
        assert fused is not None
        assert engine.stats()["fused_threads"] == split
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        got = await asyncio.gather(*(run(engine, p, params) for p in prompts[:8]))
        got.append(await run(engine, prompts[8], params))
        assert engine.runner.fused_forwards > 0
        assert (fused.split_forwards > 0) == (split == 2)
    finally:
        engine.close()
        torch.set_num_threads(threads)
    assert got == want
    assert not any(t.name.startswith("flockctl-fused") for t in threading.enumerate())

"""The runner's dense rows (the running batch's keys and values kept across forwards on CPU)
against gathering every job's blocks each forward, on a tiny real model: the same logits whatever
joins, leaves, swaps out and back, or has its cache moved between forwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from flockctl.engine.job import Job, SamplingParams
from flockctl.engine.kv import KVPool, num_layers
from flockctl.engine.runner import Runner

BLOCK = 4


class Side:
    """One runner with its pool and its own copies of the jobs."""

    def __init__(self, model: torch.nn.Module, dense: bool, prompts: list[list[int]]):
        self.pool = KVPool(
            num_layers(model.config), 512, torch.device("cpu"), torch.float32, BLOCK, 512
        )
        self.runner = Runner(model, self.pool, torch.device("cpu"), dense=dense)
        self.jobs = [Job(list(p), SamplingParams(max_tokens=64)) for p in prompts]

    def step(self, which: list[int]) -> torch.Tensor:
        jobs = [self.jobs[i] for i in which]
        for job in jobs:
            if job.id in self.pool.host:
                job.cached_tokens = self.pool.swap_in(job.id)
            self.pool.reserve(job.id, job.total_tokens)
        logits = self.runner.forward(jobs)
        for job, row in zip(jobs, logits, strict=True):
            job.cached_tokens = job.total_tokens
            job.output_ids.append(int(row.argmax()))
        return logits


@pytest.fixture(scope="module")
def model(tiny: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()


@torch.inference_mode()  # as on the model loop's thread
def test_dense_rows_give_the_logits_a_gather_gives(model: torch.nn.Module) -> None:
    prompts = [[5 + i + 7 * k for k in range(3 + 4 * i)] for i in range(5)]
    dense, gathered = Side(model, True, prompts), Side(model, False, prompts)
    assert dense.runner.dense is not None and gathered.runner.dense is None
    batches = [
        [0, 1, 2],  # prefills
        [0, 1, 2],  # decodes in place
        [0, 1, 2],
        [2, 0],  # one leaves: the others keep their rows
        [3, 2, 0, 4],  # two join (a prefill beside decodes)
        [4, 3, 2, 0],
        [1, 4],  # the one that left comes back, gathered into a row again
        [1, 4],
        "swap 4",  # out and back between two forwards that keep the rows
        [1, 4],
        [3, 4],
        [3, 4],
        "move 3",
        [3, 4],
        [0, 1, 2, 3, 4],
        [0, 1, 2, 3, 4],
    ]
    for batch in batches:
        if isinstance(batch, str):
            what, index = batch.split()
            for side in (dense, gathered):
                job = side.jobs[int(index)]
                if what == "swap":
                    side.pool.swap_out(job.id, job.cached_tokens)
                else:  # what a speculative step does with an accepted path: rewrite the tail
                    last = job.cached_tokens - 1
                    side.pool.move(job.id, [(last - 1, last)])
            continue
        a, b = dense.step(batch), gathered.step(batch)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert a.argmax(-1).tolist() == b.argmax(-1).tolist()
    # the dense side really kept rows: the last forward found every job in place
    assert dense.runner.dense is not None
    assert sorted(dense.runner.dense.jobs) == sorted(j.id for j in dense.jobs)


@torch.inference_mode()
def test_a_batch_too_wide_for_the_rows_gathers(model: torch.nn.Module) -> None:
    side = Side(model, True, [[3, 4, 5], [6, 7]])
    assert side.runner.dense is not None
    side.runner.dense.max_slots = 2  # nothing fits: every forward gathers
    side.step([0, 1])
    side.step([0, 1])
    assert side.runner.dense.jobs == []


@torch.inference_mode()
def test_a_job_alone_reads_the_pool_and_its_row_is_refilled_after(
    model: torch.nn.Module,
) -> None:
    """A job decoding alone with consecutive blocks reads its history as a slice of the pool and
    writes no row; when others join, its row is filled from the pool again, not reused stale."""
    prompts = [[9], [5, 6, 7, 8, 9, 10]]  # job 0 stays in its first block throughout
    dense, gathered = Side(model, True, prompts), Side(model, False, prompts)
    rows = dense.runner.dense
    assert rows is not None
    for batch, alone in (([0], True), ([0, 1], False), ([0], True), ([0, 1], False)):
        a, b = dense.step(batch), gathered.step(batch)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert a.argmax(-1).tolist() == b.argmax(-1).tolist()
        assert (rows.jobs == []) is alone  # alone: no rows written; together: rows kept
    assert len(dense.pool.tables[dense.jobs[0].id]) == 1


@torch.inference_mode()
def test_a_prefill_beside_a_decoding_batch_leaves_its_rows_alone(
    model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs none of which has a row (new prompts, prefilled in their own forward beside a
    decoding batch) read the pool; the decoding jobs keep their rows, not copied in again."""
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14], [15, 16, 17, 18], [19]]
    dense, gathered = Side(model, True, prompts), Side(model, False, prompts)
    rows = dense.runner.dense
    assert rows is not None
    filled: list[int] = []  # rows copied in from the pool, per forward that placed the batch
    place = rows.place

    def counting(job_ids: list[str], kv_len: int) -> tuple[list[str], list[int]] | None:
        placed = place(job_ids, kv_len)
        filled.append(len(placed[1]) if placed is not None else -1)
        return placed

    monkeypatch.setattr(rows, "place", counting)
    for batch in ([0, 1], [0, 1], [2, 3], [0, 1], [4], [0, 1], [0, 1, 2, 3, 4]):
        a, b = dense.step(batch), gathered.step(batch)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert a.argmax(-1).tolist() == b.argmax(-1).tolist()
        holders = batch if len(batch) == 5 else [0, 1]  # new jobs get rows only with 0 and 1
        assert sorted(rows.jobs) == sorted(dense.jobs[i].id for i in holders)
    # placed: the first batch (2 fills), its decodes (none: the prefills of 2, 3 and of 4 did
    # not take their rows), then everyone (2, 3 and 4 copied in)
    assert filled == [2, 0, 0, 0, 3]


@torch.inference_mode()
def test_rows_of_finished_jobs_do_not_keep_the_next_batch_off_them(
    model: torch.nn.Module,
) -> None:
    """Once the jobs in the rows have left the pool (finished, as the engine's calibration
    batch does at startup), the next batch decodes from the rows, not from a gather each step
    beside rows nobody holds."""
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18]]
    dense, gathered = Side(model, True, prompts), Side(model, False, prompts)
    rows = dense.runner.dense
    assert rows is not None
    for side in (dense, gathered):
        side.step([0, 1])
        side.step([0, 1])
    assert sorted(rows.jobs) == sorted(j.id for j in dense.jobs[:2])
    for side in (dense, gathered):
        for job in side.jobs[:2]:
            side.pool.release(job.id)
    for batch in ([2], [3], [2, 3], [2, 3]):  # prefills alone, then decodes together
        a, b = dense.step(batch), gathered.step(batch)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert a.argmax(-1).tolist() == b.argmax(-1).tolist()
    assert sorted(rows.jobs) == sorted(j.id for j in dense.jobs[2:])

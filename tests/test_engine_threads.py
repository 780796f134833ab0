"""How many CPU threads torch gets in an engine started without ``--threads``: every core the
process may run on but one, which the serving side keeps; an explicit ``OMP_NUM_THREADS`` wins.
And how many the fused forward splits a step's jobs over."""

from __future__ import annotations

import os

import pytest

from flockctl.cores import default_threads
from flockctl.engine.config import EngineConfig
from flockctl.engine.engine import fused_threads


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (4, 3), (16, 15)])
def test_the_serving_side_keeps_a_core(
    monkeypatch: pytest.MonkeyPatch, cores: int, threads: int
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cores)), raising=False)
    assert default_threads() == threads


def test_omp_num_threads_is_the_users_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    assert default_threads() is None


@pytest.mark.parametrize(
    ("cores", "omp", "config", "threads"),
    [
        (2, None, {}, 2),  # alone on two cores: the serving side's core computes too
        (1, None, {}, 1),
        (2, "1", {}, 1),  # the user chose torch's threads
        (2, None, {"threads": 1}, 1),  # so did flockctl up, for engines sharing the cores
        (1, None, {"fused_threads": 2}, 2),  # asked for
        (2, None, {"fused_threads": 1}, 1),
    ],
)
def test_the_fused_forward_splits_over_two_threads_only_where_the_cores_are_its_own(
    monkeypatch: pytest.MonkeyPatch, cores: int, omp: str | None, config: dict, threads: int
) -> None:
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cores)), raising=False)
    assert fused_threads(EngineConfig(model="m", **config)) == threads


def test_fused_threads_is_one_or_two() -> None:
    with pytest.raises(ValueError, match="fused_threads must be 1 or 2"):
        EngineConfig(model="m", fused_threads=3)

"""``bench/decode_step.py`` in this process on the tests' tiny model: the engine's compiled
decode loop over a pool of its layout, one JSON object on stdout."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
from conftest import load_bench

pytest.importorskip("numba")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("decode_step")


def report_of(bench: ModuleType, capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert bench.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_every_batch_and_history_is_timed_split_as_the_engine_splits_it(
    bench: ModuleType, tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoConfig

    argv = [
        "--model", str(tiny), "--jobs", "4,1,2", "--history", "40,9", "--steps", "3",
        "--rounds", "2", "--threads", "2", "--memory-mb", "1,2",
    ]  # fmt: skip
    report = report_of(bench, capsys, argv)
    config = AutoConfig.from_pretrained(tiny)
    head_dim = config.hidden_size // config.num_attention_heads
    model = report["model"]
    assert model["layers"] == config.num_hidden_layers and model["head_dim"] == head_dim
    assert model["kv_bytes_per_token"] == (
        config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 4
    )
    assert report["settings"]["jobs"] == [1, 2, 4] and report["settings"]["history"] == [9, 40]

    rows = {(row["history"], row["jobs"]): row for row in report["steps"]}
    assert set(rows) == {(h, j) for h in (9, 40) for j in (1, 2, 4)}
    for (history, jobs), row in rows.items():
        # under four rows the engine does not split a step; four jobs go two a side
        assert row["threads"] == (2 if jobs == 4 else 1)
        assert len(row["rounds_ms_per_step"]) == 2
        assert row["ms_per_step"] > 0
        assert row["tokens_per_s"] == pytest.approx(jobs * 1000 / row["ms_per_step"], rel=1e-3)
        # each job's history, and the positions the run adds (3 steps: on average 2 more)
        kv = jobs * (history + 2) * model["kv_bytes_per_token"]
        assert row["kv_bytes_per_step"] == kv
        assert row["bytes_per_step"] == kv + model["weight_bytes"]
    for history in (9, 40):
        assert rows[(history, 1)]["vs_one_job"] == 1.0
        one = rows[(history, 1)]["rounds_ms_per_step"]
        two = rows[(history, 2)]["rounds_ms_per_step"]
        # the median of the rounds' own ratios, not a ratio of medians
        paired = sorted(2 * a / b for a, b in zip(one, two, strict=True))
        assert rows[(history, 2)]["vs_one_job"] == pytest.approx(sum(paired) / 2, abs=1e-3)

    memory = report["memory"]
    assert set(memory["one_thread_gb_per_s"]) == {"1", "2"}
    assert all(rate > 0 for rate in memory["one_thread_gb_per_s"].values())
    assert set(memory["two_threads_gb_per_s"]) == {"2"}


def test_one_thread_never_splits_and_no_memory_sizes_skip_the_read_rate(
    bench: ModuleType, tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--model", str(tiny), "--jobs", "4", "--history", "5", "--steps", "2", "--rounds", "1",
        "--threads", "1", "--memory-mb", "", "--blocks", "contiguous",
    ]  # fmt: skip
    report = report_of(bench, capsys, argv)
    (row,) = report["steps"]
    assert row["threads"] == 1
    assert "vs_one_job" not in row  # no batch of one job at that history to compare with
    assert report["memory"] == {"one_thread_gb_per_s": {}}
    assert report["settings"]["blocks"] == "contiguous"


def test_block_tables_alternate_between_jobs_or_follow_each_other(bench: ModuleType) -> None:
    assert bench.block_tables(3, 2, 1, "interleaved") == [[1, 4], [2, 5], [3, 6]]
    assert bench.block_tables(3, 2, 1, "contiguous") == [[1, 2], [3, 4], [5, 6]]


@pytest.mark.parametrize(
    "flags",
    [["--jobs", "0"], ["--history", "a,b"], ["--memory-mb", "1,x"], ["--steps", "0"]],
)
def test_bad_flags_exit_2_naming_the_flag(
    bench: ModuleType, flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        bench.parse_args(flags)
    assert exited.value.code == 2
    assert flags[0] in capsys.readouterr().err


def test_a_model_the_compiled_forward_cannot_serve_exits_1(
    bench: ModuleType, tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tinymodel import build_tiny_bert

    bert = build_tiny_bert(tiny, tmp_path / "bert")
    with pytest.raises(SystemExit) as exited:
        bench.main(["--model", str(bert), "--quick"])
    assert exited.value.code == 1
    assert "cannot serve" in capsys.readouterr().err


def test_a_directory_without_a_model_exits_1_saying_so(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        bench.main(["--model", str(tmp_path / "nothing-here"), "--quick"])
    assert exited.value.code == 1
    assert "cannot load" in capsys.readouterr().err

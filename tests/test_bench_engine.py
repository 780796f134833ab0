"""``bench/engine.py --quick`` end to end on the tests' tiny model: real engine processes on
127.0.0.1, transformers in the script's own process, one JSON object on stdout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BENCH_DIR, load_bench

BENCH = BENCH_DIR / "engine.py"


@pytest.mark.e2e
def test_quick_run_reports_every_table_and_identical_greedy_output(
    tiny: Path, tmp_path: Path
) -> None:
    from tinymodel import build_near_model

    near = build_near_model(tiny, tmp_path / "near")
    argv = [
        sys.executable, str(BENCH), "--quick",
        "--model", str(tiny), "--draft-model", str(near),
        "--device", "cpu", "--threads", "1", "--prefix-caching", "both", "--out-of-step",
        "--weak-noise", "0.5", "--workdir", str(tmp_path / "work"),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    # held to its targets: batch 1 and the weaker draft (the given pair is not the demo's, and
    # --quick runs concurrency 4, which has none)
    assert set(report["targets"]) >= {"batch1_vs_transformers", "weak_pair_auto_vs_plain", "met"}

    assert (report["device"], report["dtype"]) == ("cpu", "float32")
    assert report["settings"]["out_of_step"] is True  # clients led with shorter requests
    assert report["models"]["target"]["parameters"] > 0
    assert report["models"]["weak_draft"]["weight_bytes"] == (
        4 * report["models"]["weak_draft"]["parameters"]
    )
    batch1 = report["batch1"]
    assert batch1["transformers_tokens_per_s"] > 0 and batch1["engine_tokens_per_s"] > 0
    assert set(report["concurrency"]) == {"engine", "engine_prefix_caching"}
    for rows in report["concurrency"].values():
        assert set(rows) == {"1", "4"}
        assert rows["4"]["requests"] == 8 and rows["4"]["vs_c1"] > 0
        assert len(rows["4"]["rounds_tokens_per_s"]) == 1  # --quick: one round
        assert rows["4"]["latency_p99_ms"] >= rows["4"]["latency_p50_ms"]
    assert set(report["speculation"]) == {"given_pair", "weak_pair"}
    assert report["settings"]["rounds"] == 1  # --quick
    for pair in report["speculation"].values():
        # each pair's ratios are against a plain engine measured beside it, round by round
        assert pair["plain_tokens_per_s"] > 0 and pair["rounds"] == 1
        for mode in ("on", "auto"):
            assert len(pair[mode]["rounds_vs_plain"]) == 1
            assert pair[mode]["vs_plain"] == pytest.approx(
                pair[mode]["tokens_per_s"] / pair["plain_tokens_per_s"], rel=1e-2
            )
        assert pair["on"]["steps"] > 0  # --spec on drafted
        assert 0 <= pair["on"]["acceptance_rate"] <= 1
        assert pair["auto"]["policy"]["mode"] == "auto"
    # the weaker draft is the given one with noise: it cannot be accepted more often, nor agree
    # with the target's greedy tokens as often
    weak, given = report["speculation"]["weak_pair"], report["speculation"]["given_pair"]
    assert weak["on"]["acceptance_rate"] <= given["on"]["acceptance_rate"]
    assert 0 <= weak["greedy_agreement"] < given["greedy_agreement"] <= 1

    equality = report["equality"]
    assert equality["exact_expected"] is True
    assert equality["all_identical"] is True, equality["comparisons"]
    # c=1 and c=4 per table; per pair the plain engine and the two speculative ones
    assert len(equality["comparisons"]) == 2 * 2 + 2 * 3
    assert "bandwidth" not in report  # a GPU's figure only
    assert "greedy output identical everywhere: True" in done.stderr


def _row(tokens_per_s: float, ttft_ms: float, vs_c1: float | None = None) -> dict[str, float]:
    row = {"tokens_per_s": tokens_per_s, "ttft_mean_ms": ttft_ms}
    if vs_c1 is not None:
        row["vs_c1"] = vs_c1
    return row


def test_targets_hold_each_ratio_to_its_minimum() -> None:
    bench = load_bench("engine")
    report = {
        "batch1": {"engine_vs_transformers": 1.2},
        "concurrency": {
            "engine": {"1": _row(200, 9), "8": _row(900, 40, 4.5), "32": _row(1500, 120, 7.5)},
            "vllm": {"1": _row(250, 10), "8": _row(1000, 20), "32": _row(1200, 150)},
        },
        "speculation": {
            "demo_pair": {"auto": {"vs_plain": 2.1}},
            "weak_pair": {"auto": {"vs_plain": 1.1}},
        },
        "equality": {"all_identical": True},
    }
    got = bench.targets(report)
    assert got["batch1_vs_transformers"] == {"value": 1.2, "min": 1.0, "pass": True}
    assert got["c8_vs_c1"]["pass"] and not got["c32_vs_c1"]["pass"]
    assert got["demo_pair_auto_vs_plain"]["pass"] and not got["weak_pair_auto_vs_plain"]["pass"]
    assert got["c8_tokens_vs_vllm"]["value"] == 0.9 and got["c32_tokens_vs_vllm"]["value"] == 1.25
    assert got["c8_ttft_vllm_over_engine"]["value"] == 0.5  # vLLM's first token came sooner
    assert got["c32_ttft_vllm_over_engine"]["pass"]
    assert "c1_tokens_vs_vllm" not in got  # batch 1 is held to transformers, not to vLLM
    assert got["missed"] == [
        "c32_vs_c1", "c8_tokens_vs_vllm", "c8_ttft_vllm_over_engine", "weak_pair_auto_vs_plain"
    ]  # fmt: skip
    assert got["met"] is False
    report["equality"]["all_identical"] = False
    report["speculation"] = {}
    report["concurrency"] = {"engine": {"1": _row(200, 9), "8": _row(900, 40, 4.5)}}
    got = bench.targets(report)
    assert got["missed"] == [] and got["met"] is False  # every ratio passed, the text did not


def test_each_level_reports_its_median_round_and_the_median_of_paired_ratios() -> None:
    bench = load_bench("engine")

    def run(level: int, tokens_per_s: float, ttft: float) -> object:
        # one request a round's second, so tokens/s is the figure given
        return bench.Run(level, int(tokens_per_s), 1.0, [ttft], [2 * ttft], ["x"])

    # the host slows down by half from the second round on: the rounds' own ratios stay 3x
    ones = [run(1, 1000, 0.01), run(1, 500, 0.02), run(1, 500, 0.02)]
    eights = [run(8, 3000, 0.03), run(8, 1500, 0.06), run(8, 1600, 0.05)]
    row = bench.median_round(eights, ones)
    assert row["tokens_per_s"] == 1600 and row["ttft_mean_ms"] == 50.0  # the median round's
    assert row["rounds_tokens_per_s"] == [3000, 1500, 1600]
    assert row["vs_c1"] == 3.0  # the median of 3.0, 3.0 and 3.2, not 1600 / 500
    one = bench.median_round(ones, ones)
    assert one["tokens_per_s"] == 500 and "vs_c1" not in one
    assert bench.median_round(eights[:2], ones[:2])["tokens_per_s"] == 1500  # the lower middle


def test_targets_with_prefix_caching_alone_use_its_table() -> None:
    """``--prefix-caching on`` runs only the caching engine's table: the targets (and vLLM's
    comparison) use it, and with both tables the one without caching."""
    bench = load_bench("engine")
    cached = {"1": _row(200, 9), "8": _row(1000, 10, 5.0)}
    report = {
        "batch1": {"engine_vs_transformers": 1.2},
        "concurrency": {"engine_prefix_caching": cached, "vllm": {"8": _row(800, 20)}},
        "speculation": {},
        "equality": {"all_identical": True},
    }
    got = bench.targets(report)
    assert got["c8_vs_c1"]["value"] == 5.0
    assert got["c8_tokens_vs_vllm"]["value"] == 1.25
    report["concurrency"]["engine"] = {"1": _row(200, 9), "8": _row(400, 40, 2.0)}
    assert bench.targets(report)["c8_tokens_vs_vllm"]["value"] == 0.5


def test_the_weaker_draft_is_built_to_the_agreement_asked_for(tiny: Path, tmp_path: Path) -> None:
    """The weaker draft's noise is found for the greedy agreement asked for (the draft here is
    the model itself, so no noise agrees always): the draft on disk is the one whose agreement
    came nearest, and more noise agrees less."""
    import torch
    from tinymodel import greedy_continuations
    from transformers import AutoTokenizer

    bench = load_bench("engine")
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    prompts = [tokenizer.encode(p) for p in ("Hello there", "def main(", "The quick brown")]
    ids = greedy_continuations(tiny, prompts, 24)

    def agree(path: Path) -> float:
        return float(bench.greedy_agreement(path, prompts, ids, "cpu", torch.float32))

    assert agree(tiny) == 1.0
    weak = tmp_path / "weak"
    noise = bench.weak_draft_for(tiny, weak, 0.6, prompts, ids, "cpu", torch.float32)
    assert 0 < noise < 1
    got = agree(weak)
    assert abs(got - 0.6) <= 0.15, got
    assert agree(bench.build_weak_draft(tiny, tmp_path / "more", min(1.0, 2 * noise))) < got

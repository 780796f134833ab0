"""``bench/engine.py --quick`` end to end on the tests' tiny model: real engine processes on
127.0.0.1, transformers in the script's own process, one JSON object on stdout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "engine.py"


@pytest.mark.e2e
def test_quick_run_reports_every_table_and_identical_greedy_output(
    tiny: Path, tmp_path: Path
) -> None:
    from tinymodel import build_near_model

    near = build_near_model(tiny, tmp_path / "near")
    argv = [
        sys.executable, str(BENCH), "--quick",
        "--model", str(tiny), "--draft-model", str(near),
        "--device", "cpu", "--threads", "1", "--prefix-caching", "both",
        "--workdir", str(tmp_path / "work"),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)

    assert (report["device"], report["dtype"]) == ("cpu", "float32")
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
        assert rows["4"]["latency_p99_ms"] >= rows["4"]["latency_p50_ms"]
    assert set(report["speculation"]) == {"given_pair", "weak_pair"}
    for pair in report["speculation"].values():
        assert pair["on"]["steps"] > 0  # --spec on drafted
        assert 0 <= pair["on"]["acceptance_rate"] <= 1
        assert pair["auto"]["policy"]["mode"] == "auto"
    # the weaker draft is the given one with noise: it cannot be accepted more often
    assert (
        report["speculation"]["weak_pair"]["on"]["acceptance_rate"]
        <= report["speculation"]["given_pair"]["on"]["acceptance_rate"]
    )

    equality = report["equality"]
    assert equality["exact_expected"] is True
    assert equality["all_identical"] is True, equality["comparisons"]
    assert len(equality["comparisons"]) == 2 * 2 + 4  # c=1 and c=4 per table; 4 spec runs
    assert "bandwidth" not in report  # a GPU's figure only
    assert "greedy output identical everywhere: True" in done.stderr

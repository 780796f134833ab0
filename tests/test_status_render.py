"""`flockctl status` as a person or a script reads it: whole lines when piped, a terminal's width
otherwise (COLUMNS, --wide), and each autoscaler figure said once.

The CLI runs in-process on a snapshot shaped as ``GET /-/status`` serves it; a real daemon's
status table is checked end to end in test_cli.py.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import pytest
from typer.testing import CliRunner

from flockctl.cli import app
from flockctl.client import AdminClient
from flockctl.render import status_console, status_view

NOW = 1_700_000_000.0
URL = "http://ip-10-0-12-34.eu-west-1.compute.internal:46769"
REASON = (
    "process exited with code 1: Traceback (most recent call last): ... OSError: could not load"
    " the model weights from /models/qwen2.5-7b-instruct/model-00003-of-00004.safetensors"
    " (no space left on device)"
)
QLRM_REASON = "qlrm 0.10 < autoscale_down 4 but at min_workers: holding 2"


def snapshot(autoscaler: dict[str, Any] | None = None) -> dict[str, Any]:
    worker = {
        "provisioner": "local",
        "in_flight": 0,
        "served": 1,
        "failures": 0,
        "latency_p50_ms": 3.3,
        "created_at": NOW - 41,
        "reason": None,
    }
    return {
        "schema": 1,
        "generated_at": NOW,
        "deployment": {
            "name": "default",
            "endpoint": "http://127.0.0.1:3000",
            "provisioner": "local",
            "policy": "least-connection",
            "started_at": NOW - 41,
        },
        "autoscaler": {
            # what every autoscaler section holds, whatever the test's policy
            "qlrm_history": [],
            "launch_blocked": None,
            "consecutive_start_failures": 0,
            **(
                autoscaler
                or {
                    "policy": "qlrm",
                    "target": 2,
                    "min_workers": 2,
                    "max_workers": 2,
                    "qlrm": 0.1,
                    "qps": None,
                    "last_decision": {"at": NOW - 1, "target": 2, "reason": QLRM_REASON},
                }
            ),
        },
        "requests": {"total": 1, "in_flight": 0, "queued": 0, "failed": 0, "retried": 0, "rate": 0},
        "workers": [
            {**worker, "id": "w1", "state": "READY", "pid": 4104, "url": URL},
            {**worker, "id": "w2", "state": "FAILED", "pid": 4106, "url": URL, "reason": REASON},
        ],
    }


class FakeClient:
    """The admin client of a daemon that serves ``snap`` as its status."""

    def __init__(self, snap: dict[str, Any]) -> None:
        self.snap = snap

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return self.snap


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch):
    """Make ``flockctl status`` read the given snapshot; no COLUMNS unless a test sets it."""
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setenv("NO_COLOR", "1")

    def use(snap: dict[str, Any]) -> None:
        monkeypatch.setattr(
            AdminClient, "for_name", classmethod(lambda cls, *a, **k: FakeClient(snap))
        )

    use(snapshot())
    return use


def status(*args: str) -> str:
    result = CliRunner().invoke(app, ["status", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def row(out: str, worker_id: str) -> str:
    (line,) = [line for line in out.splitlines() if line.startswith(f"{worker_id} ")]
    return line


def test_piped_status_keeps_urls_reasons_and_rows_whole(serve) -> None:
    out = status()
    assert len(out.splitlines()) == 6  # three header lines, the column names, two workers
    assert URL in row(out, "w1")
    failed = row(out, "w2")
    assert URL in failed and failed.rstrip().endswith(REASON)
    assert "…" not in out


def test_columns_sets_the_width_when_given(serve, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "70")
    out = status()
    assert max(len(line) for line in out.splitlines()) <= 70
    assert REASON not in out


def test_wide_never_cuts_a_line(serve, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "70")
    out = status("--wide")
    assert row(out, "w2").rstrip().endswith(REASON)
    assert URL in row(out, "w1")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True

    def text(self) -> str:
        """What the terminal shows: the output without its style escapes (bold, dim)."""
        return re.sub(r"\x1b\[[0-9;]*m", "", self.getvalue())


def test_a_terminal_fits_its_width_unless_wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("NO_COLOR", "1")
    fitted, wide = Terminal(), Terminal()
    status_console(file=fitted).print(status_view(snapshot()))
    status_console(wide=True, file=wide).print(status_view(snapshot()))
    assert max(len(line) for line in fitted.text().splitlines()) <= 80
    assert URL not in fitted.text()
    assert row(wide.text(), "w2").rstrip().endswith(REASON)


def autoscaler_line(out: str) -> str:
    (line,) = [line for line in out.splitlines() if line.startswith("autoscaler ")]
    return line


def test_the_scaling_figure_is_printed_once(serve) -> None:
    line = autoscaler_line(status())
    assert line == f"autoscaler qlrm  target 2 (min 2, max 2)  {QLRM_REASON}"
    snap = json.loads(status("--json"))
    assert snap["autoscaler"]["last_decision"]["reason"] == QLRM_REASON


def test_the_request_rate_is_printed_once(serve) -> None:
    reason = "0.25 req/s over 60s wants 1 workers (target_qps_per_replica 4): holding 1"
    serve(
        snapshot(
            {
                "policy": "request-rate",
                "target": 1,
                "min_workers": 1,
                "max_workers": 4,
                "qlrm": None,
                "qps": 0.25,
                "last_decision": {"at": NOW, "target": 1, "reason": reason},
            }
        )
    )
    line = autoscaler_line(status())
    assert line == f"autoscaler request-rate  target 1 (min 1, max 4)  {reason}"
    assert line.count("0.25") == 1


def test_the_figure_stays_when_the_reason_does_not_give_it(serve) -> None:
    serve(
        snapshot(
            {
                "policy": "qlrm",
                "target": 3,
                "min_workers": 1,
                "max_workers": 4,
                "qlrm": 2.5,
                "qps": None,
                "last_decision": {"at": NOW, "target": 3, "reason": "worker added by operator"},
            }
        )
    )
    line = autoscaler_line(status())
    assert line == "autoscaler qlrm  target 3 (min 1, max 4)  qlrm 2.50  worker added by operator"

"""The real CLI in a subprocess, for the end-to-end tests: ``flockctl(...)`` runs one command and
fails the test if it imported a heavy module (the scripting commands must start fast).

    from cli_driver import flockctl
    assert flockctl("status", "--json").code == 0
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

# Runs the CLI and reports, at exit, whether a heavy module got imported along the way.
DRIVER = """
import atexit, sys
heavy = ("textual", "torch", "transformers")
atexit.register(lambda: sys.stderr.write(
    "HEAVY=" + ",".join(m for m in heavy if m in sys.modules) + "\\n"))
from flockctl.cli import app
app(sys.argv[1:], prog_name="flockctl")
"""


class Result:
    """One CLI run: exit code, stdout, and stderr without the driver's report."""

    def __init__(self, proc: subprocess.CompletedProcess[str]):
        self.code = proc.returncode
        self.out = proc.stdout
        lines = proc.stderr.splitlines()
        heavy = [line for line in lines if line.startswith("HEAVY=")]
        assert heavy, proc.stderr
        self.heavy = heavy[-1].removeprefix("HEAVY=")
        self.err = "\n".join(line for line in lines if not line.startswith("HEAVY="))

    def json(self) -> Any:
        return json.loads(self.out)


def flockctl(*args: str, timeout: float = 60) -> Result:
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).parent,
        # os.environ as a shell would pass it: pytest imports readline, which exports COLUMNS=80
        # behind os.environ's back, and status would take that as a width to fit.
        env=dict(os.environ),
    )
    result = Result(proc)
    assert result.heavy == "", f"flockctl {args[0]} imported {result.heavy}"
    return result


def ready_ids(name: str = "default") -> list[str]:
    """The READY workers of deployment ``name``, as ``status --json`` lists them."""
    snap = flockctl("status", "--json", "--name", name).json()
    return [w["id"] for w in snap["workers"] if w["state"] == "READY"]


def processes_with(marker: Path) -> list[psutil.Process]:
    """Live processes with ``marker`` in their command line: a test's workers, found even when
    no daemon is left to list them."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if any(str(marker) in part for part in cmd) and proc.info["status"] != "zombie":
            found.append(proc)
    return found

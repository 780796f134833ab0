"""README must be true: its quick tour runs as written, and its CLI tables match the CLI.

The tour's commands are read out of README.md itself and run for real from the repository root
(only the port is swapped for a free one, and `logs -f` runs without following), so this fails
as soon as a command README shows stops working or stops printing what README shows.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import typer
from cli_driver import flockctl, ready_ids
from conftest import free_port, until_sync

from flockctl.cli import app

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
#: The port README's tour shows; the test runs on a free one instead.
TOUR_PORT = "3000"
DEFAULT_RE = re.compile(r"\[default: (.+?)\]")


def quick_tour() -> dict[str, tuple[list[str], list[str]]]:
    """Each command of README's quick tour (keyed by its first two words) as an argv, with the
    lines README shows it printing."""
    found = re.search(r"^## A quick tour\n.*?^```console\n(.*?)^```", README, re.S | re.M)
    assert found, "README has no console block under ## A quick tour"
    steps: dict[str, tuple[list[str], list[str]]] = {}
    shown: list[str] = []
    for line in found.group(1).splitlines():
        if line.startswith("$ "):
            argv = shlex.split(line[2:], comments=True)
            shown = []
            steps[" ".join(argv[:2])] = (argv, shown)
        elif line.strip():
            shown.append(line)
    return steps


def run(argv: list[str], port: int) -> subprocess.CompletedProcess:
    """One of README's commands, from the repository root, on ``port`` instead of README's."""
    argv = [arg.replace(f"localhost:{TOUR_PORT}", f"localhost:{port}") for arg in argv]
    # This environment's python and flockctl come first, as after `. .venv/bin/activate`; read
    # at call time, so FLOCKCTL_HOME is the test's.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "PATH": path}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def shape(shown: str) -> re.Pattern[str]:
    """A line README shows, as a pattern: words with a digit in them (ports, pids, ages,
    figures) and ``-`` (no figure yet) match any word; every other word must be there as is."""
    words = [
        r"\S+" if word == "-" or any(c.isdigit() for c in word) else re.escape(word)
        for word in shown.split()
    ]
    return re.compile(r"\s+".join(words))


@pytest.mark.e2e
def test_the_quick_tour_runs_as_readme_shows(flockctl_home):
    if shutil.which("curl") is None:
        pytest.skip("README's tour sends its request with curl, which is not installed")
    tour = quick_tour()
    assert list(tour) == [
        "flockctl up",
        "curl -s",
        "flockctl status",
        "flockctl logs",
        "flockctl down",
    ]
    port = free_port()
    up_argv, up_shown = tour["flockctl up"]
    up = run([*up_argv, "--port", str(port)], port)
    try:
        assert up.returncode == 0, up.stderr
        said, url = up_shown
        before, after = re.split(r"\(pid \d+\)", said.replace(f":{TOUR_PORT}", f":{port}"))
        pattern = rf"{re.escape(before)}\(pid (\d+)\){re.escape(after)}"
        first = re.fullmatch(pattern, up.stderr.splitlines()[0])
        assert first, f"{up.stderr!r} is not shaped like README's {said!r}"
        daemon_pid = int(first.group(1))
        assert up.stdout.splitlines() == [url.replace(f":{TOUR_PORT}", f":{port}")]

        curl_argv, curl_shown = tour["curl -s"]
        assert f"localhost:{TOUR_PORT}" in " ".join(curl_argv)
        chat = run(curl_argv, port)  # workers are still starting: the request waits for one
        assert chat.returncode == 0, chat.stderr
        lines = [line for line in chat.stdout.splitlines() if line]
        chunk_start = curl_shown[0].split("...")[0]  # data: {"id": ..., "object": ..., ...
        assert lines[-1] == curl_shown[-1] == "data: [DONE]"
        assert lines[:-1] and all(line.startswith(chunk_start) for line in lines[:-1]), lines
        chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}

        until_sync(lambda: len(ready_ids()) == 2, "two READY workers", 60)
        status_argv, status_shown = tour["flockctl status"]
        status = run(status_argv, port)
        assert status.returncode == 0, status.stderr
        out = [line for line in status.stdout.splitlines() if line.strip()]
        heading = next(i for i, line in enumerate(status_shown) if line.startswith("ID "))
        assert len(out) == len(status_shown), status.stdout
        for line, shown in zip(out[:heading], status_shown[:heading], strict=True):
            assert shape(shown).fullmatch(line.strip()), f"{line!r} is not like {shown!r}"
        assert out[heading].split() == status_shown[heading].split()
        rows = {line.split()[0]: line.strip() for line in out[heading + 1 :]}
        for shown in status_shown[heading + 1 :]:
            worker_id = shown.split()[0]
            assert shape(shown).fullmatch(rows[worker_id]), f"{rows} has no row like {shown!r}"

        workers = flockctl("status", "--json").json()["workers"]
        logs_argv, _ = tour["flockctl logs"]
        logs_argv = [arg for arg in logs_argv if arg not in ("-f", "--follow")]  # prints, ends
        worker = next(w for w in workers if w["id"] == logs_argv[2])
        logs = run(logs_argv, port)
        assert logs.returncode == 0, logs.stderr
        command = up_argv[up_argv.index("--worker-command") + 1]
        started = command.replace("{port}", worker["url"].rsplit(":", 1)[1])
        assert f"starting: {started}\n" in logs.stdout  # the worker's own log
        daemon_log = run(logs_argv[:2], port)  # `flockctl logs` alone is the daemon's
        assert daemon_log.returncode == 0, daemon_log.stderr
        assert f"serving on http://127.0.0.1:{port}" in daemon_log.stdout

        down_argv, _ = tour["flockctl down"]
        down = run(down_argv, port)
        assert down.returncode == 0, down.stderr
        assert down.stderr == 'flockctl: deployment "default" stopped\n'
    finally:
        flockctl("down", "--timeout", "20")
    pids = [daemon_pid, *(w["pid"] for w in workers)]
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)


# -- the CLI reference -----------------------------------------------------------------------


def table_after(marker: str) -> list[list[str]]:
    """The rows (cells stripped, header and rule left out) of the first table after
    ``marker``."""
    rest = README[README.index(marker) :]
    lines = rest[rest.index("\n|") + 1 :].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
        rows.append([cell.strip() for cell in cells])
    return rows


def commands() -> dict[str, Any]:
    """flockctl's commands by name (typer's own click objects)."""
    return dict(typer.main.get_command(app).commands)


def options(command: Any) -> dict[str, Any]:
    """A command's parameters by every flag that names them."""
    return {opt: p for p in command.params for opt in (*p.opts, *p.secondary_opts)}


def stated_default(param: Any) -> str | None:
    """The default ``--help`` gives: its ``[default: ...]`` text, else the parameter's own
    (a ``--x/--no-x`` flag on by default reads ``x``); None when there is none."""
    found = DEFAULT_RE.search(" ".join((getattr(param, "help", None) or "").split()))
    if found:
        return found.group(1)
    if param.default in (None, False, ()):
        return None
    if param.default is True:
        return param.opts[0].removeprefix("--")
    return str(param.default)


def agrees(readme: str, stated: str | None) -> bool:
    """README's default cell against ``--help``'s: the same number, the same words, or the
    first words of a longer one (README's row says the rest); an empty cell means none."""
    if not readme:
        return stated is None
    if readme == "see text":  # the row's description says what it depends on
        return stated is not None
    if stated is None:
        return False
    try:
        return float(readme) == float(stated)
    except ValueError:
        return stated == readme or stated.startswith(f"{readme} ")


def test_every_flag_of_up_in_readme_exists_with_readmes_default():
    up = options(commands()["up"])
    rows = table_after("Flags of `up`:")
    assert len(rows) > 20
    checked = 0
    for flag_cell, default_cell, _what in rows:
        flags = re.findall(r"`(--[\w-]+(?:/--[\w-]+)?)", flag_cell)
        assert flags, flag_cell
        defaults = re.split(r" / |, ", default_cell) if len(flags) > 1 else [default_cell]
        assert len(defaults) == len(flags), f"{flag_cell}: defaults {default_cell!r}"
        for flag, default in zip(flags, defaults, strict=True):
            names = flag.split("/")
            assert all(name in up for name in names), f"flockctl up has no {flag}"
            param = up[names[0]]
            stated = stated_default(param)
            assert agrees(default, stated), f"{flag}: README says {default!r}, --help {stated!r}"
            if "(repeatable)" in flag_cell:
                assert getattr(param, "multiple", False), f"{flag} is not repeatable"
            checked += 1
    assert checked >= 30


def test_every_command_in_readme_exists_with_its_flags_and_name():
    known = commands()
    rows = table_after("## CLI reference")
    assert [row[0].split()[1] for row in rows] == ["up", "status", "logs", "dashboard", "down"]
    for usage, _what in rows:
        words = usage.strip("`").split()
        command = known.get(words[1])
        assert command is not None, f"README lists {usage} but flockctl has no {words[1]}"
        opts = options(command)
        for flag in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", usage):
            assert flag in opts, f"flockctl {words[1]} has no {flag} ({usage})"
        # "Every command takes --name/-n (default `default`, or FLOCKCTL_NAME)."
        name = opts.get("--name")
        assert name is not None and "-n" in name.opts, f"flockctl {words[1]} has no --name/-n"
        assert stated_default(name) == "default" and name.envvar == "FLOCKCTL_NAME"

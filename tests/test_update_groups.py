"""``flockctl update`` of a deployment with worker groups: the groups whose definition changed move
one at a time, each within its own bounds; a group the new config adds is started and one it drops
is drained; a group that fails rolls back alone; ``group`` updates one group; status shows each
group's version. What is kept out (a rename, moving the first group) is refused by name.

The real daemon in-process with real fake-worker processes, under load for each group's model.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cli_driver import flockctl, processes_with
from conftest import fake_worker_command, free_port, until, until_sync
from update_traffic import load, post_update

from flockctl.render import status_console, status_view

pytestmark = pytest.mark.e2e
BROKEN = f"{sys.executable} -c 'raise SystemExit(3)' {{port}}"


def group(name: str, *extra: str, **fields: Any) -> dict[str, Any]:
    """A group of one fake worker serving model ``name`` (``extra``: flags that make a new
    definition of it)."""
    command = fake_worker_command("--model", name, *extra)
    return {"name": name, "worker_command": command, "replicas": 1, **fields}


async def run_update(d: Any, http: aiohttp.ClientSession, **body: Any) -> dict[str, Any]:
    status, answer = await post_update(d, http, **body)
    assert status == 202, answer
    await until(lambda: not d.deployment.update.running, "the update to end", 60)
    return d.deployment.update.to_dict()


def versions(d: Any) -> dict[str, int]:
    return {g["name"]: g["version"] for g in d.deployment.snapshot()["groups"]}


def serving(d: Any, name: str) -> list[tuple[str, int]]:
    return [(w.id, w.version) for w in d.deployment.pool if w.group == name and w.live]


async def test_groups_update_one_at_a_time_and_roll_back_alone(
    daemon: Any, http: aiohttp.ClientSession
) -> None:
    d = await daemon(groups=[group("chat"), group("code")], probe={"interval_seconds": 0.05})
    await d.wait_ready(2)
    config = d.deployment.cfg.model_dump(mode="json")
    code_worker = serving(d, "code")

    # chat gets a new definition and a group is added; code does not change.
    new_groups = [group("chat", "--tokens", "8"), group("code"), group("extra")]
    async with load(d.url, ["chat", "code"]) as seen:
        view = await run_update(d, http, config={**config, "groups": new_groups})
        count = seen["ok"]
        await until(lambda: seen["ok"] > count + 10, "requests after the update")
    assert seen["failed"] == []
    assert view["state"] == "succeeded", view["reason"]
    assert [(g["name"], g["change"], g["state"]) for g in view["groups"]] == [
        ("extra", "add", "succeeded"),
        ("chat", "update", "succeeded"),
    ]
    assert d.deployment.version == 2
    assert versions(d) == {"chat": 2, "code": 1, "extra": 2}
    assert [v for _, v in serving(d, "chat")] == [2] and serving(d, "code") == code_worker
    assert len(d.deployment.pool.ready()) == 3
    text = status_console(wide=True)
    with text.capture() as captured:
        text.print(status_view(d.deployment.snapshot()))
    lines = {
        line.split()[1]: line for line in captured.get().splitlines() if line.startswith("group ")
    }
    assert "version 2" in lines["chat"] and "version 1" in lines["code"]

    # One group by name: only code moves, although the config also changes chat.
    config = d.deployment.cfg.model_dump(mode="json")
    both = [group("chat", "--tokens", "4"), group("code", "--tokens", "8"), group("extra")]
    view = await run_update(d, http, config={**config, "groups": both}, group="code")
    assert view["state"] == "succeeded" and [g["name"] for g in view["groups"]] == ["code"]
    assert versions(d) == {"chat": 2, "code": 3, "extra": 2}
    assert "--tokens 8" in d.deployment.cfg.groups[1].worker_command

    # chat's new definition fails: chat rolls back alone, and extra's removal is not tried.
    chat_worker = serving(d, "chat")
    broken = [
        {"name": "chat", "worker_command": BROKEN, "replicas": 1},
        group("code", "--tokens", "8"),
    ]
    async with load(d.url, ["chat", "code"]) as seen:
        view = await run_update(d, http, config={**config, "groups": broken})
    assert seen["failed"] == [] and seen["ok"] > 0
    assert view["state"] == "rolled_back"
    assert (
        view["reason"].startswith("group chat: ")
        and "failed before becoming READY" in view["reason"]
    )
    assert [(g["name"], g["state"]) for g in view["groups"]] == [
        ("chat", "rolled_back"),
        ("extra", "skipped"),
    ]
    assert d.deployment.version == 3 and versions(d) == {"chat": 2, "code": 3, "extra": 2}
    assert serving(d, "chat") == chat_worker

    # A group the new config drops is drained and its workers stop.
    extra = [w for w in d.deployment.pool if w.group == "extra"]
    config = d.deployment.cfg.model_dump(mode="json")
    view = await run_update(d, http, config={**config, "groups": config["groups"][:2]})
    assert view["state"] == "succeeded"
    assert [(g["name"], g["change"]) for g in view["groups"]] == [("extra", "remove")]
    assert versions(d) == {"chat": 2, "code": 3}
    await until(
        lambda: all(w.state.value == "TERMINATED" for w in extra), "extra's workers to stop"
    )
    assert d.deployment.version == 5  # each update takes the next number, 4 was rolled back


async def test_group_updates_it_cannot_do_are_refused_by_name(
    daemon: Any, http: aiohttp.ClientSession
) -> None:
    d = await daemon(groups=[group("chat"), group("code")], probe={"interval_seconds": 0.05})
    await d.wait_ready(2)
    config = d.deployment.cfg.model_dump(mode="json")
    code = group("code")
    renamed = {**code, "name": "coder"}
    cases = {
        "groups: code renamed to coder": {"config": {**config, "groups": [group("chat"), renamed]}},
        "groups: the first group (chat)": {"config": {**config, "groups": [code, group("chat")]}},
        "group: no group 'nope' (the groups: chat, code)": {"config": config, "group": "nope"},
        "groups: the new config changes no group": {"config": config},
        "groups: the new config declares no groups": {"config": {**config, "groups": []}},
    }
    for said, body in cases.items():
        status, answer = await post_update(d, http, **body)
        assert status == 422, (said, answer)
        assert answer["error"]["message"].startswith(said), answer
    assert d.deployment.update is None and d.deployment.version == 1


async def test_a_deployment_without_groups_takes_no_group(
    daemon: Any, http: aiohttp.ClientSession
) -> None:
    d = await daemon(worker_command=fake_worker_command(), replicas=1)
    config = d.deployment.cfg.model_dump(mode="json")
    status, answer = await post_update(d, http, config=config, group="chat")
    assert status == 422
    assert (
        answer["error"]["message"] == "group: this deployment has no groups, so none named 'chat'"
    )


def test_the_cli_updates_one_group_by_name(tmp_path: Path) -> None:
    marker = tmp_path / "marker-never-exists"
    spec = tmp_path / "groups.yaml"

    def command(model: str, *extra: str) -> str:
        return fake_worker_command("--model", model, "--unhealthy-file", str(marker), *extra)

    groups = [{"name": n, "worker_command": command(n), "replicas": 1} for n in ("chat", "code")]
    spec.write_text(yaml.safe_dump({"flockctl": {"groups": groups}}))
    up = flockctl("up", str(spec), "--name", "grp", "--port", str(free_port()),
                  "--probe-interval", "0.1")  # fmt: skip
    assert up.code == 0, up.err
    try:

        def group_versions() -> dict[str, tuple[int, int]]:
            snap = flockctl("status", "--name", "grp", "--json").json()
            return {g["name"]: (g["version"], g["ready"]) for g in snap["groups"]}

        until_sync(lambda: group_versions() == {"chat": (1, 1), "code": (1, 1)}, "both groups")
        new_chat = command("chat", "--tokens", "8")
        moved = flockctl("update", "--name", "grp", "--group", "chat",
                         "--worker-command", new_chat, "--json")  # fmt: skip
        assert moved.code == 0, moved.err
        view = moved.json()
        assert view["state"] == "succeeded" and [g["name"] for g in view["groups"]] == ["chat"]
        assert group_versions() == {"chat": (2, 1), "code": (1, 1)}
        wrong = flockctl("update", "--name", "grp", "--group", "nope", "--replicas", "2")
        assert wrong.code == 2
        assert wrong.err.strip() == (
            "flockctl: --group: the deployment has no group 'nope' (its groups: chat, code)"
        )
        table = flockctl("status", "--name", "grp", "--wide")
        assert "version 2" in next(
            ln for ln in table.out.splitlines() if ln.startswith("group chat")
        )
    finally:
        flockctl("down", "--name", "grp", "--timeout", "30")
    assert processes_with(marker) == []


def test_a_failed_update_says_which_groups_kept_the_new_version():
    from flockctl.commands.update import _serving

    def ended(*states: str) -> dict:
        groups = [
            {"name": n, "change": "update", "state": s, "reason": None}
            for n, s in zip(("chat", "code", "extra"), states, strict=False)
        ]
        return {"from_version": 1, "to_version": 2, "groups": groups}

    assert _serving(ended()) == "version 1 serves"  # type: ignore[arg-type]
    assert _serving(ended("rolled_back", "skipped")) == "version 1 serves"  # type: ignore[arg-type]
    assert _serving(ended("succeeded", "rolled_back", "skipped")) == (  # type: ignore[arg-type]
        "version 2 serves in group chat; version 1 in the others"
    )
    assert _serving(ended("succeeded", "succeeded", "rolled_back")) == (  # type: ignore[arg-type]
        "version 2 serves in groups chat, code; version 1 in the others"
    )

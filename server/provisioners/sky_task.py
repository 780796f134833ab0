"""Reading a SkyPilot task as the SPEC wrote it, without SkyPilot: which keys make the task, what
ports it opens, whether it asks for spot machines.

The config checks a SkyPilot deployment with these before anything is launched, and a local or
static dry run needs them on a machine where SkyPilot is not installed, so they work on the plain
mapping. SkyPilot's own parsing (``sky_sdk.describe``) comes later, where it is installed.
"""

from __future__ import annotations

import re
from typing import Any

#: Top-level keys of a SkyPilot task YAML. They make the task each SkyPilot worker runs; the
#: local and static provisioners do not use them.
SKYPILOT_TASK_KEYS = frozenset(
    {
        "name",
        "workdir",
        "num_nodes",
        "resources",
        "envs",
        "secrets",
        "file_mounts",
        "setup",
        "run",
        "config",
        "volumes",
        "event_callback",
        "inputs",
        "outputs",
    }
)

_PORTS = re.compile(r"(\d+)(?:-(\d+))?")


def resource_options(resources: Any) -> list[dict[str, Any]]:
    """The resource mappings a task may run on: the top level and each ``any_of``/``ordered``."""
    if not isinstance(resources, dict):
        return []
    options = [resources]
    for key in ("any_of", "ordered"):
        extra = resources.get(key)
        if isinstance(extra, list):
            options += [item for item in extra if isinstance(item, dict)]
    return options


def resource_ports(resources: Any) -> list[int]:
    """Every port the task's resources open (a range counts each of its ports)."""
    found: set[int] = set()
    for option in resource_options(resources):
        ports = option.get("ports")
        for item in ports if isinstance(ports, list) else [ports]:
            text = str(item).strip() if item is not None else ""
            match = _PORTS.fullmatch(text)
            if match:
                low = int(match.group(1))
                found.update(range(low, int(match.group(2) or low) + 1))
    return sorted(found)


def uses_spot(resources: Any) -> bool:
    """Whether any of the task's resource options asks for spot (preemptible) machines."""
    return any(option.get("use_spot") is True for option in resource_options(resources))


def asks_for_cloud(task: dict[str, Any]) -> bool:
    """A SPEC that is a SkyPilot task (it says what to run, or on what machines)."""
    return "run" in task or "resources" in task

"""How a deployment config field is given on flockctl's command line.

A field of ``DeploymentConfig`` (or of a model nested in it, such as the probe) that a flag can
set carries a ``Flag`` in its annotation: ``port: Annotated[int, Flag(DAEMON)] = Field(3000, ...)``.
The flag's name, its help (the field's description) and its ``[default: ...]`` all come from the
field; ``Flag`` holds only what the field cannot say. ``flockctl up``, ``update`` and ``simulate``
build their options from these (``flockctl.commands.config_flags``). A field no flag sets says
so, and who gives it instead, with a ``NoFlag``; a test holds every field to one or the other.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The ``--help`` panels config flags are listed under.
WORKERS = "Workers"
AUTOSCALING = "Autoscaling"
BALANCING = "Balancing"
PROBE = "Readiness probe"
DAEMON = "Daemon"


@dataclass(frozen=True)
class Flag:
    """A config field's flag: what its name, type and default do not say themselves."""

    #: The ``--help`` panel; None: the command's own options.
    panel: str | None = None
    #: The flag's name (``draft-model``) where it is not the field's (``draft_models``).
    name: str | None = None
    #: A one-letter alias, ``-n``.
    short: str | None = None
    #: An environment variable that gives the flag when it is left out.
    envvar: str | None = None
    #: The ``[default: ...]`` of ``--help`` where the field's default does not say it (a None
    #: that flockctl fills in later, or a number written as a person writes it).
    default_text: str | None = None
    #: The command line reads text that the field's validator parses (``32M``, ``0,1,3``, a
    #: shell-quoted string) instead of the field's own type.
    text: bool = False

    def option(self, field: str) -> str:
        """The flag as typed: ``--draft-model``."""
        return "--" + (self.name or field.replace("_", "-"))


@dataclass(frozen=True)
class NoFlag:
    """A config field no flag sets, and who gives it instead."""

    given_by: str


#: A field only a SPEC file gives (its SkyPilot task, ``service:`` or ``flockctl:`` section).
SPEC_ONLY = NoFlag("a SPEC file")

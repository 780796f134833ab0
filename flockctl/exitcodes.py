"""Exit codes of every flockctl command, in one place so scripts can rely on them.

| code | name           | meaning                                                              |
|------|----------------|----------------------------------------------------------------------|
| 0    | OK             | done (``down`` of a deployment that is not running is also OK)       |
| 1    | ERROR          | an unexpected failure; the message says what                         |
| 2    | USAGE          | bad flags, or a SPEC file with an invalid or unknown field           |
| 3    | NOT_RUNNING    | no daemon runs under that ``--name``                                 |
| 4    | START_FAILED   | the daemon exited while starting; its log tail is printed            |
| 5    | TIMEOUT        | gave up waiting (``up --timeout``, ``down --timeout``)               |
| 6    | UNREACHABLE    | the daemon runs but its admin API did not answer, or refused         |
| 7    | ADDRESS_IN_USE | the port asked for is already taken                                  |
| 8    | NOT_FOUND      | no such worker, or no such log                                       |
| 9    | UPDATE_FAILED  | ``update``: the new version failed and was rolled back, or refused   |
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit status of the flockctl commands (see the module docstring); ``summary`` is
    the few words ``flockctl --help`` lists it with."""

    summary: str

    def __new__(cls, value: int, summary: str) -> ExitCode:
        member = int.__new__(cls, value)
        member._value_ = value
        member.summary = summary
        return member

    OK = 0, "ok"
    ERROR = 1, "error"
    USAGE = 2, "usage"
    NOT_RUNNING = 3, "not running"
    START_FAILED = 4, "daemon failed to start"
    TIMEOUT = 5, "timeout"
    UNREACHABLE = 6, "daemon unreachable"
    ADDRESS_IN_USE = 7, "address in use"
    NOT_FOUND = 8, "not found"
    UPDATE_FAILED = 9, "update rolled back or refused"


def exit_codes_help() -> str:
    """The exit codes in one sentence, for ``--help``: written from the enum, so a new code is
    listed as soon as it exists."""
    return "Exit codes: " + ", ".join(f"{code.value} {code.summary}" for code in ExitCode) + "."

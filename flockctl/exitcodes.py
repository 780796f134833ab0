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
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit status of the flockctl commands (see the module docstring)."""

    OK = 0
    ERROR = 1
    USAGE = 2
    NOT_RUNNING = 3
    START_FAILED = 4
    TIMEOUT = 5
    UNREACHABLE = 6
    ADDRESS_IN_USE = 7
    NOT_FOUND = 8

"""A small client for the daemon's admin API, found through the deployment's ``daemon.json``."""

from __future__ import annotations

from typing import Any

import httpx

from flockctl import admin_routes as routes
from flockctl.exitcodes import ExitCode
from flockctl.schema import (
    AutoscalerView,
    LogChunk,
    StatusSnapshot,
    UpdateView,
    WorkerDetail,
    WorkerView,
)
from flockctl.state import DaemonRecord, running_daemon


def error_message(resp: httpx.Response) -> str:
    """What the daemon said in an error answer: its JSON ``error.message``, else the body."""
    try:
        return str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return resp.text[:200]


class ClientError(Exception):
    """A failure a command reports as one line on stderr with ``code`` as its exit status."""

    def __init__(self, message: str, code: ExitCode = ExitCode.ERROR, status: int | None = None):
        super().__init__(message)
        self.code = code
        #: The daemon's HTTP status where it answered with an error.
        self.status = status


class AdminClient:
    def __init__(self, record: DaemonRecord, timeout: float = 10.0):
        self.record = record
        self._http = httpx.Client(
            base_url=record.endpoint,
            headers={"Authorization": f"Bearer {record.token}"},
            timeout=timeout,
            trust_env=False,
        )

    @classmethod
    def for_name(cls, name: str, timeout: float = 10.0) -> AdminClient:
        record = running_daemon(name)
        if record is None:
            raise ClientError(
                f'no daemon named "{name}" is running; start one with flockctl up --name {name}',
                ExitCode.NOT_RUNNING,
            )
        return cls(record, timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(
                f"the daemon of {self.record.name!r} (pid {self.record.pid}) does not answer at"
                f" {self.record.endpoint}: {exc}",
                ExitCode.UNREACHABLE,
            ) from None
        if resp.status_code >= 400:
            message = error_message(resp)
            code = ExitCode.NOT_FOUND if resp.status_code == 404 else ExitCode.UNREACHABLE
            raise ClientError(
                f"{method} {path}: HTTP {resp.status_code}: {message}", code, resp.status_code
            )
        return resp.json()

    def status(self) -> StatusSnapshot:
        return self.request("GET", routes.STATUS)

    def shutdown(self) -> dict[str, Any]:
        return self.request("POST", routes.SHUTDOWN)

    def worker(self, worker_id: str) -> WorkerDetail:
        """One worker with its probe history and command line."""
        return self.request("GET", routes.worker_path(worker_id))

    def add_worker(self, url: str | None = None, model: str | None = None) -> WorkerView:
        """One more worker: at ``url`` (static deployments), or serving ``model`` (local)."""
        body = {k: v for k, v in (("url", url), ("model", model)) if v is not None}
        return self.request("POST", routes.WORKERS, json=body or None)

    def remove_worker(self, worker_id: str) -> WorkerView:
        """Drain a worker and lower the target: the deployment gets smaller."""
        return self.request("DELETE", routes.worker_path(worker_id))

    def drain_worker(self, worker_id: str) -> WorkerView:
        """Drain a worker and keep the target: a fresh worker replaces it."""
        return self.request("POST", routes.drain_path(worker_id))

    def set_bounds(
        self, min_workers: int | None = None, max_workers: int | None = None
    ) -> AutoscalerView:
        """New autoscaler bounds; returns the autoscaler section of the status snapshot."""
        body = {
            k: v
            for k, v in (("min_workers", min_workers), ("max_workers", max_workers))
            if v is not None
        }
        return self.request("PATCH", routes.AUTOSCALER, json=body)

    def update(
        self,
        config: dict[str, Any] | None,
        mode: str = "rolling",
        max_surge: int = 1,
        update_timeout: float = 600.0,
        rollback: bool = False,
        group: str | None = None,
    ) -> UpdateView:
        """Start moving the deployment to its next version (running the resolved ``config``, or
        the previous version's with ``rollback``; ``group``: that group alone); returns the
        update as it starts."""
        body: dict[str, Any] = {
            "mode": mode,
            "max_surge": max_surge,
            "update_timeout": update_timeout,
            "rollback": rollback,
        }
        if config is not None:
            body["config"] = config
        if group is not None:
            body["group"] = group
        return self.request("POST", routes.UPDATE, json=body)

    def logs(self, target: str, tail: int = 200, offset: int | None = None) -> LogChunk:
        """Lines of the daemon's or a worker's log; pass the returned ``offset`` back to get
        only the lines written since (``reset`` is true when the log started over)."""
        return self.request("GET", routes.logs_path(target, tail=tail, offset=offset))

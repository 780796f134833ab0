"""The dashboard's only connection to the daemon: the status snapshot and the admin calls.

Widgets never talk HTTP; the app's polling worker and its actions do, through this class.
"""

from __future__ import annotations

from typing import Any

import httpx

from flockctl import admin_routes as routes
from flockctl.client import error_message
from flockctl.schema import StatusSnapshot


class FeedError(Exception):
    """The daemon did not answer, or answered with an error; the message says which, and
    ``status`` is the HTTP status of an error answer (None when there was no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Feed:
    def __init__(self, endpoint: str, token: str | None, timeout: float = 5.0):
        self.endpoint = endpoint
        #: Sent to the admin API and to ``/jobs/{id}`` (which the balancer opens to the admin
        #: token when an API key is set, and relays without it): never to a worker.
        self._admin = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=endpoint, timeout=timeout, trust_env=False)

    async def close(self) -> None:
        await self._http.aclose()

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        if self._http.is_closed:
            raise FeedError(f"{method} {path}: the dashboard is closing")
        try:
            headers = self._admin if _takes_admin_token(path) else {}
            resp = await self._http.request(method, path, headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            raise FeedError(
                f"{self.endpoint} does not answer: {exc or type(exc).__name__}"
            ) from None
        if resp.status_code >= 400:
            raise FeedError(
                f"{method} {path}: HTTP {resp.status_code}: {error_message(resp)}",
                resp.status_code,
            )
        try:
            return resp.json()
        except ValueError:
            raise FeedError(f"{method} {path}: the answer is not JSON") from None

    async def status(self) -> StatusSnapshot:
        snap = await self.call("GET", routes.STATUS)
        if not isinstance(snap, dict) or "workers" not in snap:
            raise FeedError(f"GET {routes.STATUS}: not a status snapshot")
        return snap  # type: ignore[return-value]


def _takes_admin_token(path: str) -> bool:
    return path.startswith((routes.ADMIN_PREFIX, routes.JOBS_PREFIX))

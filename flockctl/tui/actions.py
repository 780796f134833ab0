"""The dashboard's actions on the deployment, through the admin API: add or start workers, change
the bounds, update, drain, remove, shut down. The destructive ones ask first; ``--readonly`` turns
them all off. A mixin of :class:`flockctl.tui.app.Dashboard`, which holds the feed and snapshot."""

from __future__ import annotations

from typing import Any

from textual.app import App

from flockctl import admin_routes as routes
from flockctl.schema import AutoscalerView, StatusSnapshot, WorkerView
from flockctl.tui.dialogs import ConfirmScreen, FormScreen
from flockctl.tui.feed import Feed, FeedError
from flockctl.tui.screens import LiveScreen


class DeploymentActions(App[None]):
    """Each ``action_*`` here is bound to a key in the dashboard (see ``Dashboard.BINDINGS``)."""

    feed: Feed | None
    deployment: str
    readonly: bool
    snapshot: StatusSnapshot | None

    def live_screen(self) -> LiveScreen | None:
        raise NotImplementedError

    def poll_now(self) -> None:
        raise NotImplementedError

    def _act(self, what: str, method: str, path: str, body: Any = None) -> None:
        """Send one admin call off the UI's back, then say how it went and poll at once."""

        feed = self.feed
        if feed is None:
            return

        async def run() -> None:
            try:
                await feed.call(method, path, json=body)
            except FeedError as exc:
                self.notify(str(exc), title=f"{what}: failed", severity="error", timeout=8)
            else:
                self.notify(what, title="done")
            self.poll_now()

        self.run_worker(run(), group="actions")

    def _refuse_readonly(self) -> bool:
        if self.readonly:
            self.notify("started with --readonly: actions are off", severity="warning")
        return self.readonly

    def action_add_worker(self) -> None:
        if not self._refuse_readonly():
            self._act("worker added", "POST", routes.WORKERS)

    def action_start_model(self) -> None:
        if self._refuse_readonly():
            return
        model = (self.snapshot["deployment"].get("model") if self.snapshot else None) or "demo"

        def chosen(values: dict[str, str] | None) -> None:
            if values:
                self._act(
                    f"engine worker with {values['model']} starting",
                    "POST",
                    routes.WORKERS,
                    {"model": values["model"]},
                )

        self.push_screen(
            FormScreen(
                "Start a local engine worker",
                [("model", "model (a hub id, a local path, or demo)", str(model))],
                lambda v: None if v["model"] else "a model is needed",
            ),
            chosen,
        )

    def action_bounds(self) -> None:
        if self._refuse_readonly():
            return
        auto = self._autoscaler()

        def check(values: dict[str, str]) -> str | None:
            try:
                low, high = int(values["min"]), int(values["max"])
            except ValueError:
                return "min and max must be whole numbers"
            if low < 0 or high < 1 or low > high:
                return f"need 0 <= min <= max and max >= 1 (got min {low}, max {high})"
            return None

        def chosen(values: dict[str, str] | None) -> None:
            if values:
                low, high = int(values["min"]), int(values["max"])
                self._act(
                    f"bounds set: min {low}, max {high}",
                    "PATCH",
                    routes.AUTOSCALER,
                    {"min_workers": low, "max_workers": high},
                )

        self.push_screen(
            FormScreen(
                "Autoscaler bounds",
                [
                    ("min", "min workers", str(auto["min_workers"] if auto else 0)),
                    ("max", "max workers", str(auto["max_workers"] if auto else 1)),
                ],
                check,
            ),
            chosen,
        )

    def action_update(self) -> None:
        """Update the deployment to a new model or worker command (a static one: to new
        endpoints) through ``POST /-/update``, after a confirmation saying what happens."""
        if self._refuse_readonly() or self.snapshot is None:
            return
        d = self.snapshot["deployment"]
        static = d["provisioner"] == "static"
        model, command = d.get("model"), d.get("worker_command")
        urls = " ".join(str(w["url"]) for w in self._worker_views() if w["state"] == "READY")
        what: list[tuple[str, str, str]] = (
            [("endpoints", "endpoints (URLs, space-separated): the new list", urls)]
            if static
            else [
                ("model", "model (a hub id, a local path, or demo)", model or ""),
                (
                    "worker_command",
                    "or a worker command (with {port})",
                    "" if model else command or "",
                ),
            ]
        )
        fields = [*what, ("mode", "mode: rolling or blue-green", "rolling")]

        def change(values: dict[str, str]) -> dict[str, Any]:
            if static:
                return {"endpoints": values["endpoints"].split()}
            key = "model" if values["model"] else "worker_command"
            return {key: values[key]}

        def check(values: dict[str, str]) -> str | None:
            if values["mode"] not in ("rolling", "blue-green"):
                return "mode must be rolling or blue-green"
            if static:
                return None if values["endpoints"].split() else "give at least one endpoint"
            if bool(values["model"]) == bool(values["worker_command"]):
                return "give a model or a worker command (one of them)"
            return None

        def chosen(values: dict[str, str] | None) -> None:
            if not values:
                return
            changes = change(values)
            ((key, value),) = changes.items()
            shown = " ".join(value) if isinstance(value, list) else value
            body = {"changes": changes, "mode": values["mode"]}
            self._confirm(
                f"Update {d['name']} to its next version?",
                f"New workers start with {key.replace('_', ' ')} {shown!r} ({values['mode']});"
                " old workers drain once new ones are READY. If the new ones fail, the update"
                " is rolled back and the old version keeps serving.",
                "Update",
                lambda: self._act("update started", "POST", routes.UPDATE, body),
            )

        self.push_screen(FormScreen("Update the deployment", fields, check), chosen)

    def _selected(self) -> str | None:
        screen = self.live_screen()
        return screen.selected_worker() if screen is not None else None

    def _worker_views(self) -> list[WorkerView]:
        return self.snapshot["workers"] if self.snapshot else []

    def _autoscaler(self) -> AutoscalerView | None:
        return self.snapshot["autoscaler"] if self.snapshot else None

    def _worker(self, worker_id: str) -> WorkerView | None:
        return next((w for w in self._worker_views() if str(w["id"]) == worker_id), None)

    def action_drain(self) -> None:
        worker = self._selected()
        if worker is not None:
            self.drain(worker)

    def action_remove(self) -> None:
        worker = self._selected()
        if worker is not None:
            self.remove(worker)

    def drain(self, worker_id: str) -> None:
        if self._refuse_readonly():
            return
        worker = self._worker(worker_id)
        busy = worker["in_flight"] if worker else 0
        self._confirm(
            f"Drain worker {worker_id}?",
            f"It takes no new requests, finishes the {busy} in flight, and stops; the"
            " autoscaler starts a replacement (the target stays).",
            "Drain",
            lambda: self._act(f"{worker_id} draining", "POST", routes.drain_path(worker_id)),
        )

    def remove(self, worker_id: str) -> None:
        if self._refuse_readonly():
            return
        auto = self._autoscaler()
        self._confirm(
            f"Remove worker {worker_id}?",
            f"It drains and stops, and the target drops by one (not below min_workers"
            f" {auto['min_workers'] if auto else '-'}).",
            "Remove",
            lambda: self._act(f"{worker_id} removed", "DELETE", routes.worker_path(worker_id)),
        )

    def action_shutdown(self) -> None:
        if self._refuse_readonly():
            return
        d = self.snapshot["deployment"] if self.snapshot else None
        live = sum(
            1
            for w in self._worker_views()
            if w["state"] not in ("TERMINATED", "FAILED", "PREEMPTED")
        )
        self._confirm(
            f"Shut deployment {d['name'] if d else self.deployment!r} down?",
            f"Every worker ({live}) drains and stops, then the daemon exits; the endpoint"
            f" {d['endpoint'] if d else ''} stops answering.",
            "Shut down",
            lambda: self._act("the deployment is shutting down", "POST", routes.SHUTDOWN),
        )

    def _confirm(self, question: str, consequence: str, yes: str, then: Any) -> None:
        def answered(ok: bool | None) -> None:
            if ok:
                then()

        self.push_screen(ConfirmScreen(question, consequence, yes), answered)

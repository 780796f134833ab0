"""The dashboard's dialogs: the confirmation before a destructive action, a small form, and the
offer to start a deployment when none runs under the name."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Input, Label, Static


class ConfirmScreen(ModalScreen[bool]):
    """Asks before a destructive action; ``y``/``enter`` confirm, ``n``/``esc`` cancel."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes", id="confirm.yes"),
        Binding("n,escape", "answer(False)", "No", id="confirm.no"),
    ]

    def __init__(self, question: str, consequence: str, yes: str) -> None:
        super().__init__()
        self.question = question
        self.consequence = consequence
        self.yes = yes

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.question, id="question")
            yield Static(self.consequence, id="consequence")
            with Horizontal(id="buttons"):
                yield Button(f"{self.yes} (y)", variant="error", id="yes")
                yield Button("Cancel (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class FormScreen(ModalScreen[dict[str, str] | None]):
    """A few labelled inputs; ``enter`` submits when ``check`` finds no problem, ``esc`` cancels."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", id="form.cancel"),
    ]

    def __init__(
        self,
        title: str,
        fields: list[tuple[str, str, str]],
        check: Any = None,
    ) -> None:
        """``fields``: (name, label, initial value); ``check(values)`` returns a problem or None."""
        super().__init__()
        self.title_text = title
        self.fields = fields
        self.check = check

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.title_text, id="question")
            for name, label, value in self.fields:
                yield Label(label)
                yield Input(value=value, id=f"field-{name}")
            yield Static("", id="problem")
            yield Static("enter submits, esc cancels", classes="hint")

    def values(self) -> dict[str, str]:
        return {
            name: self.query_one(f"#field-{name}", Input).value.strip()
            for name, _label, _value in self.fields
        }

    def on_input_submitted(self, event: Input.Submitted) -> None:
        values = self.values()
        problem = self.check(values) if self.check is not None else None
        if problem:
            self.query_one("#problem", Static).update(Text(f"✗ {problem}", style="bold"))
            return
        self.dismiss(values)

    def action_cancel(self) -> None:
        self.dismiss(None)


class StartScreen(Screen[None]):
    """No daemon runs under the name: offer to start one, then the app watches it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.quit", "Quit", id="start.quit"),
    ]

    def __init__(self, name: str) -> None:
        super().__init__()
        self.deployment = name

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(
                f"No deployment named {self.deployment!r} is running. Start one?", id="question"
            )
            yield Label("Local engine workers serving the demo model (built on first use):")
            with Horizontal(classes="row"):
                yield Input("2", id="worker-count", type="integer", max_length=2)
                yield Button("Start demo workers", variant="primary", id="demo")
            yield Label("Or a SPEC file (a flockctl: and/or SkyServe service: section):")
            with Horizontal(classes="row"):
                yield Input(placeholder="path/to/service.yaml", id="spec")
                yield Button("Start from SPEC", id="from-spec")
            yield Static("", id="problem")
            yield Static("esc quits without starting anything", classes="hint")

    def on_mount(self) -> None:
        self.query_one("#demo", Button).focus()

    def problem(self, text: str) -> None:
        self.query_one("#problem", Static).update(Text(f"✗ {text}" if text else ""))
        for button in self.query(Button):
            button.disabled = False

    def on_button_pressed(self, event: Button.Pressed) -> None:
        spec: str | None = None
        workers = 0
        if event.button.id == "demo":
            raw = self.query_one("#worker-count", Input).value.strip()
            if not raw.isdigit() or not 1 <= int(raw) <= 64:
                self.problem(f"workers: {raw or 'nothing'} is not a number from 1 to 64")
                return
            workers = int(raw)
        else:
            spec = self.query_one("#spec", Input).value.strip()
            if not spec:
                self.problem("give the path of a SPEC file")
                return
        for button in self.query(Button):
            button.disabled = True
        self.query_one("#problem", Static).update("starting the daemon…")
        self.app.start_daemon(spec, workers)  # type: ignore[attr-defined]

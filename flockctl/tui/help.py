"""The ``?`` screen: every key of every screen, with the binding id that remaps it.

It lists the keys of all screens, not only the one underneath, so the log view's keys can be
found from the overview and ``esc`` is listed even where it has nothing to close yet.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import ClassVar

from rich.cells import cell_len
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

COLUMNS = ("KEY", "WHAT", "BINDING ID")
#: One row of the help: the key(s) as shown, what it does, its binding id.
KeyRow = tuple[str, str, str]


def key_rows(
    bindings: Sequence[BindingType],
    keymap: Mapping[str, str],
    display: Callable[[Binding], str],
    off: Collection[str] = (),
) -> list[KeyRow]:
    """A row per binding id of ``bindings``, with the keys ``keymap`` gives it (or its own), in
    ``display``'s words; the ids in ``off`` are marked as turned off."""
    keys: dict[str, list[str]] = {}
    what: dict[str, str] = {}
    for item in bindings:
        for binding in Binding.make_bindings([item]):
            if binding.id is None:
                continue
            mapped = keymap.get(binding.id, binding.key)
            if binding.id not in keys:
                keys[binding.id] = [
                    display(Binding(key.strip(), binding.action)) for key in mapped.split(",")
                ]
                what[binding.id] = binding.description + (" (off)" if binding.id in off else "")
            elif binding.id not in keymap:
                keys[binding.id].append(display(binding))
    return [(" ".join(keys[i]), what[i], i) for i in keys]


class HelpScreen(ModalScreen[None]):
    """Every key, screen by screen, with its binding id (remappable in the config file)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,question_mark,q", "dismiss", "Close", id="help.close"),
    ]

    def __init__(
        self, sections: list[tuple[str, list[KeyRow]]], config: str, readonly: bool
    ) -> None:
        """``sections``: a heading (where the keys work) and its rows."""
        super().__init__()
        self.sections = sections
        self.config = config
        self.readonly = readonly

    def compose(self) -> ComposeResult:
        rows = [row for _heading, section in self.sections for row in section]
        widths = [
            max(map(cell_len, [name, *(row[i] for row in rows)])) for i, name in enumerate(COLUMNS)
        ]
        parts: list[RenderableType] = [self._table(widths, [], header=True)]
        for heading, section in self.sections:
            parts += [Text(f"\n{heading}", style="bold"), self._table(widths, section)]
        note = Text(
            f'\nRemap a key in {self.config}:\n[dashboard.keys]\npause = "space"\n',
            style="dim",
        )
        if self.readonly:
            note.append("\nRead-only: the actions that change the deployment are off.")
        with VerticalScroll(id="dialog"):
            yield Label("keys", id="question")
            yield Static(Group(*parts), id="keys")
            yield Static(note)

    @staticmethod
    def _table(widths: list[int], rows: list[KeyRow], header: bool = False) -> Table:
        """One section's keys; every section has the same column widths, so they line up."""
        table = Table(box=None, header_style="bold", pad_edge=False, show_header=header)
        for name, width in zip(COLUMNS, widths, strict=True):
            table.add_column(name, width=width, style="dim" if name == "BINDING ID" else None)
        for row in rows:
            table.add_row(*row)
        return table

"""The overview's widgets. They only render a status snapshot they are given; none talks HTTP."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, ClassVar

from rich.cells import cell_len
from rich.segment import Segment
from rich.text import Text
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widgets import Static

from flockctl.render import ago, engine_jobs, job_cells, natural_key, scaling_input, state_text
from flockctl.schema import GroupView, StatusSnapshot
from flockctl.tui.cells import cell_text, memory_cell, memory_place, ms_text, preemptions

#: What a table cell holds: plain text, or styled text (a state glyph and word, a bar).
Cell = str | Text


class LiveTable(ScrollView, can_focus=True):
    """A table for data that changes on every poll: rows are kept by key in ``natural_key`` order
    of their keys, and a new set of rows replaces the old one in one step.

    Built for the dashboard's load (hundreds of rows whose counters all move each second): a sync
    only stores the rows and measures the columns, and a refresh renders just the visible lines,
    each from a cached strip. The cursor follows its row's key as rows come and go; ``enter`` (or
    a click on the cursor row) posts ``LiveTable.Selected``. ``filter`` keeps the rows where any
    cell contains the text (case-insensitive).
    """

    COLUMNS: ClassVar[tuple[str, ...]] = ()
    #: Columns of numbers, aligned to the right.
    RIGHT: ClassVar[frozenset[str]] = frozenset()
    COMPONENT_CLASSES: ClassVar[set[str]] = {"live-table--header", "live-table--cursor"}
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up,k", "cursor(-1)", "Up", show=False, id="table.up"),
        Binding("down,j", "cursor(1)", "Down", show=False, id="table.down"),
        Binding("pageup", "page(-1)", "Page up", show=False, id="table.page_up"),
        Binding("pagedown", "page(1)", "Page down", show=False, id="table.page_down"),
        Binding("home", "first", "First", show=False, id="table.first"),
        Binding("end", "last", "Last", show=False, id="table.last"),
        Binding("enter", "select", "Detail", id="table.select"),
    ]
    DEFAULT_CSS = """
    LiveTable {
        width: 1fr;
        background: $surface;
        color: $foreground;
        & > .live-table--header { text-style: bold; background: $panel; color: $foreground; }
        &:ansi > .live-table--header { background: ansi_bright_blue; color: ansi_default; }
        & > .live-table--cursor {
            background: $block-cursor-blurred-background;
            color: $block-cursor-blurred-foreground;
            text-style: $block-cursor-blurred-text-style;
        }
        &:focus > .live-table--cursor {
            background: $block-cursor-background;
            color: $block-cursor-foreground;
            text-style: $block-cursor-text-style;
        }
    }
    """
    GAP = 2

    class Selected(Message):
        """``enter`` on a row: ``key`` is the row's key."""

        def __init__(self, table: LiveTable, key: str) -> None:
            super().__init__()
            self.table = table
            self.key = key

        @property
        def control(self) -> LiveTable:
            return self.table

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._rows: dict[str, tuple[Cell, ...]] = {}
        self._order: list[str] = []  # every key, sorted
        self._shown: list[str] = []  # the keys that pass the filter, in order
        self._sort_keys: dict[str, Any] = {}
        self._widths: list[int] = [cell_len(c) for c in self.COLUMNS]
        self._strips: dict[tuple[int, bool], Strip] = {}
        self._filter = ""
        self._right = [name in self.RIGHT for name in self.COLUMNS]
        self.cursor = 0
        self._cursor_key: str | None = None

    # -- data ----------------------------------------------------------------------------------

    def sync(self, rows: dict[str, list[Cell]]) -> None:
        """Show ``rows`` (key -> cells), replacing what was shown."""
        new = {key: tuple(cells) for key, cells in rows.items()}
        if new.keys() != self._rows.keys():
            for key in new.keys() - self._sort_keys.keys():
                self._sort_keys[key] = natural_key(key)
            for key in self._sort_keys.keys() - new.keys():
                del self._sort_keys[key]
            self._order = sorted(new, key=self._sort_keys.__getitem__)
        self._rows = new
        self._apply()

    @property
    def filter(self) -> str:
        return self._filter

    @filter.setter
    def filter(self, text: str) -> None:
        self._filter = text
        self._apply()

    def _apply(self) -> None:
        needle = self._filter.casefold()
        if needle:
            self._shown = [k for k in self._order if needle in self._plain(k)]
        else:
            self._shown = self._order
        widths = [cell_len(c) for c in self.COLUMNS]
        for key in self._shown:
            for i, cell in enumerate(self._rows[key]):
                n = cell.cell_len if isinstance(cell, Text) else cell_len(cell)
                if n > widths[i]:
                    widths[i] = n
        self._widths = widths
        self._strips.clear()
        if self._cursor_key in self._rows and self._cursor_key in self._shown:
            self.cursor = self._shown.index(self._cursor_key)
        self.cursor = max(0, min(self.cursor, len(self._shown) - 1))
        self._cursor_key = self._shown[self.cursor] if self._shown else None
        width = sum(widths) + self.GAP * len(widths)
        self.virtual_size = Size(width, len(self._shown) + 1)
        self.refresh()

    def _plain(self, key: str) -> str:
        return " ".join(c.plain if isinstance(c, Text) else c for c in self._rows[key]).casefold()

    @property
    def row_count(self) -> int:
        """Rows shown (after the filter)."""
        return len(self._shown)

    @property
    def rows_needed(self) -> int:
        """Screen rows that show every row: the header, the rows, a horizontal scrollbar."""
        return len(self._shown) + 1 + self.scrollbar_size_horizontal

    @property
    def row_keys(self) -> list[str]:
        """The keys of the rows shown, top to bottom."""
        return list(self._shown)

    @property
    def cursor_key(self) -> str | None:
        return self._cursor_key

    def cell(self, key: str, column: str) -> str:
        """One cell's text, by row key and column name."""
        cell = self._rows[key][self.COLUMNS.index(column)]
        return cell.plain if isinstance(cell, Text) else cell

    # -- cursor --------------------------------------------------------------------------------

    def move_cursor(self, row: int) -> None:
        if not self._shown:
            return
        self.cursor = max(0, min(row, len(self._shown) - 1))
        self._cursor_key = self._shown[self.cursor]
        self._strips.clear()
        self._cursor_into_view()
        # Again once laid out: rows just added, or a table not sized yet, change what fits.
        self.call_after_refresh(self._cursor_into_view)
        self.refresh()

    def _cursor_into_view(self) -> None:
        visible = max(1, self.scrollable_content_region.height - 1)
        if self.cursor < self.scroll_y:
            self.scroll_to(y=self.cursor, animate=False, immediate=True)
        elif self.cursor >= self.scroll_y + visible:
            self.scroll_to(y=self.cursor - visible + 1, animate=False, immediate=True)

    def on_resize(self, event: events.Resize) -> None:
        """The cursor stays in view when the table's size changes (its first layout, or the
        terminal's)."""
        self.call_after_refresh(self._cursor_into_view)

    def action_cursor(self, step: int) -> None:
        self.move_cursor(self.cursor + step)

    def action_page(self, direction: int) -> None:
        page = max(1, self.scrollable_content_region.height - 2)
        self.move_cursor(self.cursor + direction * page)

    def action_first(self) -> None:
        self.move_cursor(0)

    def action_last(self) -> None:
        self.move_cursor(len(self._shown) - 1)

    def action_select(self) -> None:
        if self._cursor_key is not None:
            self.post_message(self.Selected(self, self._cursor_key))

    def on_click(self, event: events.Click) -> None:
        row = int(self.scroll_y) + event.y - 1
        if event.y < 1 or not 0 <= row < len(self._shown):
            return
        if row == self.cursor:
            self.action_select()
        else:
            self.move_cursor(row)

    # -- rendering -----------------------------------------------------------------------------

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._strips.clear()

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.scrollable_content_region.width
        base = self.rich_style
        if y == 0:
            strip = self._strip(-1, False)
        else:
            row = scroll_y + y - 1
            if row >= len(self._shown):
                return Strip.blank(width, base)
            strip = self._strip(row, row == self.cursor)
        return strip.crop_extend(scroll_x, scroll_x + width, base)

    def _strip(self, row: int, cursor: bool) -> Strip:
        cached = self._strips.get((row, cursor))
        if cached is not None:
            return cached
        base = self.rich_style
        if row < 0:
            cells: tuple[Cell, ...] = self.COLUMNS
            base = base + self.get_component_rich_style("live-table--header")
        else:
            cells = self._rows[self._shown[row]]
        console = self.app.console
        segments: list[Segment] = [Segment(" ", base)]
        gap = Segment(" " * self.GAP, base)
        for cell, width, right in zip(cells, self._widths, self._right, strict=False):
            if isinstance(cell, Text):
                parts = list(Segment.apply_style(cell.render(console), base))
                pad = Segment(" " * (width - cell.cell_len), base)
            else:
                parts = [Segment(cell, base)]
                pad = Segment(" " * (width - cell_len(cell)), base)
            segments.extend([pad, *parts] if right else [*parts, pad])
            segments.append(gap)
        if cursor:
            style = self.get_component_rich_style("live-table--cursor")
            segments = list(Segment.apply_style(segments, post_style=style))
        strip = Strip(segments)
        self._strips[(row, cursor)] = strip
        return strip


class WorkersTable(LiveTable):
    COLUMNS = (
        "WORKER",
        "STATE",
        "PROVISIONER",
        "URL",
        "IN FLIGHT",
        "SERVED",
        "P50 MS",
        "PREEMPT",
        "MEMORY",
    )
    RIGHT = frozenset({"IN FLIGHT", "SERVED", "P50 MS", "PREEMPT"})

    def show(self, snap: StatusSnapshot) -> None:
        workers = snap["workers"]
        memory: list[Mapping[str, Any]] = [w["gpu_memory"] or {} for w in workers]
        place = max((len(memory_place(mem)) for mem in memory), default=0)
        rows: dict[str, list[Cell]] = {}
        # Versions show once the deployment was updated (before, every worker is version 1).
        updated = snap["deployment"].get("update") is not None
        for w, mem in zip(workers, memory, strict=True):
            group = w.get("group")
            name = f"{w['id']} · {group}" if group else str(w["id"])
            rows[str(w["id"])] = [
                f"{name} v{w.get('version', '-')}" if updated else name,
                state_text(w["state"]),
                cell_text(w.get("provisioner")),
                cell_text(w.get("url")),
                cell_text(w.get("in_flight")),
                cell_text(w.get("served")),
                ms_text(w.get("latency_p50_ms")),
                cell_text(preemptions(w["engine"])),
                memory_cell(mem, place),
            ]
        self.sync(rows)


class JobsTable(LiveTable):
    COLUMNS = ("WORKER", "JOB", "STATE", "LEVEL", "GENERATED", "PREEMPTIONS", "SPEC", "AGE")
    RIGHT = frozenset({"LEVEL", "GENERATED", "PREEMPTIONS", "SPEC", "AGE"})

    def show(self, snap: StatusSnapshot) -> None:
        jobs = engine_jobs(snap["workers"])
        self.sync({f"{w}/{job.get('id')}": job_cells(w, job) for w, job in jobs})

    @staticmethod
    def worker_of(key: str) -> str:
        """The worker id of a row key (``worker/job``): a worker id may hold a ``/``, an
        engine's job id does not."""
        return key.rsplit("/", 1)[0]


class DeploymentLine(Static):
    def show(self, snap: StatusSnapshot, now: float | None = None) -> None:
        """The deployment and its traffic in one line; a part the snapshot lacks shows as '-'."""
        d, r = snap["deployment"], snap["requests"]
        now = time.time() if now is None else now
        self.update(
            Text.assemble(
                (str(d.get("name", "?")), "bold"),
                f"  {d.get('endpoint', '-')}  up {ago(d.get('started_at'), now)}",
                f"  version {d['version']}" if d.get("update") is not None else "",
                f"  provisioner {d.get('provisioner', '-')}  policy {d.get('policy', '-')}",
                f"  requests {r.get('total', 0)} ({cell_text(r.get('rate'))}/s),",
                f" in flight {r.get('in_flight', 0)}, queued {r.get('queued', 0)},",
                f" failed {r.get('failed', 0)}",
            )
        )


class AutoscalerPanel(Static):
    def show(self, snap: StatusSnapshot) -> None:
        a = snap["autoscaler"]
        if a is None:
            self.update("autoscaler: none yet (the daemon is starting)")
            return
        current = snap["ready_workers"]
        thresholds = a.get("thresholds") or {}
        limits = ", ".join(f"{k} {cell_text(v)}" for k, v in thresholds.items())
        reason = a["last_decision"]["reason"]
        policy, figure = a["policy"], scaling_input(a)
        self.update(
            Text.assemble(
                ("autoscaler ", "bold"),
                # "qlrm 0.01", not "qlrm: qlrm 0.01"; "request-rate: rate 0.50/s"
                figure if figure.startswith(policy) else f"{policy}: {figure}",
                f" ({limits})" if limits else "",
                f"  target {a['target']} / ready {current}",
                f"  (bounds {a['min_workers']}-{a['max_workers']})\n",
                f"last decision: {reason or '-'}",
                (f"\n⚠ {a['launch_blocked']}", "bold") if a["launch_blocked"] else "",
                *(group_text(g) for g in snap.get("groups") or []),
            )
        )


def group_text(group: GroupView) -> Text:
    """A worker group's line under the autoscaler: its own target, bounds, workers and queue."""
    runs = group["model"] or ", ".join(group["models"]) or "worker command"
    return Text.assemble(
        "\n",
        ("group ", "bold"),
        (group["name"], "bold"),
        f" ({runs}): {group['policy']} target {group['target']} / ready {group['ready']}",
        f"  (bounds {group['min_workers']}-{group['max_workers']})  queued {group['queued']}",
        f"  {group['launch_blocked'] or group['last_decision']['reason']}",
    )

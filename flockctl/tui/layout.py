"""How tables stacked on one screen share its height.

A fixed split wastes rows: with 3 workers and 200 jobs, half the screen would hold blank worker
rows while the jobs were cut. Each table takes the rows it needs, up to an equal share of what is
left; what it does not need goes to the tables that would otherwise be cut.
"""

from __future__ import annotations

from collections.abc import Sequence


def share_rows(available: int, needs: Sequence[int]) -> list[int]:
    """Heights for tables that need ``needs`` rows each (header included) in ``available`` rows.

    Water-filling: the tables needing least are served first, each in full while its need fits
    an equal share of the rows still free; the rest split what remains equally (the first ones
    get a row more when it does not divide). Rows nobody needs go to the last table, so the
    screen has no gap below it. The heights add up to ``available``.
    """
    heights = [0] * len(needs)
    left = max(0, available)
    pending = sorted(range(len(needs)), key=lambda i: needs[i])
    while pending and needs[pending[0]] <= left // len(pending):
        first = pending.pop(0)
        heights[first] = max(0, needs[first])
        left -= heights[first]
    if pending:
        share, extra = divmod(left, len(pending))
        for rank, i in enumerate(sorted(pending)):
            heights[i] = share + (rank < extra)
    elif heights:
        heights[-1] += left
    return heights

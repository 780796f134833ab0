"""The status snapshot as a rich renderable.

Every state has a glyph and a word, so nothing is shown by colour alone.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from flockctl.schema import (
    AutoscalerView,
    GroupView,
    JobSummary,
    StatusSnapshot,
    UpdateView,
    WorkerView,
)

STATE_STYLE: dict[str, tuple[str, str]] = {
    "READY": ("●", "green"),
    "STARTING": ("◐", "yellow"),
    "PROVISIONING": ("◌", "yellow"),
    "PENDING": ("○", "dim"),
    "NOT_READY": ("▲", "red"),
    "DRAINING": ("◑", "magenta"),
    "TERMINATED": ("■", "dim"),
    "FAILED": ("✗", "bold red"),
    "PREEMPTED": ("↯", "bold magenta"),
}
#: An engine job's state, as the engine's ``/stats`` names it.
JOB_STATE_STYLE: dict[str, tuple[str, str]] = {
    "running": ("▶", "green"),
    "waiting": ("○", "yellow"),
    "preempted": ("◐", "magenta"),
    "swapped": ("◌", "cyan"),
    "finished": ("✓", "dim"),
}
#: Job rows the human view prints; ``status --json`` carries every job the daemon holds.
MAX_JOB_ROWS = 50
#: The width of a console nothing may cut: tables do not expand and text is not padded, so each
#: line is only as long as what it holds.
UNBOUNDED = 1_000_000


def status_console(wide: bool = False, file: TextIO | None = None) -> Console:
    """The console ``flockctl status`` prints on.

    On a terminal the view fits its width, or ``COLUMNS`` where that is set, as rich does. Piped
    (a script, ``less``, a log) or with ``--wide`` every line is as long as it needs: whole URLs
    and reasons, one line per table row, where rich would cut and wrap at 80 columns.
    """
    stream = file if file is not None else sys.stdout
    isatty = getattr(stream, "isatty", None)
    fitted = bool(isatty and isatty()) or os.environ.get("COLUMNS", "").strip().isdigit()
    if fitted and not wide:
        return Console(file=file)
    return Console(file=file, width=UNBOUNDED)


def scaling_input(autoscaler: AutoscalerView) -> str:
    """The figure the autoscaler scales on: the request rate (request-rate) or the queue-length
    running mean (qlrm; ``-`` before the first sample)."""
    qps = autoscaler.get("qps")
    if qps is not None:
        return f"rate {qps:.2f}/s"
    qlrm = autoscaler.get("qlrm")
    return f"qlrm {'-' if qlrm is None else f'{qlrm:.2f}'}"


def scaling_text(autoscaler: AutoscalerView) -> str:
    """The scaling figure and the last decision's reason, each said once.

    A policy's reason opens with the very figure it decided on (``qlrm 0.10 < autoscale_down
    4 ...``, ``0.10 req/s over 60s wants ...``); the figure is shown apart only when the reason
    does not state it (an operator's change, a bound, the initial target).
    """
    reason = autoscaler["last_decision"]["reason"] or ""
    qps, qlrm = autoscaler.get("qps"), autoscaler.get("qlrm")
    if qps is not None:
        stated = f"{qps:.2f} req/s"
    elif qlrm is not None:
        stated = f"qlrm {qlrm:.2f}"
    else:
        stated = None
    if stated is not None and stated in reason:
        return reason
    return f"{scaling_input(autoscaler)}  {reason}".rstrip()


def ago(ts: float | None, now: float) -> str:
    if not ts:
        return "-"
    s = max(0, int(now - ts))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def state_text(state: str) -> Text:
    glyph, style = STATE_STYLE.get(state, ("?", ""))
    return Text(f"{glyph} {state}", style=style)


def job_state_text(state: Any) -> Text:
    word = str(state) if state is not None else "unknown"
    glyph, style = JOB_STATE_STYLE.get(word, ("?", ""))
    return Text(f"{glyph} {word}", style=style)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(value: Any) -> str:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else "-"


def span(seconds: Any) -> str:
    """A duration: tenths of a second while short, then like ``ago``."""
    if not _number(seconds):
        return "-"
    if seconds < 10:
        return f"{max(seconds, 0):.1f}s"
    return ago(1.0, 1.0 + seconds)


def memory_pair(used: Any, total: Any) -> str:
    """``used/total unit`` in the unit that suits the larger, ``-`` for an unknown side."""
    known = [v for v in (used, total) if _number(v)]
    if not known:
        return "-"
    unit, scale = "B", 1
    for name in ("KiB", "MiB", "GiB", "TiB"):
        if max(known) < scale * 1024:
            break
        unit, scale = name, scale * 1024
    digits = 0 if unit == "B" else 1
    used_text, total_text = (
        f"{v / scale:.{digits}f}" if _number(v) else "-" for v in (used, total)
    )
    return f"{used_text}/{total_text} {unit}"


def natural_key(value: Any) -> tuple[Any, ...]:
    """Sort key that puts ``job-2`` before ``job-10`` and ``w2`` before ``w10``."""
    parts = re.split(r"(\d+)", str(value))
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def spec_text(spec: Any) -> str:
    """Speculative decoding at a glance: tokens per verification step (mean accepted length,
    bonus token included), 'off' where the engine or job stopped speculating, '-' without it."""
    if not isinstance(spec, dict):
        return "-"
    if spec.get("active") is False or spec.get("enabled") is False:
        return "off"
    length = spec.get("mean_accepted_length")
    return f"{length:.2f}" if _number(length) else "on"


def _table(*columns: tuple[str, str]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col, justify in columns:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    return table


def relayed(worker: WorkerView) -> Mapping[str, Any]:
    """The worker's engine stats as relayed from another process: any key may be absent, and
    an empty mapping for a worker that is not flockctl's engine."""
    return worker["engine"] or {}


def engines_table(workers: list[WorkerView]) -> Table:
    """One row per engine worker: jobs queued per MLFQ level (highest priority first), job
    counts, and device memory; narrow enough for an 80-column terminal."""
    table = _table(
        ("WORKER", "left"),
        ("MODEL", "left"),
        ("QUEUES", "left"),
        ("RUN", "right"),
        ("WAIT", "right"),
        ("SWAP", "right"),
        ("PREEMPT", "right"),
        ("SPEC", "right"),
        ("MEMORY", "right"),
    )
    for worker in workers:
        stats = relayed(worker)
        queues = stats.get("queue_lengths")
        levels = " ".join(_count(n) for n in queues) if isinstance(queues, list) else "-"
        mem: Mapping[str, Any] = worker["gpu_memory"] or {}
        preempted = stats.get("preemptions_total")
        total = (
            sum(v for v in preempted.values() if isinstance(v, int))
            if isinstance(preempted, dict)
            else None
        )
        about = [stats.get("model"), stats.get("scheduler"), mem.get("device")]
        table.add_row(
            worker["id"],
            " ".join(str(part) for part in about if part) or "-",
            levels,
            _count(stats.get("running")),
            _count(stats.get("waiting")),
            _count(stats.get("swapped")),
            _count(total),
            spec_text(stats.get("speculation")),
            memory_pair(mem.get("used"), mem.get("total")),
        )
    return table


def engine_jobs(workers: list[WorkerView]) -> list[tuple[str, JobSummary]]:
    """Every job of the engine workers among ``workers``, with its worker's id."""
    return [
        (str(w["id"]), job)
        for w in workers
        if isinstance(engine := w.get("engine"), dict)
        for job in (engine.get("jobs") or [])
        if isinstance(job, dict)
    ]


def job_cells(worker_id: str, job: JobSummary) -> list[Any]:
    """A job's row: worker, job, state (glyph and word), level, generated tokens, preemptions,
    speculation, age; the status view and the dashboard both show it so."""
    return [
        worker_id,
        str(job.get("id", "-")),
        job_state_text(job.get("state")),
        _count(job.get("level")),
        _count(job.get("generated_tokens")),
        _count(job.get("preemptions")),
        spec_text(job.get("speculation")),
        span(job.get("age")),
    ]


def jobs_table(workers: list[WorkerView]) -> tuple[Table, int]:
    """Every engine job, by worker id then job id; returns the table and the rows left out."""
    rows = engine_jobs(workers)
    rows.sort(key=lambda r: (natural_key(r[0]), natural_key(r[1].get("id"))))
    table = _table(
        ("WORKER", "left"),
        ("JOB", "left"),
        ("STATE", "left"),
        ("LEVEL", "right"),
        ("GENERATED", "right"),
        ("PREEMPTIONS", "right"),
        ("SPEC", "right"),
        ("AGE", "right"),
    )
    for worker_id, job in rows[:MAX_JOB_ROWS]:
        table.add_row(*job_cells(worker_id, job))
    omitted = sum(
        n for w in workers if isinstance(n := relayed(w).get("jobs_omitted"), int) and n > 0
    )
    return table, max(0, len(rows) - MAX_JOB_ROWS) + omitted


def engine_view(workers: list[WorkerView], now: float) -> list[Any]:
    """The engine part of the status view: a row per engine worker, then their jobs."""
    engines = sorted(
        (w for w in workers if isinstance(w.get("engine"), dict)),
        key=lambda w: natural_key(w["id"]),
    )
    if not engines:
        return []
    parts: list[Any] = [Text(""), engines_table(engines)]
    for w in engines:
        if w.get("engine_stale"):
            parts.append(
                Text(
                    f"⚠ {w['id']}: engine stats are stale (last pulled"
                    f" {ago(w.get('engine_at'), now)} ago; the pulls since failed)",
                    style="yellow",
                )
            )
    parts.append(Text(""))
    table, hidden = jobs_table(engines)
    parts.append(table if table.row_count else Text("no jobs", style="dim"))
    if hidden:
        parts.append(Text(f"… {hidden} more jobs not shown", style="dim"))
    return parts


def capacity_words(flag: int | None) -> str:
    """What ``--worker-capacity`` means for the balancer, in words."""
    if flag is None:
        return "capacity from each worker (else no limit)"
    return f"{flag} requests per worker"


def capacity_cell(worker: WorkerView) -> str:
    """A worker's capacity and where it came from (``264 worker``, ``30 flag``, ``-``)."""
    cap = worker.get("capacity")
    if cap is None:
        return "-"
    source = worker.get("capacity_source")
    return f"{cap} {source}" if source else str(cap)


def group_line(group: GroupView) -> Text:
    """One worker group in a line: what it runs, its autoscaler, its workers and its queue."""
    runs = group["model"] or ", ".join(group["models"]) or "worker command"
    return Text.assemble(
        ("group ", "bold"),
        (group["name"], "bold"),
        f"  {runs}  {group['policy']} target {group['target']}",
        f" (min {group['min_workers']}, max {group['max_workers']})",
        f"  {group['ready']}/{group['live']} ready  {group['in_flight']} in flight",
        f"  {group['queued']} queued  version {group['version']}  ",
        (group["launch_blocked"] or group["last_decision"]["reason"], "dim"),
    )


def update_line(update: UpdateView) -> Text:
    """The running update's progress, or how the last one ended (a rollback says why)."""
    p = update["progress"]
    moving = f"update {update['id']}: version {update['from_version']} -> {update['to_version']}"
    if update["state"] == "running":
        return Text.assemble(
            (moving, "bold"),
            f" ({update['mode']})  new {p['new_ready']}/{p['target']} ready",
            f"  old {p['old_live']} serving, {p['old_draining']} draining",
        )
    if update["state"] == "succeeded":
        return Text(f"✓ {moving}: done", style="green")
    ended = update["state"].replace("_", " ")  # rolled back, interrupted (by a restart)
    return Text(f"✗ {moving}: {ended}: {update['reason']}", style="bold red")


def status_view(snap: StatusSnapshot) -> Group:
    now = snap["generated_at"] or time.time()
    dep = snap["deployment"]
    auto = snap["autoscaler"]
    req = snap["requests"]
    head = Text.assemble(
        (dep["name"], "bold"),
        "  ",
        (dep["endpoint"], "cyan"),
        f"  version {dep.get('version', '-')}",
        f"  provisioner {dep['provisioner']}  policy {dep['policy']}",
        f"  up {ago(dep['started_at'], now)}",
    )
    scale = (
        Text.assemble(
            ("autoscaler ", "bold"),
            f"{auto['policy']}  target {auto['target']}",
            f" (min {auto['min_workers']}, max {auto['max_workers']})",
            f"  {scaling_text(auto)}",
        )
        if auto is not None
        else Text.assemble(("autoscaler ", "bold"), "none yet (the daemon is starting)")
    )
    traffic = Text(
        f"requests {req['total']} total  {req['in_flight']} in flight  {req['queued']} queued"
        f"  {req['failed']} failed  {req['retried']} retried  {req['rate']:.1f}/s"
    )
    grouped = any(w.get("group") for w in snap["workers"])
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col, justify in (
        ("ID", "left"),
        *((("GROUP", "left"),) if grouped else ()),
        ("VER", "right"),
        ("STATE", "left"),
        ("PID", "right"),
        ("URL", "left"),
        ("IN FLIGHT", "right"),
        ("CAPACITY", "right"),
        ("SERVED", "right"),
        ("P50 MS", "right"),
        ("FAILS", "right"),
        ("AGE", "right"),
        ("REASON", "left"),
    ):
        table.add_column(col, justify=justify)
    for w in snap["workers"]:
        p50 = w["latency_p50_ms"]
        table.add_row(
            w["id"],
            *((w.get("group") or "-",) if grouped else ()),
            str(w.get("version", "-")),
            state_text(w["state"]),
            str(w["pid"] or "-"),
            w["url"] or "-",
            str(w["in_flight"]),
            capacity_cell(w),
            str(w["served"]),
            "-" if p50 is None else f"{p50:.1f}",
            str(w["failures"]),
            ago(w["created_at"], now),
            Text(w["reason"] or "", style="dim"),
        )
    parts: list[Any] = [head, scale, *map(group_line, snap.get("groups") or []), traffic]
    update = dep.get("update")
    if update is not None and (update["state"] != "succeeded" or now - update["started_at"] < 600):
        parts.append(update_line(update))
    if auto is not None and auto["launch_blocked"]:
        parts.append(Text(f"✗ {auto['launch_blocked']}", style="bold red"))
    parts.append(table if snap["workers"] else Text("no workers", style="dim"))
    parts.extend(engine_view(snap["workers"], now))
    return Group(*parts)


def render_plan(plan: dict[str, Any]) -> str:
    """``flockctl up --dry-run``: the resolved plan, one labelled line per part."""
    workers = plan["workers"]
    scaler = plan["autoscaler"]
    probe = plan["probe"]
    balancer = plan["balancer"]
    worker = plan["worker"]
    settings = ", ".join(f"{k} {v:g}" for k, v in scaler["thresholds"].items())
    method = "POST" if probe.get("post_data") is not None else "GET"
    rows = [
        ("endpoint", plan["endpoint"]),
        ("provisioner", plan["provisioner"]),
        ("workers", f"start {workers['initial']}, min {workers['min']}, max {workers['max']}"),
        ("autoscaler", scaler["policy"] + (f": {settings}" if settings else "")),
        *(
            (
                f"group {g['name']}",
                f"{g['model'] or g['command']}: {g['autoscaler']}, start {g['initial']},"
                f" min {g['min']}, max {g['max']}",
            )
            for g in plan.get("groups", [])
        ),
        (
            "probe",
            f"{method} {probe['path']} every {probe['interval_seconds']:g}s, timeout"
            f" {probe['timeout_seconds']:g}s, READY within {probe['initial_delay_seconds']:g}s,"
            f" NOT_READY after {probe['failure_threshold']} failures",
        ),
        (
            "balancer",
            f"{balancer['policy']}, {capacity_words(balancer['worker_capacity'])}, up to"
            f" {balancer['max_attempts']} attempts, queue {balancer['max_queue']} for"
            f" {balancer['queue_timeout']:g}s",
        ),
    ]
    if plan["provisioner"] == "skypilot":
        rows.append(("cluster", f"{worker['first_cluster']}, ... (port {worker['port']})"))
        rows += [
            (launch["id"], f"{launch['cluster']}, {'spot' if launch['spot'] else 'on-demand'}")
            for launch in worker["launches"]
        ]
        rows += [("resources", option) for option in worker["resources"]]
        if worker["use_spot"]:
            fallback = f"{worker['base_ondemand_fallback_replicas']} on-demand kept"
            if worker["dynamic_ondemand_fallback"]:
                fallback += ", more while spot workers are not READY"
            rows.append(("spot", f"yes; {fallback}"))
        if worker.get("run"):
            rows.append(("run", " ".join(worker["run"].split())[:200]))
    elif plan["provisioner"] == "local":
        rows.append(("command", worker["command"]))
    else:
        rows += [("endpoint", url) for url in worker["endpoints"]]
    width = max(len(label) for label, _ in rows)
    lines = [f'deployment "{plan["name"]}" (dry run: nothing was started)']
    lines += [f"  {label.ljust(width)}  {value}" for label, value in rows]
    return "\n".join(lines)

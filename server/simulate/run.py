"""What ``flockctl simulate`` does once its flags are read: build the deployment config as ``up``
would, the service model, the trace, run one simulation or a sweep's grid, and print.

Errors are ``SimulateError`` with a message naming the flag, file, line or field; the command
turns them into one line on stderr and exit code 2.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from flockctl.console import emit_json
from flockctl.server.config import ConfigError, DeploymentConfig
from flockctl.server.simulate import report
from flockctl.server.simulate.service import (
    ServiceModel,
    ServiceModelError,
    load_service_model,
)
from flockctl.server.simulate.sim import simulate
from flockctl.server.simulate.trace import Trace, TraceError, describe, load, synthetic
from flockctl.server.spec_file import resolve

#: Service-model flags by their flag name (underscored) -> ``ServiceModel`` field.
SERVICE_FLAGS = {
    "prefill_tokens_per_s": "prefill_tokens_per_s",
    "decode_tokens_per_s": "decode_tokens_per_s",
    "max_batch_size": "max_batch_size",
    "batching": "batching",
    "cold_start": "cold_start_s",
    "cost_per_hour": "cost_per_hour",
    "spot_price": "spot_price_per_hour",
    "preemption_rate": "preemptions_per_hour",
}


class SimulateError(ValueError):
    """A flag, trace or file that cannot be used; the message says which and why."""


@dataclass
class Request:
    """Everything the command was given."""

    trace: Path | None
    synthetic: str | None
    spec: Path | None
    #: The deployment flags given (as ``up`` takes them), None for those left out.
    flags: dict[str, Any]
    service_file: Path | None
    #: The service-model flags given, by flag name (``SERVICE_FLAGS``).
    service: dict[str, Any]
    prompt_tokens: int
    output_tokens: int
    slo_ttft: float | None
    sweep: list[str] = field(default_factory=list)
    seed: int = 0
    #: Whether the workers there at the start are serving already (False: they launch then).
    warm: bool = True
    as_json: bool = False
    plot: bool = False


def parse_batching(text: str) -> tuple[tuple[int, float], ...]:
    """``1:1,2:0.9,8:0.5`` -> ((1, 1.0), (2, 0.9), (8, 0.5))."""
    try:
        pairs = [p.split(":") for p in text.split(",") if p.strip()]
        return tuple((int(b), float(f)) for b, f in pairs)
    except ValueError:
        raise SimulateError(
            f"--batching {text!r}: give BATCH:FACTOR pairs, e.g. 1:1,2:0.9,4:0.7,8:0.475"
        ) from None


def service_model(path: Path | None, given: dict[str, Any]) -> ServiceModel:
    try:
        base = load_service_model(path) if path is not None else ServiceModel()
        changes = {SERVICE_FLAGS[k]: v for k, v in given.items() if v is not None}
        if isinstance(changes.get("batching"), str):
            changes["batching"] = parse_batching(changes["batching"])
        return base.replace(**changes)
    except ServiceModelError as exc:
        raise SimulateError(f"service model: {exc}") from None


def deployment_config(spec: Path | None, flags: dict[str, Any]) -> DeploymentConfig:
    names = {k: f"--{k.replace('_', '-')}" for k in flags}
    try:
        return resolve(spec, flags, names)
    except ConfigError as exc:
        raise SimulateError("; ".join(exc.problems)) from None


def read_trace(req: Request) -> Trace:
    if (req.trace is None) == (req.synthetic is None):
        raise SimulateError(
            "give a trace file or --synthetic PROCESS (e.g. --synthetic poisson:5:3600), not both"
            if req.trace is not None
            else "give a trace file or --synthetic PROCESS (e.g. --synthetic poisson:5:3600)"
        )
    try:
        if req.synthetic is not None:
            return synthetic(req.synthetic, req.seed, req.prompt_tokens, req.output_tokens)
        assert req.trace is not None
        return load(req.trace)
    except TraceError as exc:
        raise SimulateError(str(exc)) from None


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def sweep_grid(sweeps: list[str], known: set[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """``["autoscale_up=4,7", "policy=a,b"]`` -> the names and every combination of values."""
    names: list[str] = []
    values: list[list[Any]] = []
    for item in sweeps:
        name, sep, rest = item.partition("=")
        key = name.strip().lstrip("-").replace("-", "_")
        if not sep or not rest.strip():
            raise SimulateError(f"--sweep {item!r}: give NAME=V1,V2,... e.g. autoscale-up=4,7,10")
        if key not in known:
            raise SimulateError(
                f"--sweep {item!r}: {name!r} is not a flag simulate sweeps over; known:"
                f" {', '.join(sorted(k.replace('_', '-') for k in known))}"
            )
        if key in names:
            raise SimulateError(f"--sweep {item!r}: {name} is swept twice")
        names.append(key)
        values.append([_value(v.strip()) for v in rest.split(",") if v.strip()])
    return names, [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)]


def execute(req: Request, out: Console, say: Callable[[str], None]) -> None:
    """Run what ``req`` asks for and print it (JSON on stdout with ``as_json``)."""
    trace = read_trace(req)
    say(describe(trace))
    if not req.sweep:
        cfg = deployment_config(req.spec, req.flags)
        model = service_model(req.service_file, req.service)
        raw = simulate(trace, cfg, model, req.seed, warm=req.warm)
        summary = report.summarize(raw, req.slo_ttft)
        if req.as_json:
            emit_json(summary)
        else:
            report.render(summary, out)
        if req.plot:
            report.plot(raw, out if not req.as_json else Console(stderr=True))
        return
    known = set(req.flags) | set(SERVICE_FLAGS)
    names, grid = sweep_grid(req.sweep, known)
    rows: list[dict[str, Any]] = []
    for params in grid:
        flags = {**req.flags, **{k: v for k, v in params.items() if k in req.flags}}
        service = {**req.service, **{k: v for k, v in params.items() if k in SERVICE_FLAGS}}
        cfg = deployment_config(req.spec, flags)
        model = service_model(req.service_file, service)
        raw = simulate(trace, cfg, model, req.seed, warm=req.warm)
        rows.append({"params": params, "result": report.summarize(raw, req.slo_ttft)})
        say(f"swept {', '.join(f'{k}={v}' for k, v in params.items())}")
    front = report.pareto([(r["result"]["cost"], r["result"]["ttft_p99_s"]) for r in rows])
    for row, on in zip(rows, front, strict=True):
        row["pareto"] = on
    if req.as_json:
        emit_json({"runs": rows})
    else:
        report.sweep_table(rows, names, out)

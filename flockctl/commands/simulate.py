"""``flockctl simulate``: replay a traffic trace through the daemon's autoscaler and balancer in
simulated time, to see cost against latency before paying for workers.

It takes ``up``'s autoscaling and balancing flags (and a deployment YAML with ``--spec``), so a
setting found here is the one to deploy. The daemon's classes are imported only when the command
runs (``flockctl.server.simulate``): importing the CLI stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from flockctl.commands.common import JsonOpt
from flockctl.commands.config_flags import takes_config_flags
from flockctl.console import fail, say
from flockctl.exitcodes import ExitCode

TRACE, SERVICE, OUTPUT = "Trace", "Service model of a worker", "Output"


def simulated_fields() -> tuple[str, ...]:
    """The config fields simulate takes as flags: how the autoscaler and the balancer decide."""
    from flockctl.server.config import GROUP_SCALING

    balancer = ("policy", "worker_capacity", "queue_timeout", "max_queue", "max_attempts")
    return (*GROUP_SCALING, *balancer, "drain_timeout")


def _opt(help: str, panel: str = SERVICE) -> typer.models.OptionInfo:
    return typer.Option(help=help, rich_help_panel=panel, show_default=False)


@takes_config_flags(simulated_fields)
def simulate(
    trace: Annotated[
        Path | None,
        typer.Argument(
            help="Trace file: Azure LLM inference CSV (TIMESTAMP,ContextTokens,GeneratedTokens),"
            " BurstGPT CSV, flockctl's requests.jsonl, or JSON lines"
            ' {"t": seconds, "prompt_tokens": n, "output_tokens": n}.',
            show_default=False,
        ),
    ] = None,
    synthetic: Annotated[
        str | None,
        _opt(
            "A synthetic trace instead of a file: poisson:RATE:SECONDS, gamma:RATE:CV:SECONDS"
            " (bursty when CV > 1) or diurnal:PEAK:TROUGH:HOURS (rates in requests/s).",
            TRACE,
        ),
    ] = None,
    prompt_tokens: Annotated[
        int, typer.Option(help="Mean prompt tokens of a synthetic trace.", rich_help_panel=TRACE)
    ] = 256,
    output_tokens: Annotated[
        int, typer.Option(help="Mean output tokens of a synthetic trace.", rich_help_panel=TRACE)
    ] = 128,
    seed: Annotated[
        int,
        typer.Option(help="Seed of synthetic traces and random choices.", rich_help_panel=TRACE),
    ] = 0,
    start_cold: Annotated[
        bool,
        typer.Option(
            "--start-cold",
            help="The workers there at the start launch when the trace begins (a cold start)"
            " instead of serving already.",
            rich_help_panel=TRACE,
        ),
    ] = False,
    spec: Annotated[
        Path | None,
        _opt("Deployment YAML, as flockctl up takes it; the flags below override it.", "Workers"),
    ] = None,
    flags: dict[str, Any] | None = None,
    service_model: Annotated[
        Path | None,
        _opt("Service model file (JSON) from flockctl engine profile; flags below override it."),
    ] = None,
    prefill_tokens_per_s: Annotated[
        float | None, _opt("Prompt tokens a worker prefills per second [default: 2000].")
    ] = None,
    decode_tokens_per_s: Annotated[
        float | None, _opt("Tokens per second one job decodes at batch 1 [default: 50].")
    ] = None,
    max_batch_size: Annotated[
        int | None, _opt("Jobs a worker decodes at once; more wait on it [default: 8].")
    ] = None,
    batching: Annotated[
        str | None,
        _opt(
            "Per-job decode speed as the batch grows, BATCH:FACTOR pairs [default:"
            " 1:1,2:0.9,4:0.7,8:0.475, measured on flockctl's engine]."
        ),
    ] = None,
    cold_start: Annotated[
        float | None, _opt("Seconds from launching a worker to READY [default: 60].")
    ] = None,
    cost_per_hour: Annotated[
        float | None, _opt("Price of one on-demand worker per hour [default: 1].")
    ] = None,
    spot_price: Annotated[
        float | None, _opt("Run workers on spot machines at this price per hour.")
    ] = None,
    preemption_rate: Annotated[
        float | None, _opt("Preemptions per spot worker per hour [default: 0].")
    ] = None,
    slo_ttft: Annotated[
        float | None,
        _opt("Report the share of requests whose time to first token is within SECONDS.", OUTPUT),
    ] = None,
    sweep: Annotated[
        list[str] | None,
        _opt(
            "NAME=V1,V2,...: run every combination of the values (repeatable; NAME is one of"
            " the flags above, e.g. autoscale-up=4,7,10) and print a table with the Pareto"
            " front of cost vs p99 TTFT.",
            OUTPUT,
        ),
    ] = None,
    as_json: JsonOpt = False,
    plot: Annotated[
        bool,
        typer.Option(
            "--plot", help="Plot load, workers and p99 TTFT over time.", rich_help_panel=OUTPUT
        ),
    ] = False,
) -> None:
    """Replay a traffic trace through the autoscaler and balancer in simulated time.

    Examples:

      flockctl simulate --synthetic gamma:4:3:3600 --max-workers 8 --slo-ttft 2

      flockctl simulate requests.jsonl --autoscaler request-rate --target-qps-per-replica 2

      flockctl simulate trace.csv --service-model engine.json --sweep autoscale-up=2,4,8
    """
    from flockctl.server.simulate.run import Request, SimulateError, execute

    service = {
        "prefill_tokens_per_s": prefill_tokens_per_s,
        "decode_tokens_per_s": decode_tokens_per_s,
        "max_batch_size": max_batch_size,
        "batching": batching,
        "cold_start": cold_start,
        "cost_per_hour": cost_per_hour,
        "spot_price": spot_price,
        "preemption_rate": preemption_rate,
    }
    req = Request(
        trace=trace,
        synthetic=synthetic,
        spec=spec,
        flags=flags or {},
        service_file=service_model,
        service=service,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        slo_ttft=slo_ttft,
        sweep=sweep or [],
        seed=seed,
        warm=not start_cold,
        as_json=as_json,
        plot=plot,
    )
    from rich.console import Console

    try:
        execute(req, Console(), say)
    except SimulateError as exc:
        fail(str(exc), ExitCode.USAGE)

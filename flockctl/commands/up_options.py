"""The options of ``flockctl up``, one alias each, grouped in ``--help`` by the panel they set.

Every option defaults to None (the ``[default: ...]`` in its help is the config's) so that
``flockctl.server.spec_file.resolve`` can tell a flag given from one left out and let a SPEC file's
value stand; ``up`` passes on only the flags that were given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

W, A, B, P, D = "Workers", "Autoscaling", "Balancing", "Readiness probe", "Daemon"

SpecOpt = Annotated[
    Path | None,
    typer.Argument(
        help="Deployment YAML: a SkyPilot task (each worker is a cluster launched from"
        " it), SkyServe's `service:` section (readiness_probe, replicas, replica_policy,"
        " load_balancing_policy, ports) and/or a `flockctl:` section. Flags override it.",
        show_default=False,
    ),
]

DeploymentNameOpt = Annotated[
    str | None,
    typer.Option(
        "--name",
        "-n",
        help="Deployment name [default: default].",
        envvar="FLOCKCTL_NAME",
        show_default=False,
    ),
]

HostOpt = Annotated[
    str | None,
    typer.Option(help="Bind address [default: 127.0.0.1].", rich_help_panel=D, show_default=False),
]

PortOpt = Annotated[
    int | None,
    typer.Option(help="Balancer port [default: 3000].", rich_help_panel=D, show_default=False),
]

ProvisionerOpt = Annotated[
    str | None,
    typer.Option(
        help="local (worker processes here), skypilot (a cluster per worker, from the SPEC's"
        " SkyPilot task) or static (the --endpoint servers) [default: skypilot when the SPEC"
        " has resources or run, static with --endpoint, else local].",
        rich_help_panel=W,
        show_default=False,
    ),
]

ModelOpt = Annotated[
    str | None,
    typer.Option(
        help="Model each local worker serves with flockctl's engine: a Hugging Face hub id,"
        " a local path, or 'demo' (built locally, no download) [default: demo when neither"
        " --worker-command nor --endpoint is given].",
        rich_help_panel=W,
        show_default=False,
    ),
]

EngineArgsOpt = Annotated[
    str | None,
    typer.Option(
        help="Extra flags for `flockctl engine serve`, as one string split like a shell"
        " would, e.g. --engine-args '--scheduler fcfs --device cpu'.",
        rich_help_panel=W,
        show_default=False,
    ),
]

DraftModelOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="A draft model each engine worker speculates with (SpecInfer token trees);"
        " repeat for several. It must share --model's tokenizer; with --model demo,"
        " 'demo' is the demo's draft.",
        rich_help_panel=W,
        show_default=False,
    ),
]

WorkerCommandOpt = Annotated[
    str | None,
    typer.Option(
        help="Command that starts one worker instead of flockctl's engine (any OpenAI"
        " server); {port} is its port, {worker_id} its id, also in its environment as"
        " $PORT and $FLOCKCTL_WORKER_ID. E.g. 'vllm serve MODEL --port {port}'. Not with"
        " --model.",
        rich_help_panel=W,
    ),
]

EndpointOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="URL of a server that already runs (repeatable): static workers.",
        rich_help_panel=W,
    ),
]

MinWorkersOpt = Annotated[
    int | None, typer.Option(help="[default: 1]", rich_help_panel=A, show_default=False)
]

MaxWorkersOpt = Annotated[
    int | None, typer.Option(help="[default: 2]", rich_help_panel=A, show_default=False)
]

ReplicasOpt = Annotated[
    int | None,
    typer.Option(help="Fixed number of workers (sets --autoscaler fixed).", rich_help_panel=A),
]

AutoscalerOpt = Annotated[
    str | None,
    typer.Option(
        help="qlrm (queue-length running mean), request-rate (SkyServe's"
        " target_qps_per_replica) or fixed [default: qlrm].",
        rich_help_panel=A,
        show_default=False,
    ),
]

TargetQpsPerReplicaOpt = Annotated[
    float | None,
    typer.Option(
        help="Requests per second one worker should take (sets --autoscaler request-rate).",
        rich_help_panel=A,
        show_default=False,
    ),
]

AutoscaleUpOpt = Annotated[
    float | None,
    typer.Option(
        help="Scale up when the queue-length running mean per worker passes this [default: 7].",
        rich_help_panel=A,
        show_default=False,
    ),
]

AutoscaleDownOpt = Annotated[
    float | None,
    typer.Option(
        help="Scale down when it falls below this [default: 4].",
        rich_help_panel=A,
        show_default=False,
    ),
]

QueueTrackingWindowOpt = Annotated[
    float | None,
    typer.Option(
        help="Seconds the running mean covers [default: 600].",
        rich_help_panel=A,
        show_default=False,
    ),
]

UpscaleDelayOpt = Annotated[
    float | None,
    typer.Option(
        help="Seconds above autoscale-up before scaling up [default: 30].",
        rich_help_panel=A,
        show_default=False,
    ),
]

DownscaleDelayOpt = Annotated[
    float | None,
    typer.Option(
        help="Seconds below autoscale-down before scaling down [default: 120].",
        rich_help_panel=A,
        show_default=False,
    ),
]

PolicyOpt = Annotated[
    str | None,
    typer.Option(
        help="least-connection, round-robin, power-of-two, latency (fastest expected answer)"
        " or prefix (the worker that saw the prompt's prefix; sessions stick)"
        " [default: least-connection].",
        rich_help_panel=B,
        show_default=False,
    ),
]

PrefixMinMatchOpt = Annotated[
    float | None,
    typer.Option(
        help="--policy prefix: shortest prefix match, as a share of the prompt, that routes by"
        " prefix [default: 0.5].",
        rich_help_panel=B,
        show_default=False,
    ),
]

PrefixBalanceOpt = Annotated[
    float | None,
    typer.Option(
        help="--policy prefix: route by prefix only while that worker's load is within this"
        " factor of the least loaded one's [default: 2.0].",
        rich_help_panel=B,
        show_default=False,
    ),
]

PrefixTreeCharsOpt = Annotated[
    int | None,
    typer.Option(
        help="--policy prefix: characters of prompt text remembered per worker, least recently"
        " used forgotten first [default: 1000000].",
        rich_help_panel=B,
        show_default=False,
    ),
]

WorkerCapacityOpt = Annotated[
    int | None,
    typer.Option(
        help="Concurrent requests per worker; more wait in the queue [default: what the worker"
        " reports (flockctl's engine: its batch plus waiting room), else no limit].",
        rich_help_panel=B,
        show_default=False,
    ),
]

QueueTimeoutOpt = Annotated[
    float | None,
    typer.Option(
        help="Seconds a request may wait for a worker before 503 [default: 60].",
        rich_help_panel=B,
        show_default=False,
    ),
]

MaxQueueOpt = Annotated[
    int | None,
    typer.Option(
        help="Requests that may wait; more get 429 [default: 1000].",
        rich_help_panel=B,
        show_default=False,
    ),
]

MaxAttemptsOpt = Annotated[
    int | None,
    typer.Option(
        help="Attempts per request on connect errors, timeouts and 502/503/504 before the"
        " first byte (a 500 is retried once at most) [default: 3].",
        rich_help_panel=B,
        show_default=False,
    ),
]

UpstreamTimeoutOpt = Annotated[
    float | None,
    typer.Option(
        help="Seconds to wait for a worker's next byte, the first included; before the first"
        " byte reaches the client the request is retried on another worker, after it the"
        " answer ends, and the worker leaves the rotation until a probe passes [default: 60].",
        rich_help_panel=B,
        show_default=False,
    ),
]

MaxBodySizeOpt = Annotated[
    str | None,
    typer.Option(
        help="Largest request body: a byte count or a number with K, M or G (binary);"
        " a larger one is refused with 413 before it is read [default: 32M].",
        rich_help_panel=B,
        show_default=False,
    ),
]

HeaderTimeoutOpt = Annotated[
    float | None,
    typer.Option(
        help="Seconds a client has to send a whole request head, then 408 and the connection"
        " closes; its body gets 60 more [default: 10].",
        rich_help_panel=B,
        show_default=False,
    ),
]

MaxConnectionsOpt = Annotated[
    int | None,
    typer.Option(
        help="Client connections held at once; more are answered 503 and closed (fewer when"
        " the open-file limit needs a reserve for probes and workers) [default: 10000].",
        rich_help_panel=B,
        show_default=False,
    ),
]

ApiKeyOpt = Annotated[
    str | None,
    typer.Option(
        help="Require 'Authorization: Bearer KEY' on proxied routes.",
        rich_help_panel=B,
        envvar="FLOCKCTL_API_KEY",
    ),
]

NodeControlKeyOpt = Annotated[
    str | None,
    typer.Option(
        help="Admin token for /-/ routes [default: generated into daemon.json].",
        rich_help_panel=B,
        envvar="FLOCKCTL_NODE_CONTROL_KEY",
        show_default=False,
    ),
]

OtelCollectorEndpointOpt = Annotated[
    str | None,
    typer.Option(
        help="Send traces and metrics over OpenTelemetry to this collector: http://host:4318"
        " (OTLP/HTTP) or grpc://host:4317 (OTLP/gRPC); engine workers get it too. Without it,"
        " OTEL_EXPORTER_OTLP_ENDPOINT where set.",
        rich_help_panel=D,
        show_default=False,
    ),
]

ReadinessPathOpt = Annotated[
    str | None,
    typer.Option(
        help="Path probed on each worker [default: /health].",
        rich_help_panel=P,
        show_default=False,
    ),
]

InitialDelayOpt = Annotated[
    float | None,
    typer.Option(
        help="Seconds a new worker may take to become READY [default: 1200].",
        rich_help_panel=P,
        show_default=False,
    ),
]

ProbeIntervalOpt = Annotated[
    float | None,
    typer.Option(
        help="Seconds between probes [default: 2].", rich_help_panel=P, show_default=False
    ),
]

ProbeTimeoutOpt = Annotated[
    float | None,
    typer.Option(
        help="Seconds a probe may take [default: 15].", rich_help_panel=P, show_default=False
    ),
]

FailureThresholdOpt = Annotated[
    int | None,
    typer.Option(
        help="Failed probes in a row before NOT_READY [default: 3].",
        rich_help_panel=P,
        show_default=False,
    ),
]

DrainTimeoutOpt = Annotated[
    float | None,
    typer.Option(
        help="Seconds in-flight requests get to finish when a worker is removed [default: 30].",
        rich_help_panel=W,
        show_default=False,
    ),
]

MaxStartFailuresOpt = Annotated[
    int | None,
    typer.Option(
        help="Workers in a row that fail before READY before launching stops [default: 3].",
        rich_help_panel=W,
        show_default=False,
    ),
]

ReplaceAfterOpt = Annotated[
    float | None,
    typer.Option(
        help="Seconds a worker may stay NOT_READY before it is drained, stopped and replaced"
        " (a static endpoint stays out of rotation instead) [default: 180].",
        rich_help_panel=W,
        show_default=False,
    ),
]

WorkersCeilingOpt = Annotated[
    int | None,
    typer.Option(
        help="The most workers any bound may ask for, here and through the admin API"
        " [default: 64].",
        rich_help_panel=W,
        show_default=False,
    ),
]

GpusOpt = Annotated[
    str | None,
    typer.Option(
        help="GPUs local workers are placed on, as nvidia-smi numbers them, e.g. --gpus 0,1,2,3"
        " [default: every GPU NVML sees]. Refused on a machine without NVIDIA GPUs.",
        rich_help_panel=W,
        show_default=False,
    ),
]

GpusPerWorkerOpt = Annotated[
    float | None,
    typer.Option(
        help="GPUs each local worker gets, in its own CUDA_VISIBLE_DEVICES; 0.5 puts two"
        " workers on one GPU; {gpus} in --worker-command is the count [default: 1 for"
        " flockctl's engine, 0 for other worker commands].",
        rich_help_panel=W,
        show_default=False,
    ),
]

CudaMpsOpt = Annotated[
    bool | None,
    typer.Option(
        "--cuda-mps",
        help="Run local workers under CUDA MPS: the daemon starts nvidia-cuda-mps-control and"
        " gives each worker its share of a GPU's threads; stopped at down.",
        rich_help_panel=W,
        show_default=False,
    ),
]

ForegroundOpt = Annotated[
    bool,
    typer.Option(
        help="Run the daemon attached to this terminal, logging to stderr.", rich_help_panel=D
    ),
]

WaitOpt = Annotated[bool, typer.Option(help="Wait until the daemon answers.", rich_help_panel=D)]

TimeoutOpt = Annotated[
    float, typer.Option(help="Seconds to wait for the daemon.", rich_help_panel=D)
]

WatchOpt = Annotated[
    bool,
    typer.Option(
        "--dashboard",
        help="Once it is up, watch it full-screen (flockctl dashboard).",
        rich_help_panel=D,
    ),
]

DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Print the resolved plan (provisioner, workers, autoscaler, probe, balancer,"
        " resources per worker) and start nothing; needs no cloud credentials.",
    ),
]

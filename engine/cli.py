"""``flockctl engine``: run the project's own inference engine as an HTTP worker.

    flockctl engine serve --model demo --port 8001
    flockctl engine serve --model ./my-checkpoint --device cuda --scheduler fcfs
    flockctl engine demo            # build the offline demo model now; print where it is

The scripting commands (``flockctl up/status/logs/down``) import this module to register it, so
it must not import torch or transformers: the engine is imported inside the commands.
"""

from __future__ import annotations

import enum
import errno
import gc
import importlib.util
import logging
import os
import secrets
import signal
import socket
import sys
import warnings
from types import FrameType
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from flockctl.console import fail
from flockctl.engine.demo.command import demo
from flockctl.engine.profile import profile
from flockctl.engine.tree import CPU_TREE, GPU_TREE, format_tree, parse_tree
from flockctl.exitcodes import ExitCode
from flockctl.net import bind, client_url

if TYPE_CHECKING:
    from flockctl.engine.encoder import EncoderEngine
    from flockctl.engine.engine import Engine

log = logging.getLogger("flockctl.engine")

engine_app = typer.Typer(
    name="engine",
    help="Run flockctl's own inference engine: an OpenAI-, TGI- and FastServe-compatible HTTP"
    " server for any Hugging Face causal LM, with MLFQ scheduling and token-level preemption.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Device(str, enum.Enum):
    auto = "auto"
    cuda = "cuda"
    mps = "mps"
    cpu = "cpu"


class DType(str, enum.Enum):
    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class SchedulerName(str, enum.Enum):
    mlfq = "mlfq"
    fcfs = "fcfs"


class SpecMode(str, enum.Enum):
    auto = "auto"
    on = "on"
    off = "off"


class OnOff(str, enum.Enum):
    on = "on"
    off = "off"


class Attention(str, enum.Enum):
    fast = "fast"
    exact = "exact"


class Pooling(str, enum.Enum):
    last = "last"
    mean = "mean"
    cls = "cls"


class LogLevel(str, enum.Enum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class _Stop(Exception):
    """SIGINT/SIGTERM after uvicorn has drained: unwind so the engine is closed."""


S, M, L, P = "Serving", "Model", "Scheduling and limits", "Speculative decoding"


@engine_app.command(
    epilog="Example: flockctl engine serve --model demo --port 8001, then curl"
    " localhost:8001/v1/completions -H 'content-type: application/json'"
    ' -d \'{"prompt": "def ", "max_tokens": 32}\'',
)
def serve(
    model: Annotated[
        str,
        typer.Option(
            help="Hugging Face hub id or local directory of a causal LM; 'demo' builds a small"
            " model on this machine (no download; about 2.5 minutes the first time).",
            rich_help_panel=M,
        ),
    ] = "demo",
    served_model_name: Annotated[
        str | None,
        typer.Option(
            help="Name in /v1/models and the one accepted in requests' 'model' (default: --model).",
            show_default=False,
            rich_help_panel=M,
        ),
    ] = None,
    device: Annotated[
        Device,
        typer.Option(help="auto picks CUDA, then Apple MPS, then CPU.", rich_help_panel=M),
    ] = Device.auto,
    dtype: Annotated[
        DType,
        typer.Option(
            help="auto: bfloat16 on CUDA (float16 without bf16 support), float16 on MPS,"
            " float32 on CPU.",
            rich_help_panel=M,
        ),
    ] = DType.auto,
    host: Annotated[str, typer.Option(help="Address to listen on.", rich_help_panel=S)] = (
        "127.0.0.1"
    ),
    port: Annotated[
        int,
        typer.Option(
            help="Port to listen on (0: any free port).", min=0, max=65535, rich_help_panel=S
        ),
    ] = 8000,
    scheduler: Annotated[
        SchedulerName,
        typer.Option(
            help="mlfq: FastServe's skip-join multi-level feedback queue (short jobs first,"
            " token-level preemption); fcfs: first come, first served.",
            rich_help_panel=L,
        ),
    ] = SchedulerName.mlfq,
    max_batch_size: Annotated[
        str,
        typer.Option(
            metavar="N|auto",
            help="Jobs run together in one iteration. auto: as many as the KV budget holds at"
            " a typical length (budget / min(--max-model-len, 1024) tokens), 8 to 256; the"
            " value chosen is in /stats and the startup log.",
            rich_help_panel=L,
        ),
    ] = "auto",
    max_num_batched_tokens: Annotated[
        str,
        typer.Option(
            metavar="N|auto",
            help="Tokens one iteration feeds the model (chunked prefill): the decoding jobs'"
            " one each, then prompts with what is left, a long prompt in chunks across"
            " iterations so it does not stall the running jobs. auto: 2048 on CUDA, 256"
            " elsewhere. At least --max-batch-size.",
            rich_help_panel=L,
        ),
    ] = "auto",
    num_scheduler_steps: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Greedy decode steps one compiled call may run, with no Python between them,"
            " while every job the engine holds is decoding in the batch (about 50 ms of steps at"
            " most); a new request or a cancel ends the run after its current step. Jobs that"
            " sample, or ask for log-probabilities, penalties or biases, take one step an"
            " iteration. 1: always one.",
            min=1,
            max=256,
            rich_help_panel=L,
        ),
    ] = 16,
    kv_budget: Annotated[
        int | None,
        typer.Option(
            metavar="TOKENS",
            help="Tokens of KV cache on the device; past it, preempted jobs' caches move to host"
            " memory or are dropped and recomputed (default: from free memory).",
            min=1,
            show_default=False,
            rich_help_panel=L,
        ),
    ] = None,
    prefix_caching: Annotated[
        OnOff,
        typer.Option(
            help="Keep the KV cache of prompt prefixes (a shared system prompt, a conversation so"
            " far) and reuse it for later requests that start the same way; evicted least"
            " recently used when the KV budget needs the room.",
            rich_help_panel=L,
        ),
    ] = OnOff.on,
    attention: Annotated[
        Attention,
        typer.Option(
            help="fast: on a CPU, a float32 model's decode step of 8 or more jobs attends with"
            " the engine's compiled kernel, each job read to its own history's length (about a"
            " fifth off a batch-32 step; the logits' last bits differ from transformers', as"
            " another kernel's would). exact: transformers' attention, its logits bit for bit.",
            rich_help_panel=L,
        ),
    ] = Attention.fast,
    max_model_len: Annotated[
        int | None,
        typer.Option(
            help="Longest prompt + completion in tokens (default: the model's context).",
            min=2,
            show_default=False,
            rich_help_panel=L,
        ),
    ] = None,
    max_waiting: Annotated[
        int,
        typer.Option(
            help="Jobs accepted beyond the running batch; more are refused with 429.",
            min=1,
            rich_help_panel=L,
        ),
    ] = 256,
    mlfq_levels: Annotated[
        int,
        typer.Option(
            help="MLFQ levels; level k's quantum is 2**k decode iterations, the last level has"
            " no limit.",
            min=1,
            max=16,
            rich_help_panel=L,
        ),
    ] = 6,
    starvation_limit: Annotated[
        float,
        typer.Option(
            metavar="SECONDS",
            help="An MLFQ job that has not run for this long moves up one level (again after"
            " each further wait as long); in the last level only its oldest job does.",
            min=0.001,
            rich_help_panel=L,
        ),
    ] = 5.0,
    threads: Annotated[
        int | None,
        typer.Option(
            help="CPU threads torch uses (default: OMP_NUM_THREADS if set, else one per core"
            " less one, at least 1: the serving side keeps a core). Engines sharing a machine's"
            " cores should split them: oversubscribed threads can run 50x slower.",
            min=1,
            show_default=False,
            rich_help_panel=M,
        ),
    ] = None,
    fused_threads: Annotated[
        str,
        typer.Option(
            metavar="1|2|auto",
            help="Threads the fused forward (--attention fast, one torch thread) splits a"
            " step's jobs over. auto: 2 when the engine picked torch's threads itself (no"
            " --threads, no OMP_NUM_THREADS) on two cores or more, else 1: the second thread"
            " takes the serving side's core while the model computes. Engines sharing a"
            " machine's cores keep 1.",
            rich_help_panel=M,
        ),
    ] = "auto",
    draft_model: Annotated[
        list[str] | None,
        typer.Option(
            help="A small speculative model (SSM) that drafts token trees for --model to verify;"
            " repeat for several, whose trees merge. It must use the same tokenizer. With"
            " --model demo, 'demo' is the demo's distilled draft.",
            show_default=False,
            rich_help_panel=P,
        ),
    ] = None,
    spec_tree: Annotated[
        str,
        typer.Option(
            help="Token-tree expansion: children per node at each depth, so 1,1,3,1 drafts a"
            " chain of two, branches into three and extends each by one (2 + 3 + 3 nodes)."
            f" auto: {format_tree(GPU_TREE)} on CUDA (SpecInfer's), {format_tree(CPU_TREE)}"
            " elsewhere, where every verified node costs arithmetic.",
            rich_help_panel=P,
        ),
    ] = "auto",
    spec: Annotated[
        SpecMode,
        typer.Option(
            help="auto: speculate while it measurably pays, per job and per device (see"
            " /stats); on: always; off: never. Ignored without --draft-model.",
            rich_help_panel=P,
        ),
    ] = SpecMode.auto,
    pooling: Annotated[
        Pooling | None,
        typer.Option(
            help="How /v1/embeddings pools hidden states: last token, mean of the tokens, or"
            " first token (cls). Default: last for a causal LM, cls for an encoder model.",
            show_default=False,
            rich_help_panel=M,
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed for weights built here and for requests sent without a seed. Default: one"
            " drawn from the OS at start, so two engines never sample alike (flockctl up gives"
            " each local worker its own, in FLOCKCTL_ENGINE_SEED).",
            envvar="FLOCKCTL_ENGINE_SEED",
            show_default=False,
        ),
    ] = None,
    otel_collector_endpoint: Annotated[
        str | None,
        typer.Option(
            help="Send traces (a span per job, continuing the caller's traceparent) and metrics"
            " to this OpenTelemetry collector: http://host:4318 (OTLP/HTTP) or grpc://host:4317"
            " (OTLP/gRPC). Default: OTEL_EXPORTER_OTLP_ENDPOINT. Needs the otel extra.",
            show_default=False,
        ),
    ] = None,
    access_log: Annotated[
        bool,
        typer.Option(
            "--access-log",
            help="Log one JSON line per finished job to stderr: job id, trace id, status,"
            " tokens, queue/ttft/e2e ms, preemptions.",
        ),
    ] = False,
    log_level: Annotated[LogLevel, typer.Option(help="Log verbosity (stderr).")] = LogLevel.info,
) -> None:
    """Serve a model over HTTP: /v1/completions, /v1/chat/completions, /v1/models,
    /v1/embeddings, /tokenize, /detokenize, /generate, /generate_stream, /health, /stats,
    /jobs/{id}, /metrics. An encoder model (BERT-style) is served for embeddings only.

    Exit codes: 0 stopped (SIGINT/SIGTERM), 1 a model cannot load (or a draft model's
    tokenizer differs from the model's), 2 bad flags, 7 port in use.
    """
    logging.basicConfig(
        level=log_level.value.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # A library's warning (a deprecation in transformers, say) goes to the log once, as a log
    # line, not once per request as a bare stderr block.
    logging.captureWarnings(True)
    warnings.simplefilter("once")
    try:
        tree = parse_tree(spec_tree)
        batch_size = parse_auto("--max-batch-size", max_batch_size)
        batched_tokens = parse_auto("--max-num-batched-tokens", max_num_batched_tokens)
        split = parse_auto("--fused-threads", fused_threads)
        if split > 2:
            raise ValueError(f"--fused-threads must be 1, 2 or auto, got {split}")
    except ValueError as exc:
        fail(str(exc), ExitCode.USAGE)
    if spec is SpecMode.on and not draft_model:
        fail("--spec on needs at least one --draft-model", ExitCode.USAGE)
    _check_telemetry(otel_collector_endpoint)
    if access_log:
        _log_access()
    try:
        sock = bind(host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            fail(
                f"port {port} on {host} is already in use; choose another with --port",
                ExitCode.ADDRESS_IN_USE,
            )
        fail(f"cannot listen on {host}:{port}: {exc.strerror}", ExitCode.ERROR)

    with sock:
        # no collection while loading: its imports and weights make objects that all live on,
        # and the collector scanned them again and again (0.6 of a 6.2 s start on the demo)
        gc.disable()
        from flockctl.engine.config import EngineConfig, EngineLoadError
        from flockctl.engine.loader import load_engine
        from flockctl.engine.startup import StartupPhase, StartupResponder

        try:
            config = EngineConfig(
                model=model,
                served_model_name=served_model_name,
                device=device.value,
                dtype=dtype.value,
                scheduler=scheduler.value,
                max_batch_size=batch_size,
                max_num_batched_tokens=batched_tokens,
                num_scheduler_steps=num_scheduler_steps,
                kv_budget=kv_budget,
                prefix_caching=prefix_caching is OnOff.on,
                attention=attention.value,
                max_model_len=max_model_len,
                max_waiting=max_waiting,
                mlfq_levels=mlfq_levels,
                starvation_limit=starvation_limit,
                threads=threads,
                fused_threads=split,
                seed=secrets.randbits(63) if seed is None else seed,
                draft_models=tuple(draft_model or ()),
                spec_tree=tree,
                spec=spec.value,
                pooling=pooling.value if pooling else None,
                otel_collector_endpoint=otel_collector_endpoint,
                access_log=access_log,
            )
        except ValueError as exc:
            fail(str(exc), ExitCode.USAGE)
        phase = StartupPhase()
        try:
            # While loading, the port answers 503 with the phase (the daemon shows it as the
            # worker's reason); uvicorn takes the same socket over once the engine runs.
            with StartupResponder(sock, phase):
                engine = load_engine(config, progress=sys.stderr.isatty(), report=phase.set)
        except Exception as exc:  # any reason the model cannot load is the same one line
            log.debug("loading %s failed", model, exc_info=True)
            reason = " ".join(str(exc).split()) or type(exc).__name__
            if not isinstance(exc, EngineLoadError):  # its message names the model already
                reason = f"cannot load model {model!r}: {reason}"
            fail(reason, ExitCode.ERROR)
        try:
            _serve(engine, sock, host)
        finally:
            engine.close()
    _exit_at_once()


def parse_auto(flag: str, value: str) -> int:
    """A count flag that also takes ``auto``: the count, or 0 for auto."""
    if value.strip().lower() == "auto":
        return 0
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"{flag} must be a whole number or auto, got {value!r}") from None
    if count < 1:
        raise ValueError(f"{flag} must be at least 1 (or auto), got {count}")
    return count


def _check_telemetry(flag: str | None) -> None:
    """A collector endpoint that cannot work is a usage error before the model loads."""
    from flockctl.telemetry import TelemetryError, parse_endpoint, resolve_endpoint

    endpoint = resolve_endpoint(flag)
    if endpoint is None:
        return
    try:
        parse_endpoint(endpoint)
    except TelemetryError as exc:
        fail(str(exc), ExitCode.USAGE)
    if importlib.util.find_spec("opentelemetry.sdk") is None:
        fail(
            f"sending to the collector {endpoint} needs OpenTelemetry: pip install"
            " 'flockctl[otel]'",
            ExitCode.USAGE,
        )


def _log_access() -> None:
    """The access log's lines are bare JSON on stderr, one per job, not log records."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access = logging.getLogger("flockctl.engine.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False


def _exit_at_once() -> NoReturn:
    """End the process without the interpreter's teardown: with the engine closed and the log
    flushed nothing is left to clean up, and tearing down torch's modules took over a second,
    which every ``flockctl down`` of engine workers waited for."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(ExitCode.OK))


def settle_heap() -> None:
    """Once loaded, before serving: what loading built (torch, transformers, the model's
    modules, the tokenizer: about half a million objects on the demo model) lives as long as
    the engine, so it goes out of the garbage collector's sight (``gc.freeze``), and the
    collector, off while loading, runs again. Scanned, a full collection held the GIL for 230 ms
    in the middle of serving, and every stream and the model loop stood still meanwhile (time
    to first token at 32 streams: 83 ms, then 228 ms in the round a collection fell in)."""
    gc.collect()
    gc.freeze()
    gc.enable()


def _serve(engine: Engine | EncoderEngine, sock: socket.socket, host: str) -> None:
    """Serve until SIGINT/SIGTERM; uvicorn finishes in-flight requests (up to 30 s) first."""
    import uvicorn

    from flockctl.engine.api import create_app

    config = uvicorn.Config(
        create_app(engine),
        ws="none",
        lifespan="on",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=30,
        timeout_keep_alive=30,
        server_header=False,
    )
    server = uvicorn.Server(config)
    port = sock.getsockname()[1]
    settle_heap()
    log.info(
        "flockctl engine: serving %s on %s (device %s, scheduler %s)",
        engine.model_name,
        client_url(host, port),
        engine.device,
        engine.config.scheduler,
    )

    # uvicorn catches the signal, drains, then raises it again once it is done; by then these
    # handlers are back in place and turn it into _Stop, so the caller can close the engine.
    def stop(signum: int, _frame: FrameType | None) -> None:
        raise _Stop(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    except _Stop:
        log.info("flockctl engine: stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# The same command as ``python -m flockctl.engine.demo``, which ``flockctl up`` runs to build the
# demo in front of the user; it imports no torch until it builds.
engine_app.command()(demo)
engine_app.command()(profile)

if __name__ == "__main__":
    engine_app(prog_name="flockctl engine")

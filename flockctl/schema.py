"""The shapes of the two documents flockctl's parts exchange: the daemon's status snapshot
(``GET /-/status``) and an engine's ``GET /stats``.

Both are plain JSON objects on the wire; these ``TypedDict`` classes say which keys they carry and
what each holds, so the daemon that writes a snapshot, and the CLI, the dashboard and scripts that
read it, are checked against one declaration (they cost nothing at run time: a ``TypedDict`` is a
``dict``). A key declared in a ``total=False`` class may be absent; every other key is always
there. Values the daemon relays from a worker (``WorkerView.engine``, ``gpu_memory``) come from
another process, possibly of another version: readers treat their keys as optional.

Each document carries its version (``schema`` in the snapshot, ``schema_version`` in ``/stats``).
A change of shape bumps it, and additions only: a reader written for version N keeps working on
later versions. This module is the shared bottom layer: it imports nothing of the daemon, the
engine, torch or Textual.
"""

from __future__ import annotations

from typing import Any, TypedDict

#: The ``schema`` key of ``GET /-/status``.
SNAPSHOT_SCHEMA_VERSION = 4
#: The ``schema_version`` key of an engine's ``GET /stats``.
STATS_SCHEMA_VERSION = 8

# -- an engine's /stats ----------------------------------------------------------------------------


class DeviceIdentity(TypedDict, total=False):
    """On CUDA: the device's index in the engine's process (after ``CUDA_VISIBLE_DEVICES``)
    and its NVML UUID, which names the same GPU in every process."""

    index: int
    uuid: str


class DeviceMemory(DeviceIdentity):
    """The engine's device and its memory, read through NVML, torch, or psutil (the host's RAM
    when the engine runs on the CPU)."""

    type: str
    name: str
    memory_used: int
    memory_total: int
    source: str


class KVStats(TypedDict):
    """The KV cache in tokens: on the device, swapped out to the host, and its traffic."""

    budget_tokens: int
    used_tokens: int
    host_tokens: int
    host_budget_tokens: int
    block_size: int
    swap_outs: int
    swap_ins: int
    recomputes: int


class SpecStepCosts(TypedDict):
    """What speculation measured at one batch size: an incremental step, one draft-model
    forward, and verifying trees of each size (by tokens per job), in milliseconds."""

    incremental_ms: float | None
    draft_forward_ms: float | None
    verify_ms_by_tokens: dict[str, float]


class DecodeRuns(TypedDict):
    """Compiled calls that ran more than one decode step (``runs``), and the steps in them
    (``steps``), since start: greedy decode steps (``decode_runs``), or a lone job's speculative
    steps in a pipelined run (``speculation.pipelined_runs``)."""

    runs: int
    steps: int


class SpeculationStats(TypedDict):
    """Speculative decoding's figures, present only when the engine has draft models.
    ``depth_by_batch``: the draft depth ``--spec auto`` chose last at each batch size (0: none);
    ``acceptance_by_pos``: the engine-wide chance that a draft at each position is accepted once
    the ones before it were."""

    mode: str
    active: bool
    reason: str | None
    max_depth: int
    depth_by_batch: dict[str, int]
    cost_ratio_by_batch: dict[str, float]
    acceptance_by_pos: list[float]
    step_costs_by_batch: dict[str, SpecStepCosts]
    draft_models: list[str]
    tree: list[int]
    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    num_accepted_tokens_per_pos: list[int]
    pipelined_runs: DecodeRuns
    acceptance_rate: float | None
    mean_accepted_length: float | None


class JobSpeculation(TypedDict):
    """One job's speculation counters, and the draft depth chosen for its latest step."""

    enabled: bool
    depth: int
    steps: int
    draft_tokens: int
    accepted_tokens: int
    acceptance_rate: float | None
    mean_accepted_length: float | None


class JobSummary(TypedDict):
    """One live job as ``/stats`` lists it; ``state`` is ``running``, ``waiting``,
    ``preempted``, ``swapped`` or ``finished``."""

    id: str
    state: str
    level: int
    preemptions: int
    prompt_tokens: int
    generated_tokens: int
    age: float
    speculation: JobSpeculation | None


class PrefixCacheStats(TypedDict):
    """Reuse of cached KV blocks across jobs that share a prompt prefix."""

    queries: int
    hits: int
    hit_rate: float | None
    cached_blocks: int
    idle_blocks: int
    evictions: int


class EmbeddingStats(TypedDict):
    """``/v1/embeddings`` work, which runs between the model loop's iterations."""

    pooling: str
    requests: int
    inputs: int
    tokens: int
    forwards: int
    waiting: int


class _EngineStatsRequired(TypedDict):
    schema_version: int
    engine: str
    version: str
    model: str
    scheduler: str
    device: DeviceMemory
    dtype: str
    max_batch_size: int
    max_model_len: int
    #: Unfinished jobs per MLFQ level, the highest priority first.
    queue_lengths: list[int]
    running: int
    waiting: int
    swapped: int
    #: Preemptions since start, by what happened to the KV cache.
    preemptions_total: dict[str, int]
    kv: KVStats
    speculation: SpeculationStats | None
    iterations: int
    tokens_generated: int
    uptime: float
    jobs: list[JobSummary]


class EngineStats(_EngineStatsRequired, total=False):
    """``GET /stats`` of flockctl's engine."""

    #: The token that begins every id this engine process gives out (a job's, a response's).
    instance: str
    #: Requests the engine takes at once (running batch plus waiting room; more get 429). The
    #: balancer makes it the worker's capacity unless ``--worker-capacity`` is given.
    capacity: int
    #: None while prefix caching is off.
    prefix_cache: PrefixCacheStats | None
    embeddings: EmbeddingStats
    #: ``fast``: decode steps of 8 or more jobs attend with the engine's compiled CPU kernel
    #: (logits within float32 rounding of transformers'); ``exact``: transformers' attention
    #: throughout, its logits bit for bit (``--attention``, or where the kernel does not apply).
    attention: str
    #: Threads the fused forward splits a step's jobs over (``--fused-threads``); 0 where the
    #: fused forward does not run.
    fused_threads: int
    #: Greedy decode steps one compiled call may run while every job is decoding
    #: (``--num-scheduler-steps``; 1: one step an iteration), and what such calls ran.
    num_scheduler_steps: int
    decode_runs: DecodeRuns


class _EncoderStatsRequired(TypedDict):
    schema_version: int
    engine: str
    version: str
    model: str
    #: What the engine serves: ``["embed"]``.
    capabilities: list[str]
    device: DeviceMemory
    dtype: str
    max_model_len: int
    #: Always 0, and ``jobs`` always empty: embedding requests are not jobs (those waiting are
    #: counted in ``embeddings.waiting``). Kept so a reader of either engine finds them.
    running: int
    waiting: int
    swapped: int
    embeddings: EmbeddingStats
    uptime: float
    jobs: list[JobSummary]


class EncoderStats(_EncoderStatsRequired, total=False):
    """``GET /stats`` of flockctl's embedding-only engine (a checkpoint that declares an
    encoder). It generates nothing, so it has no scheduler, KV cache or speculation; its
    ``capabilities`` tell it apart from ``EngineStats``. Versioned with it."""

    #: As in ``EngineStats``.
    instance: str
    #: Always ``exact``: an encoder runs transformers' own forward.
    attention: str
    #: Always 0: no fused forward runs (as in ``EngineStats``).
    fused_threads: int
    #: The process's resident memory in bytes (``/stats/detailed`` only).
    process_rss: int


class EngineView(EngineStats, total=False):
    """A worker's ``/stats`` as the snapshot relays it: the jobs capped, ``jobs_omitted`` left
    out. It comes from the worker, so a reader treats every key as optional."""

    jobs_omitted: int


# -- the daemon's status snapshot ------------------------------------------------------------------


class ProbeView(TypedDict):
    """The readiness probe every worker gets (SkyServe's ``readiness_probe`` fields)."""

    path: str
    post_data: dict[str, Any] | None
    headers: dict[str, str]
    initial_delay_seconds: float
    timeout_seconds: float
    interval_seconds: float
    failure_threshold: int


class OpenFiles(TypedDict):
    soft: int | None
    hard: int | None


class LimitsView(TypedDict):
    """The front door's limits; an open-file limit of None is unlimited."""

    max_body_size: int
    max_head_size: int
    header_timeout: float
    body_timeout: float
    keep_alive_timeout: float
    max_connections: int
    connection_cap: int
    open_files: OpenFiles


class UpdateProgress(TypedDict):
    """Where an update stands: the target, and the workers of each version."""

    target: int
    new_live: int
    new_ready: int
    old_live: int
    old_draining: int


class GroupUpdateView(TypedDict):
    """One worker group's part of an update of a deployment with groups."""

    name: str
    #: ``update`` (its definition changed), ``add`` (the new version declares it) or
    #: ``remove`` (the new version no longer does).
    change: str
    #: ``pending``, ``running``, ``succeeded``, ``rolled_back`` or ``skipped`` (an earlier
    #: group's part was rolled back, so this one was not tried).
    state: str
    reason: str | None


class UpdateView(TypedDict):
    """An update of the deployment (``flockctl update``): the one running, else the last.

    ``state`` is ``running``, ``succeeded``, ``rolled_back`` (the new version's workers
    failed and the old version serves again; ``reason`` says why) or ``interrupted`` (the
    daemon was killed while it ran; the old version serves on)."""

    id: str
    from_version: int
    to_version: int
    #: The version whose config it brings back (``flockctl update --rollback``), else None.
    rollback_to: int | None
    mode: str
    max_surge: int
    update_timeout: float
    state: str
    reason: str | None
    started_at: float
    ended_at: float | None
    progress: UpdateProgress
    #: With worker groups: each group the update changes, in the order it does (one group
    #: at a time; ``progress`` is the group's that is rolling); else empty.
    groups: list[GroupUpdateView]


class DeploymentView(TypedDict):
    name: str
    #: The deployment's version that serves: 1 at ``flockctl up``; an update that succeeds
    #: moves it to its own (each update takes the next number; a rolled-back one leaves it).
    version: int
    #: The version of flockctl the daemon runs.
    flockctl_version: str
    #: The running update, else the last one; None before any.
    update: UpdateView | None
    endpoint: str
    provisioner: str
    policy: str
    #: ``--worker-capacity``; None: each worker's own (from its /stats), else no limit.
    worker_capacity: int | None
    upstream_timeout: float
    limits: LimitsView
    started_at: float
    state_dir: str
    worker_command: str | None
    model: str | None
    probe: ProbeView


class DecisionView(TypedDict):
    """The autoscaler's last decision; ``reason`` is shown to the user as is."""

    at: float
    target: int
    reason: str


class SpotView(TypedDict):
    """How the target splits between spot and on-demand workers (SkyServe's fallback)."""

    base_ondemand_fallback_replicas: int
    dynamic_ondemand_fallback: bool
    spot_target: int
    ondemand_target: int


class _AutoscalerRequired(TypedDict):
    policy: str
    target: int
    min_workers: int
    max_workers: int
    #: The queue-length running mean (None before the first sample, or for other policies).
    qlrm: float | None
    #: The request rate a request-rate policy scales on; None for the others.
    qps: float | None
    #: The last minute of ``[time, qlrm]`` pairs, oldest first.
    qlrm_history: list[list[float]]
    last_decision: DecisionView
    #: Why launching stopped (a crash loop), or None.
    launch_blocked: str | None
    consecutive_start_failures: int


class AutoscalerView(_AutoscalerRequired, total=False):
    #: The policy's settings (absent for a policy without any).
    thresholds: dict[str, float]
    #: Present where the provisioner splits workers between spot and on-demand machines.
    spot: SpotView


class GpuMemory(TypedDict):
    """A worker's device memory from its engine's ``/stats``; any part may be unknown."""

    used: int | float | None
    total: int | float | None
    device: str | None
    source: str | None


class ProbeRecord(TypedDict):
    """One readiness probe."""

    at: float
    ok: bool
    detail: str
    ms: float


class WorkerView(TypedDict):
    """One worker; ``state`` is a ``WorkerState`` name (``READY``, ``DRAINING``, ...)."""

    id: str
    provisioner: str
    state: str
    reason: str | None
    url: str | None
    pid: int | None
    in_flight: int
    served: int
    failures: int
    latency_p50_ms: float | None
    created_at: float
    started_at: float | None
    ready_at: float | None
    ended_at: float | None
    last_probe: ProbeRecord | None
    model: str | None
    #: Every model the worker answers to (its ``model`` and its ``/v1/models``); empty while
    #: unknown, and then it may be sent any model.
    models: list[str]
    #: Its worker group (``flockctl: groups``); None in a deployment without groups.
    group: str | None
    #: The deployment version it runs (``deployment.version``, or another while an update runs).
    version: int
    #: Requests the balancer sends it at once; None: no limit.
    capacity: int | None
    #: Where ``capacity`` came from: ``flag`` (--worker-capacity), ``worker`` (its /stats), or
    #: None (no limit).
    capacity_source: str | None
    spot: bool | None
    resource: str | None
    gpu_memory: GpuMemory | None
    #: The worker's engine stats; None for a worker that is not flockctl's engine.
    engine: EngineView | None
    engine_at: float | None
    #: True while the last pulls of ``engine`` failed (it is the last good one).
    engine_stale: bool


class WorkerDetail(WorkerView):
    """``GET /-/workers/{id}``: the worker, its last probes and its command line."""

    probe_history: list[ProbeRecord]
    command: str | None


class RequestsView(TypedDict):
    """The balancer's request counters; ``rate`` is requests per second, recently."""

    total: int
    in_flight: int
    queued: int
    failed: int
    retried: int
    rate: float


class GroupView(TypedDict):
    """One worker group (``flockctl: groups``, or one made for a model at run time), with its
    own autoscaler; ``name`` is ``default`` for the deployment's own workers beside them."""

    name: str
    #: The model its workers serve where one was given (None: a worker command's).
    model: str | None
    #: Every model its workers listed so far, and its own: the requests it scales on.
    models: list[str]
    #: The version its workers run: the deployment's version when the group last changed.
    version: int
    policy: str
    target: int
    min_workers: int
    max_workers: int
    #: Requests waiting for this group's workers.
    queued: int
    in_flight: int
    live: int
    ready: int
    last_decision: DecisionView
    launch_blocked: str | None


class StatusSnapshot(TypedDict):
    """``GET /-/status``: the one source for ``flockctl status``, the dashboard and scripts."""

    schema: int
    generated_at: float
    deployment: DeploymentView
    #: None only before the daemon has started its controller.
    autoscaler: AutoscalerView | None
    #: One entry per worker group; empty for a deployment without groups (``autoscaler`` is
    #: then its only one). With groups, ``autoscaler`` is the first group's.
    groups: list[GroupView]
    workers: list[WorkerView]
    requests: RequestsView
    ready_workers: int


class LogChunk(TypedDict):
    """``GET /-/logs/{target}``: lines of a log, and the byte ``offset`` to ask from next time
    (``reset``: the log started over since that offset, so these lines begin it anew)."""

    target: str
    offset: int
    lines: list[str]
    reset: bool

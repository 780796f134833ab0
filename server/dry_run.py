"""What ``flockctl up`` would run, resolved, with nothing started (``--dry-run``)."""

from __future__ import annotations

from typing import Any

from flockctl.net import client_url
from flockctl.server.config import DeploymentConfig
from flockctl.server.deployment import make_autoscaler, make_spot_plan


def first_launches(cfg: DeploymentConfig, first: int = 1) -> list[tuple[str, bool]]:
    """The workers the controller launches first, in order, each with whether it is spot.

    As ``Controller.reconcile`` does at start, when no spot worker is READY yet: the target
    split by the spot plan, the spot workers launched first, then the on-demand ones (the
    ``base_ondemand_fallback_replicas``, and with ``dynamic_ondemand_fallback`` one for each
    spot worker until it is READY). Without a plan every worker is what the task asks for.
    """
    target = cfg.initial_target()
    spot_plan = make_spot_plan(cfg)
    if spot_plan is None:
        kinds = [cfg.uses_spot()] * target
    else:
        spot, ondemand = spot_plan.split(target, ready_spot=0)
        kinds = [True] * spot + [False] * ondemand
    return [(f"w{n}", is_spot) for n, is_spot in enumerate(kinds, start=first)]


def plan(cfg: DeploymentConfig) -> dict[str, Any]:
    """What ``flockctl up`` would run, resolved (``--dry-run``): nothing is started, and for
    SkyPilot only the task is parsed, which needs no cloud credentials.

    Raises ``SkyError`` when SkyPilot refuses the task.
    """
    policy = make_autoscaler(cfg)
    # With groups the deployment runs none of its own: its workers are its groups' together.
    scaled = [cfg.group_config(g) for g in cfg.groups] or [cfg]
    scalers = [make_autoscaler(own) for own in scaled]
    out: dict[str, Any] = {
        "name": cfg.name,
        "endpoint": client_url(cfg.host, cfg.port),
        "provisioner": cfg.provisioner,
        "workers": {
            "initial": sum(own.initial_target() for own in scaled),
            "min": sum(scaler.min_workers for scaler in scalers),
            "max": sum(scaler.max_workers for scaler in scalers),
        },
        "autoscaler": {"policy": policy.name, "thresholds": policy.thresholds()},
        "probe": cfg.probe.model_dump(),
        "balancer": {
            "policy": cfg.policy,
            "worker_capacity": cfg.worker_capacity,
            "queue_timeout": cfg.queue_timeout,
            "max_queue": cfg.max_queue,
            "max_attempts": cfg.max_attempts,
            "upstream_timeout": cfg.upstream_timeout,
            "max_body_size": cfg.max_body_size,
            "header_timeout": cfg.header_timeout,
            "max_connections": cfg.max_connections,
        },
    }
    if cfg.provisioner == "static":
        out["worker"] = {"endpoints": list(cfg.endpoints)}
    elif cfg.provisioner == "local":
        out["worker"] = {"command": cfg.local_command(), "model": cfg.model}
    else:
        from flockctl.server.provisioners.sky_sdk import describe
        from flockctl.server.provisioners.skypilot import cluster_name

        own = cfg.group_config(cfg.groups[0]) if cfg.groups else cfg  # with groups: the first's
        assert own.task is not None
        described = describe(own.task, cfg.workdir)
        described["resources"].sort()
        out["worker"] = {
            "first_cluster": cluster_name(cfg.name, "w1"),
            "launches": [
                {"id": worker_id, "cluster": cluster_name(cfg.name, worker_id), "spot": is_spot}
                for worker_id, is_spot in _launches(scaled)
            ],
            "port": own.worker_port,
            **described,
            "base_ondemand_fallback_replicas": cfg.base_ondemand_fallback_replicas,
            "dynamic_ondemand_fallback": cfg.dynamic_ondemand_fallback,
            "launch_attempts": cfg.launch_attempts,
        }
    if cfg.groups:
        out["groups"] = []
        for group in cfg.groups:
            own = cfg.group_config(group)
            scaler = make_autoscaler(own)
            out["groups"].append(
                {
                    "name": group.name,
                    "model": group.model,
                    "command": (
                        own.local_command()
                        if own.provisioner == "local"
                        else ", ".join(own.endpoints) or f"SkyPilot task, port {own.worker_port}"
                    ),
                    "initial": own.initial_target(),
                    "min": scaler.min_workers,
                    "max": scaler.max_workers,
                    "autoscaler": scaler.name,
                }
            )
    return out


def _launches(scaled: list[DeploymentConfig]) -> list[tuple[str, bool]]:
    """The first launches of each group in turn (one config: the deployment's), numbered on."""
    out: list[tuple[str, bool]] = []
    for own in scaled:
        out += first_launches(own, first=len(out) + 1)
    return out

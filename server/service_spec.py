"""SkyServe's ``service:`` section, read as SkyServe reads it and turned into config fields.

A SkyServe service file runs under flockctl unchanged: each field it takes lands on the config
field that does the same job, and each one it does not implement is refused by name, never
silently ignored. What SkyServe does is kept: a probe given as a plain string is its path, and
without any ``readiness_probe`` the path is ``/``; ``replicas: N`` is a fixed number;
``target_qps_per_replica`` selects the request-rate autoscaler with SkyServe's default delays;
``replica_policy`` without ``max_replicas`` stays at ``min_replicas``.

The models here check the section's shape and types; the limits (a port's range, a delay that
cannot be negative) are the config's, checked once for every source.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    field_validator,
    model_validator,
)

from flockctl.server.config import ConfigError

#: SkyServe's load-balancing policy names and the balancer policy each one is here.
SKYSERVE_LB_POLICIES = {"least_load": "least-connection", "round_robin": "round-robin"}
#: SkyServe's defaults for the request-rate autoscaler's delays, used when a ``service:`` section
#: asks for ``target_qps_per_replica`` without them (flockctl's own defaults suit qlrm).
SKYSERVE_UPSCALE_DELAY = 300.0
SKYSERVE_DOWNSCALE_DELAY = 1200.0


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReadinessProbe(_Section):
    """``service.readiness_probe`` as a mapping; each field becomes a ``probe`` setting."""

    path: str
    post_data: dict[str, Any] | None = None
    initial_delay_seconds: float | None = None
    timeout_seconds: float | None = None
    headers: dict[str, str] | None = None
    endpoint_probe_interval_seconds: float | None = None

    @field_validator("post_data", mode="before")
    @classmethod
    def _json_text(cls, value: Any) -> Any:
        """SkyServe also takes the body as JSON text."""
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc}") from None
        return value

    def probe(self) -> dict[str, Any]:
        """The ``probe`` settings this asks for: only the fields the file gave."""
        given = self.model_dump(exclude_unset=True)
        if "endpoint_probe_interval_seconds" in given:
            given["interval_seconds"] = given.pop("endpoint_probe_interval_seconds")
        return given


class ReplicaPolicy(_Section):
    """``service.replica_policy``: the autoscaler's bounds, and SkyServe's request-rate target."""

    min_replicas: int | None = None
    max_replicas: int | None = None
    target_qps_per_replica: float | None = None
    upscale_delay_seconds: float | None = None
    downscale_delay_seconds: float | None = None
    base_ondemand_fallback_replicas: int | None = None
    dynamic_ondemand_fallback: bool | None = None

    @field_validator("target_qps_per_replica", mode="before")
    @classmethod
    def _one_number(cls, value: Any) -> Any:
        if isinstance(value, dict):
            raise ValueError("a target per accelerator is not supported; give one number")
        return value


#: ``replica_policy`` fields and the config fields they become.
_POLICY_FIELDS = {
    "min_replicas": "min_workers",
    "max_replicas": "max_workers",
    "target_qps_per_replica": "target_qps_per_replica",
    "upscale_delay_seconds": "upscale_delay",
    "downscale_delay_seconds": "downscale_delay",
    "base_ondemand_fallback_replicas": "base_ondemand_fallback_replicas",
    "dynamic_ondemand_fallback": "dynamic_ondemand_fallback",
}


class ServiceSection(_Section):
    """A SPEC's ``service:`` section, the fields of SkyServe's that flockctl implements."""

    readiness_probe: ReadinessProbe = ReadinessProbe(path="/")
    replicas: int | None = None
    replica_policy: ReplicaPolicy | None = None
    load_balancing_policy: str | None = None
    ports: int | None = None

    @field_validator("readiness_probe", mode="before")
    @classmethod
    def _path_or_mapping(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"path": value}
        if not isinstance(value, dict):
            raise ValueError("must be a path or a mapping")
        return value

    @field_validator("load_balancing_policy", mode="before")
    @classmethod
    def _balancer_policy(cls, value: Any) -> Any:
        """SkyServe's policy name (any case) as the balancer's."""
        if value is None:
            return None
        mapped = SKYSERVE_LB_POLICIES.get(str(value).lower())
        if mapped is None:
            raise ValueError(
                f"{value!r} is not supported (flockctl takes {', '.join(SKYSERVE_LB_POLICIES)})"
            )
        return mapped

    @model_validator(mode="after")
    def _one_way_to_scale(self) -> ServiceSection:
        if {"replicas", "replica_policy"} <= self.model_fields_set:
            raise ValueError("replicas: cannot be used together with service.replica_policy")
        return self

    def overrides(self, at: str) -> tuple[dict[str, Any], dict[str, str]]:
        """The config fields this section sets and, for each, the field of the file it came
        from (``at`` is where the section is: ``spec.yaml: service.``)."""
        out: dict[str, Any] = {"probe": self.readiness_probe.probe()}
        origin = {"probe": f"{at}readiness_probe"}
        if "replicas" in self.model_fields_set:
            # As in SkyServe, ``replicas: N`` is min_replicas = max_replicas = N.
            out["autoscaler"] = "fixed"
            out["replicas"] = self.replicas
            for key in ("replicas", "min_workers", "max_workers"):
                origin[key] = f"{at}replicas"
            if self.replicas is not None:
                out["min_workers"] = self.replicas
                out["max_workers"] = max(self.replicas, 1)
        if self.replica_policy is not None:
            self._policy_overrides(self.replica_policy, f"{at}replica_policy", out, origin)
        if self.load_balancing_policy is not None:
            out["policy"] = self.load_balancing_policy
            origin["policy"] = f"{at}load_balancing_policy"
        if "ports" in self.model_fields_set:
            out["worker_port"] = self.ports
            origin["worker_port"] = f"{at}ports"
        return out, origin

    @staticmethod
    def _policy_overrides(
        policy: ReplicaPolicy, at: str, out: dict[str, Any], origin: dict[str, str]
    ) -> None:
        given = policy.model_dump(exclude_unset=True)
        for key, value in given.items():
            out[_POLICY_FIELDS[key]] = value
            origin[_POLICY_FIELDS[key]] = f"{at}.{key}"
        if "target_qps_per_replica" in given:
            out["autoscaler"] = "request-rate"
            origin["autoscaler"] = f"{at}.target_qps_per_replica"
            out.setdefault("upscale_delay", SKYSERVE_UPSCALE_DELAY)
            out.setdefault("downscale_delay", SKYSERVE_DOWNSCALE_DELAY)
        if "max_replicas" not in given and policy.min_replicas is not None:
            # As in SkyServe: without max_replicas the deployment stays at min_replicas.
            out["max_workers"] = max(policy.min_replicas, 1)


def service_overrides(service: Any, where: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Map SkyServe's ``service:`` section onto config fields, field by field, or raise
    ConfigError with one line per problem, each naming the file and the field."""
    if not isinstance(service, dict):
        raise ConfigError([f"{where}service: must be a mapping"])
    at = f"{where}service."
    try:
        section = ServiceSection.model_validate(service)
    except ValidationError as exc:
        raise ConfigError([_problem(err, at) for err in exc.errors()]) from None
    return section.overrides(at)


def _problem(err: Any, at: str) -> str:
    """One validation error as the line the user reads: the file, the field, what is wrong."""
    loc = [str(part) for part in err["loc"]]
    msg = str(err["msg"]).removeprefix("Value error, ")
    kind = err["type"]
    if kind == "extra_forbidden":
        msg = "unknown or unsupported field"
        if len(loc) == 1:
            msg += f" (flockctl takes {', '.join(ServiceSection.model_fields)})"
    elif kind == "missing" and len(loc) > 1:
        msg = f"required when {'.'.join(loc[:-1])} is a mapping"
    elif kind == "model_type":
        msg = "must be a mapping"
    if not loc:  # a check across fields names its field first
        return f"{at}{msg}"
    return f"{at}{'.'.join(loc)}: {msg}"


_ENV_VAR = re.compile(r"\$\{?\b([a-zA-Z_][a-zA-Z0-9_]*)\b\}?")


def fill_envs(service: Any, data: dict[str, Any]) -> Any:
    """The ``service:`` section with the task's ``envs`` (and inline ``secrets``) filled in, as
    SkyPilot does, so ``post_data: {model: $MODEL_ID}`` probes with the real model name."""
    values: dict[str, str] = {}
    for key in ("envs", "secrets"):
        found = data.get(key)
        if isinstance(found, dict):
            values.update({str(k): str(v) for k, v in found.items() if v is not None})
    if not values:
        return service
    text = json.dumps(service)
    filled = _ENV_VAR.sub(lambda m: values.get(m.group(1), m.group(0)), text)
    try:
        return json.loads(filled)
    except json.JSONDecodeError:  # a value that breaks the JSON: leave the section as written
        return service
